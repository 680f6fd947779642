"""The one rule for names that become queue names, file names and key ids.

Site ids, federation names, dataset names, key names and the coordinator's broker user:
1-64 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or digit. 64 because a
site id ends up inside queue names (``fedbus.site.<id>``), broker user names and file names;
no caller needs more. ``fullmatch``: a trailing newline is not part of a name (``re.match``
with ``$`` let ``"site-a\\n"`` through).
"""

from __future__ import annotations

import re

NAME_MAX = 64
NAME_RULE = f"1-{NAME_MAX} letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}")


def is_name(value: object) -> bool:
    """Whether ``value`` is a valid site id / federation / dataset / key name."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None
