"""Logging set up once per process: JSON lines for daemons, key=value lines for the CLI.

Everything goes through structlog (``structlog.get_logger(__name__)``); records
from the standard ``logging`` module (pika, flwr, opacus) are rendered the same
way. ``run_id``, ``round`` and ``site_id`` bound with ``log_context`` (context
variables, so per thread / task) appear on every line logged inside it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Literal, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_HANDLER_NAME = "fedbus"
_configured: tuple[str, str, int] | None = None


def configure_logging(
    mode: Literal["cli", "daemon"] = "cli", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger; calling again with the same arguments does nothing."""
    global _configured
    if mode not in ("cli", "daemon"):
        raise ValueError(f"logging mode must be 'cli' or 'daemon', got {mode!r}")
    lvl = _LEVELS.get(str(level).lower())
    if lvl is None:
        raise ValueError(f"log level must be one of {sorted(_LEVELS)}, got {level!r}")
    stream = sys.stderr if stream is None else stream
    key = (mode, str(level).lower(), id(stream))
    if _configured == key:
        return

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    # Tracebacks never show local variables: at a site those can hold patient rows.
    if mode == "daemon":
        tracebacks = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        final: list[Any] = [
            structlog.processors.ExceptionRenderer(tracebacks),
            structlog.processors.JSONRenderer(),
        ]
    else:
        final = [
            structlog.dev.ConsoleRenderer(
                colors=False, pad_event_to=0, exception_formatter=structlog.dev.plain_traceback
            )
        ]

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    # pika logs every connection step at INFO and every failed attempt at ERROR; the bus
    # says what happened in its own lines, so pika stays silent unless debugging.
    logging.getLogger("pika").setLevel(logging.DEBUG if lvl == logging.DEBUG else logging.CRITICAL + 1)
    _configured = key


def add_log_file(path: Path) -> None:
    """Also write every log line as JSON to ``path`` (appending; the coordinator keeps one
    in its state directory, which ``fedbus coordinator logs RUN`` reads back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tracebacks = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.ExceptionRenderer(tracebacks), structlog.processors.JSONRenderer()],
    )
    root = logging.getLogger()
    name = f"{_HANDLER_NAME}-file:{path}"
    if any(h.get_name() == name for h in root.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.set_name(name)
    handler.setFormatter(formatter)
    root.addHandler(handler)


@contextlib.contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Bind e.g. ``run_id``, ``round``, ``site_id`` on every log line inside the block."""
    with structlog.contextvars.bound_contextvars(**values):
        yield


def bind_log_context(**values: Any) -> None:
    """Bind values for the rest of this thread / task (daemons: ``site_id`` at start-up)."""
    structlog.contextvars.bind_contextvars(**values)


__all__ = ["configure_logging", "add_log_file", "log_context", "bind_log_context"]
