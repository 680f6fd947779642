"""``ConfigError``: a bad experiment configuration, named by its JSON path.

Kept in its own module so the torch-free layer checks (``protocol/layers.py``) and the
schema (``protocol/config.py``) raise the same error without importing each other.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """An experiment that cannot run; ``str(e) == f"{path}: {message}"``.

    ``path`` is the JSON path of the offending field (``training.batch_size``,
    ``architecture.layers[2].params.in_features``); ``errors`` lists every problem
    found as ``(path, message)`` pairs, the first one being ``(path, message)``.
    """

    def __init__(self, path: str, message: str, *, errors: list[tuple[str, str]] | None = None) -> None:
        self.path = path
        self.message = message
        self.errors = errors or [(path, message)]
        super().__init__(f"{path}: {message}" if path else message)
