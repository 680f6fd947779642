"""One TOML reader for every configuration file (site.toml, coordinator.toml, PROJECT.toml).

Each file's errors are a ``ConfigError`` (``protocol/config_error.py``) naming the key at
fault, so the CLI prints one line and exits 2 whichever file was bad; ``SiteConfigError``
and ``ProjectError`` are its subclasses for the file they come from.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from protocol.config_error import ConfigError


def read_toml(path: Path, *, key: str = "config", error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The parsed file; ``error(key, ...)`` when it is missing, unreadable, not UTF-8 or not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(key, f"{path} does not exist") from None
    except OSError as e:
        raise error(key, f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise error(key, f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise error(key, f"{path} is not valid TOML: {e}") from None
