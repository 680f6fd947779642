"""Portable, least-privilege kits: no path of the provisioning machine in a kit; the systemd
unit runs as an unprivileged user with its own state directory; a kit copied elsewhere starts
and passes ``site check``, which always opens the data file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from fedbus.cli import app
from fedbus.site_check import run_checks
from site_worker.config import STATE_DIR_ENV, load_site_config


def _project(tmp: Path, sites: list[str], *, data: Path, broker: str = "amqp://127.0.0.1:5672/%2F",
             admin: str = "amqp://guest:guest@127.0.0.1:5672/%2F", fed: str = "cardio", install: str | None = None) -> Path:
    lines = ["[federation]", f'name = "{fed}"', f'broker = "{broker}"', f'admin = "{admin}"',
             'dataset = "heart_failure"', 'target = "DEATH_EVENT"'] + ([f'install_dir = "{install}"'] if install else [])
    for s in sites:
        lines += ["", "[[sites]]", f'id = "{s}"', f'data = "{data.name}"']
    p = tmp / "project.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def _data(path: Path) -> Path:
    path.write_text("age,ejection_fraction,DEATH_EVENT\n" + "".join(f"{50 + i},{30 + i % 7},{i % 2}\n" for i in range(40)))
    return path


def test_no_kit_file_names_a_path_of_the_provisioning_machine(tmp_path: Path) -> None:
    proj_dir = tmp_path / "project"
    proj_dir.mkdir()
    data = _data(proj_dir / "hospital-a.csv")
    proj = _project(proj_dir, ["hospital-a"], data=data)
    out = proj_dir / "kits"
    r = CliRunner().invoke(app, ["provision", str(proj), "--out", str(out), "--skip-broker"])
    assert r.exit_code == 0, r.output
    kit = out / "hospital-a"
    provisioner = {str(tmp_path), str(Path(sys.executable).parent), str(Path.cwd())}
    for f in kit.rglob("*"):
        if f.is_file() and f.suffix not in (".key", ".pub") and f.name != "broker.password":
            text = f.read_text(encoding="utf-8")
            for p in provisioner:
                assert p not in text, f"{f.name} names {p}"
    cfg = tomllib.loads((kit / "site.toml").read_text())
    assert cfg["datasets"]["heart_failure"]["path"] == "../../hospital-a.csv"  # relative to the kit
    unit = (kit / "fedbus-site.service").read_text()
    for line in ("User=fedbus", "Group=fedbus", "StateDirectory=fedbus-hospital-a", "StateDirectoryMode=0700",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "Environment=FEDBUS_KIT_DIR=/opt/fedbus/hospital-a",
                 "Environment=FEDBUS_STATE_DIR=%S/fedbus-hospital-a",
                 "ExecStart=/usr/bin/env fedbus site run --config ${FEDBUS_KIT_DIR}/site.toml"):
        assert line in unit.splitlines(), line
    assert "User=root" not in unit and "DynamicUser=no" not in unit
    # The one setting follows the project's install_dir.
    proj.write_text(proj.read_text().replace('target = "DEATH_EVENT"', 'target = "DEATH_EVENT"\ninstall_dir = "/srv/kits/"'))
    assert CliRunner().invoke(app, ["provision", str(proj), "--out", str(out), "--skip-broker"]).exit_code == 0
    assert "Environment=FEDBUS_KIT_DIR=/srv/kits/hospital-a" in (kit / "fedbus-site.service").read_text().splitlines()


def test_the_state_dir_setting_replaces_site_tomls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proj_dir = tmp_path / "p"
    proj_dir.mkdir()
    proj = _project(proj_dir, ["h1"], data=_data(proj_dir / "d.csv"))
    assert CliRunner().invoke(app, ["provision", str(proj), "--out", str(proj_dir / "kits"), "--skip-broker"]).exit_code == 0
    cfg = proj_dir / "kits" / "h1" / "site.toml"
    assert load_site_config(cfg).state_dir == (proj_dir / "kits" / "h1" / "state").resolve()
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "var-lib"))
    assert load_site_config(cfg).state_dir == tmp_path / "var-lib"
    monkeypatch.setenv(STATE_DIR_ENV, "relative/state")
    r = CliRunner().invoke(app, ["site", "check", "--config", str(cfg)])
    assert r.exit_code != 0 and "state_dir" in r.output and "Traceback" not in r.output


def test_site_check_always_opens_the_data_and_checks_the_target(tmp_path: Path) -> None:
    proj_dir = tmp_path / "p"
    proj_dir.mkdir()
    proj = _project(proj_dir, ["h1"], data=_data(proj_dir / "d.csv"))
    assert CliRunner().invoke(app, ["provision", str(proj), "--out", str(proj_dir / "kits"), "--skip-broker"]).exit_code == 0
    cfg = proj_dir / "kits" / "h1" / "site.toml"
    (line,) = [c for c in run_checks(cfg, None, broker_timeout_s=0.5) if c.name == "dataset heart_failure"]
    assert line.ok and "40 rows" in line.detail and "2 feature columns" in line.detail
    cfg.write_text(cfg.read_text().replace('target = "DEATH_EVENT"', 'target = "DEATH_EVENTS"'))
    (line,) = [c for c in run_checks(cfg, None, broker_timeout_s=0.5) if c.name == "dataset heart_failure"]
    assert not line.ok and "DEATH_EVENTS" in line.detail
    cfg.write_text(cfg.read_text().replace('target = "DEATH_EVENTS"', 'target = "DEATH_EVENT"').replace(
        '"../../d.csv"', '"../../missing.csv"'))
    checks = run_checks(cfg, None, broker_timeout_s=0.5)  # a missing file: site.toml itself is refused
    assert not all(c.ok for c in checks) and any("missing.csv" in c.detail for c in checks if not c.ok)


def _provisioned(tmp_path: Path, amqp_url: str, prefix: str) -> tuple[str, str, Path, Path, Path]:
    """A one-site project on the test's vhost: (site, tag, provisioner folder, data file, project.toml)."""
    tag = uuid.uuid4().hex[:8]
    site = f"{prefix}-{tag}"
    vhost = urlsplit(amqp_url).path
    proj_dir = tmp_path / "provisioner"
    proj_dir.mkdir()
    data = _data(proj_dir / "hf.csv")
    proj = _project(proj_dir, [site], data=data, broker=f"amqp://127.0.0.1:5672{vhost}", admin=amqp_url,
                    fed=f"fed-{tag}")
    return site, tag, proj_dir, data, proj


