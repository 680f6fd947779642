"""``fedbus provision``: kits per party, idempotent, rotation on request, revocation; ``site check``."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedbus.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _project(tmp: Path, sites: list[str], *, broker: str = "amqp://127.0.0.1:5672/%2F",
             admin: str = "amqp://guest:guest@127.0.0.1:5672/%2F", fed: str = "cardio", data: Path | None = None) -> Path:
    lines = ["[federation]", f'name = "{fed}"', f'broker = "{broker}"', f'admin = "{admin}"',
             'dataset = "heart_failure"', 'target = "DEATH_EVENT"', ""]
    for s in sites:
        lines += ["[[sites]]", f'id = "{s}"'] + ([f'data = "{data}"'] if data else []) + [""]
    p = tmp / "project.toml"
    p.write_text("\n".join(lines))
    return p


def _provision(*args: str) -> object:
    r = CliRunner().invoke(app, ["provision", *args])
    return r


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_kits_are_complete_idempotent_and_rotate_only_what_is_asked(tmp_path: Path) -> None:
    proj = _project(tmp_path, ["hospital-a", "hospital-b"])
    out = tmp_path / "kits"
    r = _provision(str(proj), "--out", str(out), "--skip-broker", "--json")
    assert r.exit_code == 0, r.output
    a = out / "hospital-a"
    for f in ("site.toml", "hospital-a.key", "hospital-a.pub", "coordinator.pub", "broker.password",
              "fedbus-site.service", "README"):
        assert (a / f).exists(), f
    assert _mode(a / "hospital-a.key") == 0o600 and _mode(a / "broker.password") == 0o600
    assert "RestartPreventExitStatus=2" in (a / "fedbus-site.service").read_text()
    readme = (a / "README").read_text()
    assert "fedbus site check --config site.toml" in readme and "fedbus site run --config site.toml" in readme
    assert (a / "coordinator.pub").read_bytes() == (out / "coordinator" / "coordinator.pub").read_bytes()
    # the federation's site keys, for secure aggregation's key bindings: exactly the sites' own .pub files
    for kit in ("hospital-a", "hospital-b"):
        peers = out / kit / "peers"
        assert sorted(p.name for p in peers.glob("*.pub")) == ["hospital-a.pub", "hospital-b.pub"]
        assert all((peers / f"{s}.pub").read_bytes() == (out / s / f"{s}.pub").read_bytes() for s in ("hospital-a", "hospital-b"))
    toml = (a / "site.toml").read_text()
    assert 'broker_url = "amqp://hospital-a@127.0.0.1:5672/%2F"' in toml and "password" not in toml.split("broker_password_file")[0]

    from coordinator.state import StateStore

    store = StateStore(out / "coordinator" / "state")
    assert [s["site_id"] for s in store.sites()] == ["hospital-a", "hospital-b"]
    store.close()

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
                if p.is_file() and p.suffix in (".key", ".password", ".pub")}

    before = snapshot()
    assert _provision(str(proj), "--out", str(out), "--skip-broker").exit_code == 0
    assert snapshot() == before  # idempotent: nothing renewed
    r = _provision(str(proj), "--out", str(out), "--skip-broker", "--rotate-key", "hospital-b",
                   "--rotate-password", "hospital-a")
    assert r.exit_code == 0, r.output
    after = snapshot()
    changed = {k for k in before if before[k] != after[k]}
    # the rotated key reaches every kit's peers (the other hospitals must trust the new one)
    assert changed == {"hospital-b/hospital-b.key", "hospital-b/hospital-b.pub", "hospital-a/broker.password",
                       "hospital-a/peers/hospital-b.pub", "hospital-b/peers/hospital-b.pub"}
    store = StateStore(out / "coordinator" / "state")
    assert store.site("hospital-b")["public_pem"].encode() == (out / "hospital-b" / "hospital-b.pub").read_bytes()
    store.close()

    # One more site later: the others are untouched.
    proj = _project(tmp_path, ["hospital-a", "hospital-b", "hospital-c"])
    assert _provision(str(proj), "--out", str(out), "--skip-broker").exit_code == 0
    assert (out / "hospital-c" / "site.toml").exists()
    now = snapshot()
    assert {k: v for k, v in now.items() if not k.startswith("hospital-c") and not k.endswith("peers/hospital-c.pub")} == after
    assert now["hospital-a/peers/hospital-c.pub"] == now["hospital-c/hospital-c.pub"]  # the others learn its key

    r = _provision(str(proj), "--out", str(out), "--skip-broker", "--rotate-key", "nobody")
    assert r.exit_code == 2 and "'nobody'" in r.stderr


def test_bad_project_files_name_the_key(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text('[federation]\nname = "x"\nbroker = "amqp://h/"\nadmin = "amqp://a:b@h/"\nbrokr = 1\n[[sites]]\nid = "s"\n')
    r = _provision(str(p), "--out", str(tmp_path / "k"), "--skip-broker")
    assert r.exit_code == 2 and "federation.brokr: unknown key" in r.stderr
    p.write_text('[federation]\nname = "x"\nbroker = "amqp://h/"\nadmin = "amqp://a:b@h/"\n')
    r = _provision(str(p), "--out", str(tmp_path / "k"), "--skip-broker")
    assert r.exit_code == 2 and "sites: add at least one [[sites]]" in r.stderr


@pytest.mark.broker
def test_revoked_site_is_refused_by_broker_and_coordinator(tmp_path: Path, amqp_url: str) -> None:
    from urllib.parse import urlsplit

    from coordinator.state import StateStore
    from protocol.codec import new_envelope, open_frame, seal
    from protocol.errors import ProtocolError
    from protocol.messages import Declined
    from protocol.signing import Signer
    from protocol.transport import BusPermissionError, open_bus
    from protocol.transport.topology import site_queue

    tag = uuid.uuid4().hex[:8]
    a, b = f"rev-{tag}-a", f"rev-{tag}-b"
    vhost = urlsplit(amqp_url).path
    data = tmp_path / "hf.csv"
    data.write_text("age,DEATH_EVENT\n50,0\n60,1\n")
    proj = _project(tmp_path, [a, b], broker=f"amqp://127.0.0.1:5672{vhost}", admin=amqp_url, fed=f"fed-{tag}",
                    data=data)
    out = tmp_path / "kits"
    try:
        r = _provision(str(proj), "--out", str(out))
        assert r.exit_code == 0, r.output
        check = CliRunner().invoke(app, ["site", "check", "--config", str(out / b / "site.toml")])
        assert "ok    broker: logged in" in check.stdout, check.stdout
        signer_b = Signer.from_file(out / b / f"{b}.key")
        assert sorted(p.name for p in (out / a / "peers").glob("*.pub")) == [f"{a}.pub", f"{b}.pub"]
        r = _provision(str(proj), "--out", str(out), "--revoke", b)
        assert r.exit_code == 0, r.output
        assert not (out / b).exists() and (out / a / "site.toml").exists()
        # the revoked site's key leaves every kit's peers: it can no longer bind a key in a secure roster
        assert sorted(p.name for p in (out / a / "peers").glob("*.pub")) == [f"{a}.pub"]
        # The broker refuses the revoked site's login...
        import tomllib

        cfg = tomllib.loads((out / a / "site.toml").read_text())
        url_b = cfg["broker_url"].replace(a, b).replace("@", ":whatever@")
        bus = open_bus(url_b)
        with pytest.raises(BusPermissionError, match="login refused"):
            bus.consume(site_queue(b), lambda d: d.ack())
        bus.close()
        # ...and the coordinator no longer trusts its key: its next update is refused.
        store = StateStore(out / "coordinator" / "state")
        assert [s["site_id"] for s in store.sites()] == [a]
        frame = seal(new_envelope(Declined(task_id="t", reason="policy", detail=""), federation=f"fed-{tag}",
                                  run_id="r", round=1, sender=b, recipient="coordinator"), signer_b)
        with pytest.raises(ProtocolError, match="not in the trust store"):
            open_frame(frame, store.trust_store())
        from coordinator.state import StateError

        with pytest.raises(StateError, match="revoked"):
            store.enroll(b, signer_b.public_pem())
        store.close()
        # A wrong password is an auth failure: exit 2, so systemd (RestartPreventExitStatus=2) stops.
        import shutil
        import subprocess
        import sys

        bad = tmp_path / "bad" / "kit"  # the kit's data path is relative to the kit: keep it the same depth
        shutil.copytree(out / a, bad)
        (bad / "broker.password").write_text("not-the-password\n")
        run = subprocess.run([str(Path(sys.executable).with_name("fedbus")), "site", "run", "--config",
                              str(bad / "site.toml")], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr[-2000:]
        assert "login refused" in run.stderr
        # Re-running keeps it revoked while it stays in the project file.
        r = _provision(str(proj), "--out", str(out))
        assert r.exit_code == 0 and "stays revoked" in r.stderr and not (out / b).exists()
        assert json.loads((out / "kits.json").read_text())["revoked"][b]["kid"] == signer_b.kid
    finally:
        from protocol.transport.provision import deprovision

        deprovision(amqp_url, [a, b, f"coordinator-fed-{tag}"])


def test_site_check_reports_the_run_cost_as_opacus_accounts_it(tmp_path: Path) -> None:
    """ε in ``site check``: every round's DP-SGD steps plus its DP metrics release, checked
    against Opacus' own RDP accountant stepped by hand (σ, q = 1/batches, 5 epochs)."""
    import math
    import re

    import pandas as pd
    from opacus.accountants import RDPAccountant

    rows = pd.DataFrame({"x": range(200), "y": [0, 1] * 100})
    csv = tmp_path / "d.csv"
    rows.to_csv(csv, index=False)
    proj = _project(tmp_path, ["h1"], data=csv)
    proj.write_text(proj.read_text().replace('target = "DEATH_EVENT"', 'target = "y"').replace(
        'dataset = "heart_failure"', 'dataset = "d"'))
    out = tmp_path / "kits"
    assert _provision(str(proj), "--out", str(out), "--skip-broker").exit_code == 0
    exp = tmp_path / "exp.json"
    r = CliRunner().invoke(app, ["config", "new", "--dataset", str(csv), "--target", "y", "--rounds", "3",
                                 "--keep", "x", "--out", str(exp)])  # x numbers the rows: kept on purpose
    assert r.exit_code == 0, r.output
    doc = json.loads(exp.read_text())  # a fixed noise multiplier and batches of 32: the arithmetic checked below
    doc["training"].update(epochs=5, batch_size=32)
    doc["training"]["optimizer"]["differential_privacy"] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    exp.write_text(json.dumps(doc))
    r = CliRunner().invoke(app, ["site", "check", "--config", str(out / "h1" / "site.toml"), "--experiment", str(exp)])
    assert r.exit_code == 1  # the broker is not provisioned (--skip-broker): that line fails, the rest runs
    assert "FAIL  broker" in r.stdout and "ok    dataset d" in r.stdout
    (line,) = [ln for ln in r.stdout.splitlines() if "privacy" in ln]
    got = float(re.search(r"cost ε ([0-9.]+)", line).group(1))
    # The site's fixed test split (policy.test_fraction 0.2) and validation split (0.2) leave the
    # training rows; Opacus' sample rate is 1 / batches per epoch at batch size 32.
    n_train = int(re.search(r"(\d+) usable rows", r.stdout).group(1))
    assert n_train <= 200
    acc = RDPAccountant()
    steps_line = re.search(r"rounds of (\d+) steps at noise ([0-9.]+)", line)
    steps, sigma = int(steps_line.group(1)), float(steps_line.group(2))
    batches = steps // 5
    assert sigma == 1.0 and steps == 5 * batches
    doc = json.loads(exp.read_text())
    evals = 3 if doc["federated"]["parameters"].get("fraction_eval", 0) > 0 else 0
    acc.history.append((sigma, 1.0 / batches, 3 * steps))
    # per round its DP metrics release (policy.metrics_noise_multiplier 5), one more per evaluation
    # round, and the final test evaluation: the site's plan (run_budget.site_run_plan)
    acc.history.append((5.0, 1.0, 3 + evals + 1))
    want = acc.get_epsilon(delta=1e-5)
    assert math.isclose(got, want, rel_tol=1e-2), (got, want)
    # and what the metrics releases alone cost, as Opacus accounts them (no union: not a secure run)
    metrics = RDPAccountant()
    metrics.history.append((5.0, 1.0, 3 + evals + 1))
    said = float(re.search(r"metrics releases alone ε ([0-9.]+) at σ_m 5\)", line).group(1))
    assert math.isclose(said, metrics.get_epsilon(delta=1e-5), rel_tol=1e-2), (said, line)


