"""The fixed cost per run stays low: no library a run does not use is imported.

Imports are most of a run's cost outside its rounds (bench/README.md, "Fixed cost per run"):
Opacus alone costs about 2 CPU seconds, scikit-learn about 1. Each test runs in a fresh
interpreter (``sys.modules`` is the evidence) and does the real work: a coordinator run
without site DP, a site's warm-up and its binary metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(REPO), env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


COORDINATOR_RUN = """
    import json, sys, tempfile, uuid
    from pathlib import Path
    from protocol.logs import configure_logging
    configure_logging("cli", level="error")
    from tests.coordinator.conftest import Federation, experiment
    from protocol.signing import Signer
    from protocol.transport import open_bus

    url = f"memory://fixed-cost-{uuid.uuid4().hex[:8]}"
    fed = Federation(bus_url=url, bus=open_bus(url), state_dir=Path(tempfile.mkdtemp()) / "state",
                     federation="fixed-cost", signer=Signer.generate())
    fed.add_site(1.0, 10)
    fed.add_site(3.0, 30)
    fed.start_sites()
    exp = experiment(rounds=1)
    DP
    result = fed.coordinator(exp).run()
    print(json.dumps({"status": result.status, "privacy": result.privacy,
                      "opacus": sorted(m for m in sys.modules if m.split(".")[0] == "opacus")[:3],
                      "planner": "coordinator.privacy_plan" in sys.modules}))
"""


def test_a_coordinator_run_without_site_dp_never_imports_opacus() -> None:
    out = _run(COORDINATOR_RUN.replace("DP", "pass"))
    assert out["status"] == "completed"
    assert out["opacus"] == []
    assert out["planner"] is False  # not even the budget arithmetic's module (its imports are lazy today)
    assert "planned_epsilon" not in out["privacy"]  # no plan without DP, as before


def test_a_coordinator_run_with_site_dp_still_plans_privacy() -> None:
    dp = 'exp["training"]["optimizer"] = {"type": "sgd", "learning_rate": 0.1, "differential_privacy": ' \
         '{"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}}'
    out = _run(COORDINATOR_RUN.replace("DP", dp))
    assert out["status"] == "completed"
    assert out["privacy"]["planned_epsilon"], out["privacy"]  # the plan before round 1, per site
    assert out["opacus"]  # its accountant does the arithmetic


def test_site_warm_up_and_binary_metrics_never_import_scikit_learn() -> None:
    out = _run("""
        import json, sys
        import torch
        from site_worker.daemon import SiteWorker
        from site_worker.metrics import task_metrics
        SiteWorker.warm_up(None)  # what a site pays before it says hello
        y = torch.tensor([0.0, 1.0, 1.0, 0.0])
        m = task_metrics(torch.tensor([[-2.0], [1.5], [-0.5], [0.3]]), y, loss_name="bce_with_logits", task="binary")
        before = sorted(k for k in sys.modules if k.split(".")[0] == "sklearn")
        mc = task_metrics(torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]]), torch.tensor([0, 1, 2]),
                          loss_name="cross_entropy", task="multiclass")
        print(json.dumps({"sklearn": before, "auc": m["auc"], "f1": m["f1"], "mc": mc}))
    """)
    assert out["sklearn"] == []
    assert out["auc"] == 0.75 and out["f1"] == 0.5  # binary metrics still computed (numpy)
    assert out["mc"]["auc"] == 1.0 and out["mc"]["f1"] == 1.0  # multiclass still goes through scikit-learn
