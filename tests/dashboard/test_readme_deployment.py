"""The README's deployment, followed verbatim, then read in Debian's chromium (issue 24, Must show).

The ```bash block under "Deployment" in README.md is taken from the README itself and run by
bash as written, with three substitutions that keep it from touching anyone else's broker
state: the test's private vhost for ``%2F``, and a per-test tag in the federation's and the
hospitals' names (they are broker users, global to the node). ``.venv`` is this test's
interpreter's venv. The test holds the block at its last line (``kill %1 %2 %3``) while it looks:

* while the coordinator runs, the sites page shows the three hospitals "online" from their
  heartbeats;
* after the run, every test figure on the run page (headline, per site, personalised) carries
  a 95 % interval ("72.7 % (51–89)") or says "too few test rows for this budget", and each
  site's figures are mutually consistent: accuracy = prevalence · sensitivity + (1 −
  prevalence) · specificity for the prevalence its majority baseline implies, every figure
  inside its interval and in [0, 1];
* then the block's ``kill`` ends the sites, and the script exits 0.

With ``FEDBUS_DASHBOARD_SCREENSHOTS=DIR`` the run and sites pages are saved there as
``deployment-run.png`` and ``deployment-sites.png`` (docs/img/ holds the committed ones).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from fedbus.dashboard.data import StateReader
from fedbus.dashboard.server import BackgroundServer, ServeOptions
from fedbus.dashboard.views import run_doc, sites_doc

ROOT = Path(__file__).resolve().parents[2]
INTERVAL = re.compile(r"\(\d+(\.\d+)?–\d+(\.\d+)?\)")
TOO_FEW = "too few test rows for this budget"
LAST = "kill %1 %2 %3"

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(900)]


def readme_block() -> str:
    """The bash block of README.md's "Deployment" section, as a reader copies it."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.rstrip().endswith(LAST), "the README block no longer ends by stopping its sites"
    return block


def _wait(pred, timeout_s: float, what: str):
    step, deadline = threading.Event(), time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        step.wait(0.25)


def _shots() -> Path | None:
    d = os.environ.get("FEDBUS_DASHBOARD_SCREENSHOTS")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d) if d else None


def _consistent(site: str, t: dict, majority: float | None) -> None:
    """One site's released figures read one confusion matrix (within float rounding)."""
    print(site, {k: t.get(k) for k in ("accuracy", "sensitivity", "specificity")}, t.get("ci"), majority)
    for k, v in t.items():
        if k not in t.get("ci", {}) or v is None:  # loss: no interval, not shown as a test figure
            continue
        assert 0.0 <= v <= 1.0, (site, k, v)
        lo, hi = t["ci"][k]
        assert lo - 1e-9 <= v <= hi + 1e-9, (site, k, v, lo, hi)
    acc, sens, spec = t.get("accuracy"), t.get("sensitivity"), t.get("specificity")
    if None in (acc, sens, spec, majority):
        return
    fits = [abs(p * sens + (1 - p) * spec - acc) for p in (majority, 1 - majority)]
    assert min(fits) < 1e-6, (site, acc, sens, spec, majority, fits)