def test_reprovision_never_resets_a_sites_own_budget(tmp_path: Path) -> None:
    """The hospital owns site.toml: its budget (and data path) survive a re-provision byte for
    byte, and the report names a budget that differs from the project's, at the edge."""
    proj = _project(tmp_path, ["hospital-a"])
    out = tmp_path / "kits"
    assert _provision(str(proj), "--out", str(out), "--skip-broker").exit_code == 0
    cfg = out / "hospital-a" / "site.toml"
    assert "max_epsilon = 10 " in cfg.read_text()  # the project's default
    r = _provision(str(proj), "--out", str(out), "--skip-broker", "--json")
    kept = json.loads(r.stdout.splitlines()[0])["kept"]
    assert "site hospital-a site.toml" in kept  # the same budget: nothing to say
    # The hospital lowers its budget just below the project's, and points at its data.
    edited = cfg.read_text().replace("max_epsilon = 10 ", "max_epsilon = 9.99 ").replace(
        "data/heart_failure.csv", "/data/hf.csv")
    cfg.write_text(edited)
    r = _provision(str(proj), "--out", str(out), "--skip-broker", "--json", "--rotate-key", "hospital-a")
    assert r.exit_code == 0, r.output
    assert cfg.read_text() == edited  # not reset, even when rotating the site's key
    import tomllib

    assert tomllib.loads(cfg.read_text())["policy"]["max_epsilon"] == 9.99
    kept = json.loads(r.stdout.splitlines()[0])["kept"]
    assert any("max_epsilon 9.99" in k and "project says 10" in k for k in kept), kept
    assert not any("peers_dir" in k for k in kept), kept  # the kit names its peers: nothing to add
    # A kit written before kits carried peers/: re-provisioning refreshes peers/ but keeps the
    # hospital's file, and says the one line to add to join secure aggregation.
    cfg.write_text("\n".join(ln for ln in edited.splitlines() if not ln.startswith("peers_dir")) + "\n")
    r = _provision(str(proj), "--out", str(out), "--skip-broker", "--json")
    kept = json.loads(r.stdout.splitlines()[0])["kept"]
    assert any('add peers_dir = "peers"' in k for k in kept) and (out / "hospital-a" / "peers" / "hospital-a.pub").exists()


