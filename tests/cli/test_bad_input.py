"""Bad input anywhere in the CLI: one line that names the key, exit 2, never a traceback.

Each verb gets its typical bad inputs (issue 24, Build 6): a misspelt feature in an
experiment, an unknown aggregator name, a bad site TOML, a port in use."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedbus.cli import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart_failure.json"


def _experiment(tmp_path: Path, name: str, change) -> Path:
    doc = json.loads(EXAMPLE.read_text())
    change(doc)
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(doc))
    return p


def _one_line_exit_2(args: list[str], *names: str) -> str:
    r = CliRunner().invoke(app, args)
    text = r.output
    assert r.exit_code == 2, (args, r.exit_code, text)
    assert "Traceback" not in text and (r.exception is None or isinstance(r.exception, SystemExit)), text
    lines = [ln for ln in (r.stderr if hasattr(r, "stderr") else text).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("fedbus", "invalid"))]
    assert len(errors) == 1, lines
    for n in names:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture
def bad(tmp_path: Path) -> dict[str, Path]:
    def feature(d):
        d["dataset"]["features"][0] = "agee"

    def aggregator(d):
        d["federated"]["name"] = "FedAvgg"

    out = {"feature": _experiment(tmp_path, "feature", feature), "aggregator": _experiment(tmp_path, "agg", aggregator)}
    (tmp_path / "not.json").write_text("{ not json")
    out["not_json"] = tmp_path / "not.json"
    out["toml_syntax"] = tmp_path / "syntax.toml"
    out["toml_syntax"].write_text('site_id = "h1"\n[broker\n')
    out["toml_key"] = tmp_path / "key.toml"
    out["toml_key"].write_text('site_id = "h1"\n[broker]\nurl = "amqp://x"\n')
    out["toml_type"] = tmp_path / "type.toml"
    out["toml_type"].write_text("site_id = 5\n")
    return out


def test_config_validate(bad):
    line = _one_line_exit_2(["config", "validate", str(bad["aggregator"])], "federated.name", "FedAvgg")
    assert "did you mean 'FedAvg'" in line
    _one_line_exit_2(["config", "validate", str(bad["not_json"])])


def test_config_validate_accepts_every_registered_aggregator(tmp_path):
    """Just inside: the real name (and a flower: strategy) passes validate."""
    for name in ("FedAvg", "FedProx", "flower:FedAdam"):
        p = _experiment(tmp_path, name.replace(":", "_"), lambda d, n=name: d["federated"].update(name=n))
        assert CliRunner().invoke(app, ["config", "validate", str(p)]).exit_code == 0, name


def test_simulate(bad, tmp_path):
    line = _one_line_exit_2(["simulate", str(bad["feature"]), "--sites", "2", "--rounds", "1"],
                            "dataset.features[0]", "agee")
    assert "did you mean 'age'" in line
    _one_line_exit_2(["simulate", str(bad["aggregator"]), "--sites", "2", "--rounds", "1"], "federated.name")
    _one_line_exit_2(["simulate", str(bad["not_json"])])
    _one_line_exit_2(["simulate", str(EXAMPLE), "--dataset", str(tmp_path / "missing.csv"), "--target", "y"])


@pytest.mark.parametrize("verb", ["check", "run"])
def test_site_with_a_bad_toml(bad, verb):
    _one_line_exit_2(["site", verb, "--config", str(bad["toml_syntax"])], "not valid TOML", "line 2")
    _one_line_exit_2(["site", verb, "--config", str(bad["toml_key"])], "broker", "unknown key")
    _one_line_exit_2(["site", verb, "--config", str(bad["toml_type"])], "site_id")


def test_a_port_in_use_names_its_option(tmp_path):
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        (tmp_path / "state").mkdir()
        _one_line_exit_2(["coordinator", "serve", "--state", str(tmp_path / "state"), "--port", port], "--port", port)
        _one_line_exit_2(["simulate", str(EXAMPLE), "--sites", "2", "--rounds", "1", "--out", str(tmp_path / "o"),
                          "--serve", "--serve-port", port], "--serve-port", port)


def _verb_cases(d: Path) -> list[tuple[list[str], str]]:
    """(arguments, a word the one line must hold) for every verb's typical bad input."""
    (d / "bad.json").write_text("{ not json")
    (d / "bad.toml").write_text("site_id = 5\n")
    (d / "badproj.toml").write_text("[federation\n")
    (d / "x.csv").write_text("a,b\n1,2\n")
    st = str(d / "st")
    return [
        (["keys", "generate", "bad name!", "--out", str(d)], "bad name!"),
        (["config", "new", "--dataset", str(d / "missing.csv"), "--target", "y", "--out", str(d / "o.json")], "--dataset"),
        (["config", "new", "--dataset", str(d / "x.csv"), "--target", "nope", "--out", str(d / "o.json")], "nope"),
        (["config", "new", "--dataset", str(d / "x.csv"), "--target", "a", "--out", str(d / "o.json"), "--keep", "zz"],
         "--keep zz"),
        (["config", "validate", str(d / "missing.json")], "missing.json"),
        (["provision", str(d / "badproj.toml"), "--out", str(d / "kits")], "not valid TOML"),
        (["provision", str(d / "missing.toml"), "--out", str(d / "kits")], "does not exist"),
        (["coordinator", "run", str(d / "bad.json"), "--broker", "amqp://x@127.0.0.1:5672/%2F", "--state", st,
          "--federation", "f"], "not valid JSON"),
        (["coordinator", "run", str(d / "bad.json"), "--config", str(d / "missing.toml")], "--config"),
        (["coordinator", "runs", "show", "nope", "--state", st], "--state"),
        (["coordinator", "runs", "export", "nope", "--state", st, "--out", str(d / "ex")], "--state"),
        (["coordinator", "audit", "nope", "--state", st], "--state"),
        (["coordinator", "logs", "nope", "--state", st], "--state"),
        (["coordinator", "enroll", "s1", str(d / "missing.pub"), "--state", st], "missing.pub"),
        (["coordinator", "serve", "--state", str(d / "missing-state")], "--state"),
        (["coordinator", "cohort", str(d / "bad.json"), "--broker", "amqp://127.0.0.1:5672/%2F", "--state", st,
          "--federation", "f"], "not valid JSON"),
        (["site", "approve", str(d / "bad.json"), "--config", str(d / "bad.toml")], "site_id"),
        (["site", "approvals", "list", "--config", str(d / "bad.toml")], "site_id"),
        (["simulate", str(EXAMPLE), "--partition", "bogus"], "--partition"),
        (["certs", "show", str(d / "x.csv")], "x.csv"),
    ]