def test_the_readme_deployment_verbatim_then_its_pages_in_chromium(tmp_path: Path, amqp_url: str, browser) -> None:
    tag = uuid.uuid4().hex[:6]
    vhost = urlsplit(amqp_url).path.lstrip("/")
    script = (readme_block()
              .replace("/%2F", f"/{vhost}")
              .replace('name = "cardio"', f'name = "cardio-{tag}"')
              .replace("hospital-", f"hospital-{tag}-")
              .replace(LAST, "touch ../walk-ready; while [ ! -e ../walk-done ]; do sleep 0.2; done\n" + LAST))
    sites = [f"hospital-{tag}-{c}" for c in "abc"]
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    (tmp_path / "walk.sh").write_text(script)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    err = open(tmp_path / "walk.err", "wb")
    walk = subprocess.Popen(["bash", "-e", "walk.sh"], cwd=tmp_path, env=env, stdout=open(tmp_path / "walk.out", "wb"),
                            stderr=err, start_new_session=True)
    state = tmp_path / "demo" / "kits" / "coordinator" / "state"
    server = None
    t0 = time.monotonic()
    try:
        def alive():
            assert walk.poll() is None, (tmp_path / "walk.err").read_text()[-4000:]
            if not (state / "coordinator.db").exists():
                return None
            doc = sites_doc(StateReader(state))
            live = {s["site_id"] for s in doc["sites"] if s["liveness"] == "online"}
            return doc if doc["monitored"] and live == set(sites) else None

        _wait(alive, 600, "the coordinator's run with the three hospitals online")
        server = BackgroundServer(ServeOptions(state=state, port=0)).start()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server.base}/sites")
        for s in sites:
            cell = page.locator(f'tr[data-site="{s}"] td.liveness')
            cell.wait_for(timeout=30_000)
            assert cell.get_attribute("data-liveness") == "online" and "online" in cell.inner_text()
        if _shots():
            page.screenshot(path=str(_shots() / "deployment-sites.png"), full_page=True)

        _wait(lambda: (tmp_path / "walk-ready").exists() or walk.poll() is not None, 600, "the README block's run")
        assert walk.poll() is None, (tmp_path / "walk.err").read_text()[-4000:]
        run = json.loads((tmp_path / "demo" / "run.json").read_text())
        assert run["status"] == "completed", run.get("gaps")
        print("final:", json.dumps(run["final"])[:3000])
        doc = run_doc(StateReader(state), run["run_id"])
        for row in doc["sites"]:
            _consistent(row["site"], row["test"], row["majority_class_accuracy"])
        page.goto(f"{server.base}/runs/{run['run_id']}")
        table = page.locator("#run-sites")
        table.wait_for(timeout=30_000)
        cells = page.locator("#kpis .kpi:not([data-kpi=epsilon]) .value, #run-sites td.test-accuracy, #run-sites td.test-auc, "
                             "#run-sites td.test-f1, #run-sites td.test-sensitivity, #run-sites td.test-specificity, "
                             "#run-sites td.majority, #run-sites td.personalized-accuracy, #run-sites td.personalized-auc")
        texts = [t for t in cells.all_inner_texts()]
        assert len(texts) >= 3 * 7, texts
        bare = [t for t in texts if not (INTERVAL.search(t) or TOO_FEW in t or "ε" in t or t.strip() in ("", "–"))]
        assert not bare, f"test figures without an interval: {bare}"
        # At the kits' metrics noise (σ_m 5) and ~40 test rows a site, many per-site figures say
        # TOO_FEW; the union's accuracy comes from the secure sum (σ_u, noise once, ~120 test rows)
        # and always carries its interval (bench/union_interval.py: about ±9 points).
        assert run["final"]["union_source"] == "secure_sum", run["final"].get("union_source")
        assert INTERVAL.search(texts[0]) and TOO_FEW not in texts[0], texts[0]
        assert sum(bool(INTERVAL.search(t)) for t in texts) >= 3, texts
        # Per-round figures: every per-site figure the sites released under DP carries its interval
        # (or is withheld as too uncertain), and the curves draw the shown ones as whiskers. How many
        # are shown depends on the secret noise (at σ_m 5 most are withheld), so the count is not fixed.
        shown = 0
        for r in doc["rounds"]:
            for site, blocks in r["per_site"].items():
                for split in ("validation", "test"):
                    f = (blocks or {}).get(split)
                    if not f or f.get("accuracy") is None:
                        continue
                    assert "accuracy" in (f.get("ci") or {}), (r["round"], site, split, f)
                    shown += "accuracy" not in (f.get("withheld") or {})
        # Under DP metrics each site's test-row count is the released matrix's noisy total: marked "≈".
        rows = page.locator("#site-results td.test-rows").all_inner_texts()
        assert rows and all(t.startswith("≈ ") for t in rows), rows
        # The per-site tables fit the window (a wide one scrolls inside its card).
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), \
            page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        whiskers = page.locator('.card[data-metric="accuracy"] line.ci')
        assert (whiskers.count() >= 1) == (shown >= 1), (whiskers.count(), shown)
        assert not errors, errors
        if _shots():
            page.screenshot(path=str(_shots() / "deployment-run.png"), full_page=True)
        lo, hi = run["final"]["ci"]["accuracy"]
        print(f"README walk: run {run['run_id']} {time.monotonic() - t0:.0f} s; union accuracy "
              f"{run['final']['accuracy']:.3f} ({lo:.3f}-{hi:.3f}, ±{50 * (hi - lo):.1f} points); final {doc['final']['test']}")
    finally:
        (tmp_path / "walk-done").touch()
        if server is not None:
            server.stop()
        try:
            rc = walk.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(walk.pid, signal.SIGKILL)
            rc = walk.wait(timeout=30)
        try:  # a block that failed before its `kill` leaves its site daemons running in its process group
            os.killpg(walk.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        err.close()
        from protocol.transport.provision import ProvisionError, deprovision

        try:  # cleanup of the shared broker's users: a busy rabbitmqctl must not fail the walk
            deprovision(amqp_url, [*sites, f"coordinator-cardio-{tag}"])
        except ProvisionError as e:
            import warnings

            warnings.warn(f"broker users of the walk left behind: {e}", stacklevel=1)
    assert rc == 0, (tmp_path / "walk.err").read_text()[-4000:]
