"""protocol.logs: JSON lines for daemons, key=value lines for the CLI, context on every line."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from protocol.logs import bind_log_context, configure_logging, log_context


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root = logging.getLogger()
    for h in [h for h in root.handlers if h.get_name() == "fedbus"]:
        root.removeHandler(h)
    import protocol.logs

    protocol.logs._configured = None


def test_daemon_mode_writes_json_lines_with_run_round_and_site():
    out = io.StringIO()
    configure_logging("daemon", level="info", stream=out)
    log = structlog.get_logger("fedbus.test")
    bind_log_context(site_id="site-1")
    with log_context(run_id="r-1", round=3):
        log.info("update_sent", bytes=123)
    log.debug("hidden")
    logging.getLogger("pika.connection").warning("socket closed %s", "now")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1  # debug hidden; pika stays silent below --log-level debug
    first = lines[0]
    assert first["event"] == "update_sent" and first["bytes"] == 123 and first["level"] == "info"
    assert (first["run_id"], first["round"], first["site_id"]) == ("r-1", 3, "site-1")
    assert "timestamp" in first


def test_debug_mode_renders_stdlib_records_with_the_site_context():
    out = io.StringIO()
    configure_logging("daemon", level="debug", stream=out)
    bind_log_context(site_id="site-1")
    logging.getLogger("pika.connection").warning("socket closed %s", "now")
    (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line["event"] == "socket closed now" and line["logger"] == "pika.connection"
    assert "run_id" not in line and line["site_id"] == "site-1"


def test_cli_mode_writes_readable_key_value_lines():
    out = io.StringIO()
    configure_logging("cli", level="debug", stream=out)
    with log_context(run_id="r-2"):
        structlog.get_logger("x").debug("loaded", rows=299)
    line = out.getvalue().strip()
    assert "loaded" in line and "rows=299" in line and "run_id=r-2" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_configuring_twice_does_not_duplicate_lines():
    out = io.StringIO()
    configure_logging("daemon", stream=out)
    configure_logging("daemon", stream=out)
    structlog.get_logger().info("once")
    assert len(out.getvalue().splitlines()) == 1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        configure_logging("server")
    with pytest.raises(ValueError, match="level"):
        configure_logging("cli", level="loud")


@pytest.mark.parametrize("mode", ["daemon", "cli"])
def test_tracebacks_never_show_local_variables(mode):
    out = io.StringIO()
    configure_logging(mode, stream=out)
    patient_row = "age=63,sex=M,secret-marker"  # noqa: F841 - must not reach the log
    try:
        raise ValueError("bad row")
    except ValueError:
        structlog.get_logger("x").exception("training_failed")
    text = out.getvalue()
    assert "training_failed" in text and "ValueError" in text and "bad row" in text
    assert "secret-marker" not in text