def test_each_verb_refuses_its_typical_bad_input_in_one_line(tmp_path: Path) -> None:
    """Issue 24, Must show: every verb of the CLI, fed a bad file or value, says so in one line
    naming the key (or the file) and exits 2; none prints a traceback."""
    for args, word in _verb_cases(tmp_path):
        r = CliRunner().invoke(app, args)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2, (args, r.exit_code, r.output[-2000:])
        assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), args
        assert len(lines) == 1 and word in lines[0], (args, lines)


@pytest.mark.parametrize(("args", "names"), [
    (["simulate", str(EXAMPLE), "--sites", "0"], ("--sites", "0")),  # just outside the range x >= 1
    (["simulate", str(EXAMPLE), "--sites", "abc"], ("--sites", "abc")),
    (["simulate", str(EXAMPLE), "--bogus"], ("--bogus",)),
    (["simulate"], ("EXPERIMENT",)),
    (["coordinator", "runs", "show"], ("RUN_ID",)),
])
def test_usage_errors_are_one_line_naming_the_option(args: list[str], names: tuple[str, ...]) -> None:
    """Click's own usage errors (a value out of its range, an unknown option, a missing argument)
    are one line too, not typer's five-line box."""
    _one_line_exit_2(args, *names)


def test_no_arguments_still_shows_the_help() -> None:
    r = CliRunner().invoke(app, [])
    assert "Usage: fedbus" in r.output and "simulate" in r.output, r.output