def test_the_project_sets_the_kits_test_fraction_and_a_site_may_override_it(tmp_path: Path) -> None:
    """``test_fraction`` in [federation] goes into every kit's [policy] (a site's own entry wins), the
    site reads it back as its policy, and a value outside the policy's range names the key."""
    from site_worker.config import load_site_config

    data = tmp_path / "rows.csv"
    data.write_text("age,DEATH_EVENT\n60,1\n50,0\n")
    proj = _project(tmp_path, ["hospital-a", "hospital-b"], data=data)
    text = proj.read_text().replace('target = "DEATH_EVENT"', 'target = "DEATH_EVENT"\ntest_fraction = 0.4', 1)
    proj.write_text(text.replace('id = "hospital-b"', 'id = "hospital-b"\ntest_fraction = 0.89'))
    out = tmp_path / "kits"
    r = _provision(str(proj), "--out", str(out), "--skip-broker")
    assert r.exit_code == 0, r.output
    fractions = {s: load_site_config(out / s / "site.toml").policy.test_fraction for s in ("hospital-a", "hospital-b")}
    assert fractions == {"hospital-a": 0.4, "hospital-b": 0.89}
    for bad in ("0.9", "0", "true"):  # just outside the policy's range (0 < f < 0.9), and not a number
        proj.write_text(text.replace("test_fraction = 0.4", f"test_fraction = {bad}"))
        r = _provision(str(proj), "--out", str(tmp_path / f"k{bad}"), "--skip-broker")
        assert r.exit_code == 2 and "federation.test_fraction: must be a number above 0 and below 0.9" in r.stderr, r.output
    # without it the kit keeps the policy's default
    (tmp_path / "p").mkdir()
    plain = _project(tmp_path / "p", ["hospital-c"], data=data)
    assert _provision(str(plain), "--out", str(tmp_path / "kp"), "--skip-broker").exit_code == 0
    from protocol.policy import SitePolicy

    assert load_site_config(tmp_path / "kp" / "hospital-c" / "site.toml").policy.test_fraction == SitePolicy().test_fraction