@pytest.mark.slow
def test_a_kit_copied_to_another_folder_starts_and_passes_site_check(tmp_path: Path, amqp_url: str) -> None:
    """Provisioned in one folder, the kit (and the data, where the hospital keeps it) copied to
    another and the original deleted: ``site check`` passes every line (broker login included)
    and ``site run`` starts (its hello reaches the broker) from an unrelated working directory.
    Run as another user: ``test_a_copied_kit_runs_as_an_unprivileged_user``."""
    site, tag, proj_dir, data, proj = _provisioned(tmp_path, amqp_url, "port")
    try:
        r = CliRunner().invoke(app, ["provision", str(proj), "--out", str(proj_dir / "kits")])
        assert r.exit_code == 0, r.output
        hospital = tmp_path / "hospital" / "opt"
        kit = hospital / "fedbus" / site
        shutil.copytree(proj_dir / "kits" / site, kit)
        rel = tomllib.loads((kit / "site.toml").read_text())["datasets"]["heart_failure"]["path"]
        (kit / rel).resolve().parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data, (kit / rel).resolve())
        shutil.rmtree(proj_dir)  # nothing of the provisioning machine is left
        fedbus = str(Path(sys.executable).with_name("fedbus"))
        elsewhere = tmp_path / "cwd"
        elsewhere.mkdir()
        check = subprocess.run([fedbus, "site", "check", "--config", str(kit / "site.toml")], cwd=elsewhere,
                               capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr[-2000:]
        assert "ok    dataset heart_failure" in check.stdout and "ok    broker: logged in" in check.stdout
        proc = subprocess.Popen([fedbus, "site", "run", "--config", str(kit / "site.toml")], cwd=elsewhere,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            started = _wait_for_line(proc, "hello", timeout_s=90)
            assert started, "the copied kit's site never said hello"
            assert (kit / "state").is_dir()  # its state lands in the copy, not the provisioner's folder
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    finally:
        from protocol.transport.provision import deprovision

        deprovision(amqp_url, [site, f"coordinator-fed-{tag}"])


DEBIAN_PYTHON = Path("/usr/bin/python3.11")  # the system's interpreter: the venv's lives under /root (0700)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None or not DEBIAN_PYTHON.exists()
                    or sys.version_info[:2] != (3, 11),
                    reason="needs root (runuser), Debian's python3.11 and a 3.11 venv")
def test_a_copied_kit_runs_as_an_unprivileged_user(tmp_path: Path, amqp_url: str) -> None:
    """Issue 24 (kits travel): the kit copied to the hospital's folder and handed to an unprivileged
    user (``nobody``, as the unit's ``User=`` would) passes ``site check`` and starts ``site run``
    as that user: its keys, data and state are its own, nothing needs root. The interpreter is
    Debian's python3.11 over the project's installed packages (the venv's own python sits under
    /root, which no other user may enter on this machine)."""
    import pwd
    import tempfile

    site, tag, proj_dir, data, proj = _provisioned(tmp_path, amqp_url, "user")
    hospital = Path(tempfile.mkdtemp(prefix="fedbus-hospital-", dir="/tmp"))  # pytest's tmp is root's alone
    nobody = pwd.getpwnam("nobody")
    try:
        r = CliRunner().invoke(app, ["provision", str(proj), "--out", str(proj_dir / "kits")])
        assert r.exit_code == 0, r.output
        kit = hospital / "opt" / "fedbus" / site
        shutil.copytree(proj_dir / "kits" / site, kit)
        rel = tomllib.loads((kit / "site.toml").read_text())["datasets"]["heart_failure"]["path"]
        (kit / rel).resolve().parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data, (kit / rel).resolve())
        for p in [hospital, *hospital.rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
        hospital.chmod(0o755)
        site_packages = next(Path(sys.prefix).glob("lib/python3.11/site-packages"))
        if subprocess.run(["runuser", "-u", "nobody", "--", "test", "-r", str(site_packages / "torch" / "__init__.py")],
                          timeout=30).returncode != 0:
            pytest.skip(f"{site_packages} is not readable by an unprivileged user here")
        # fedbus as the hospital installs it: its packages in a folder the service user may read
        repo, app_dir = Path(__file__).resolve().parents[2], hospital / "app"
        for package in ("fedbus", "protocol", "site_worker", "coordinator", "simulator"):
            shutil.copytree(repo / package, app_dir / package, ignore=shutil.ignore_patterns("__pycache__"))
        for p in [hospital, *hospital.rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
        as_nobody = ["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={app_dir}{os.pathsep}{site_packages}",
                     f"HOME={hospital}", str(DEBIAN_PYTHON), "-m", "fedbus.cli", "site"]
        check = subprocess.run([*as_nobody, "check", "--config", str(kit / "site.toml")], cwd=hospital,
                               capture_output=True, text=True, timeout=180)
        assert check.returncode == 0, check.stdout + check.stderr[-2000:]
        assert "ok    dataset heart_failure" in check.stdout and "ok    broker: logged in" in check.stdout
        proc = subprocess.Popen([*as_nobody, "run", "--config", str(kit / "site.toml")], cwd=hospital,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert _wait_for_line(proc, "hello", timeout_s=120), "the site never said hello as nobody"
            state = kit / "state"
            assert state.is_dir() and state.stat().st_uid == nobody.pw_uid  # its state is the user's own
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    finally:
        shutil.rmtree(hospital, ignore_errors=True)
        from protocol.transport.provision import deprovision

        deprovision(amqp_url, [site, f"coordinator-fed-{tag}"])


def _wait_for_line(proc: subprocess.Popen[str], needle: str, *, timeout_s: float) -> bool:
    import selectors
    import time

    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stderr.readline()
        if not line:
            return False
        if needle in line.lower():
            return True
    return False
