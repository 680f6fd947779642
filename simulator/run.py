"""``simulate()``: a whole federation on one machine, through the production code path.

Steps: load the experiment (``--seed``/``--rounds`` applied to it, so the experiment
"as run" says what ran), load and partition the data, lay out keys, per-site files and
configs and enroll the sites (``workspace``), start the site workers (in this process
on a private in-memory broker, or one OS process each on a real broker), run the
production ``Coordinator`` (which, after the rounds, has every site score the final model
on its own fixed test split and, when the experiment personalises, fine-tune and report its
personalised model: ``coordinator/final.py``), then score the final global model on the
rows the simulator held back from every site (``holdout``) and, with ``baselines``, train
the pooled and local-only baselines on those same held-out rows for comparison. ``out``
receives the coordinator's state directory and the report.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from protocol.broker_url import redact
from simulator.datasets import DatasetError, load_dataset
from site_worker.data import DataError
from simulator.faults import FaultLog, FaultSpecError, parse_faults
from simulator.errors import SimulationFailed, SimulationInputError  # noqa: F401 - callers import them from here
from simulator.partitions import PartitionError, make_partition, parse_spec
from simulator import scoring

if TYPE_CHECKING:
    from protocol.config import Experiment

log = structlog.get_logger(__name__)

# Rows the simulator holds back from every site (baselines and the per-round curves use them).
HOLDOUT_SPLIT = "simulator held-out rows (never at any site)"


def _load_experiment(path: str | Path | dict[str, Any], *, seed: int | None, rounds: int | None) -> Experiment:
    from coordinator.secagg import refuse_until_wired
    from protocol.config import ConfigError, apply_overrides, load_experiment

    if isinstance(path, dict):
        raw = json.loads(json.dumps(path))
    else:
        p = Path(path)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SimulationInputError(f"experiment file {p} does not exist") from None
        except json.JSONDecodeError as e:
            raise SimulationInputError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise SimulationInputError("the experiment must be a JSON object")
    if isinstance(raw.setdefault("training", {}), dict) and rounds is not None and rounds < 1:
        raise SimulationInputError(f"--rounds must be >= 1, got {rounds}")
    apply_overrides(raw, {"seed": None if seed is None else int(seed), "rounds": None if rounds is None else int(rounds)})
    try:
        exp = load_experiment(raw)
        refuse_until_wired(exp)
    except ConfigError as e:
        raise SimulationInputError(f"experiment: {e}") from None
    from coordinator.aggregators import unknown_name

    why = unknown_name(str(exp.federated.name))
    if why is not None:
        raise SimulationInputError(f"experiment: federated.name: {why}")
    return exp


def _check_columns(exp: Any, data: Any, *, target: str | None) -> None:
    """The experiment's target and features name columns of the data (tabular), before any
    site starts: one line naming the key and the closest column, not a traceback from a site."""
    import difflib

    frame = getattr(data, "frame", None)
    if getattr(data, "kind", None) != "tabular" or frame is None:
        return
    cols = [str(c) for c in frame.columns]

    def missing(key: str, name: str) -> SimulationInputError:
        close = difflib.get_close_matches(name, cols, n=1)
        return SimulationInputError(
            f"experiment: {key} {name!r} is not a column of {data.name}"
            + (f" (did you mean {close[0]!r}?)" if close else f"; columns: {', '.join(cols[:40])}"))

    if target is None and exp.dataset.target and exp.dataset.target not in cols:
        raise missing("dataset.target", str(exp.dataset.target))
    for i, f in enumerate(exp.dataset.features or []):
        if f not in cols:
            raise missing(f"dataset.features[{i}]", str(f))


def _need_dataset_option(exp: Experiment, experiment_path: Any) -> None:
    """The experiment names data fedbus does not bundle (a MediNet export's hospital dataset):
    say exactly what to run instead of failing on the name."""
    from simulator.datasets import BUILTIN, canonical_name

    name = exp.dataset.name
    if canonical_name(name) is not None or Path(name).exists():
        return
    where = str(experiment_path) if isinstance(experiment_path, (str, Path)) else "EXPERIMENT.json"
    selected = (exp.dataset.selected_datasets or [{}])[0]
    width = (selected.get("features_info") or {}).get("input_features") if isinstance(selected, dict) else None
    shape = f" with {width} encoded input columns" if width else ""
    target = f" and target column {exp.dataset.target!r}" if exp.dataset.target else ""
    raise SimulationInputError(
        f"the experiment's dataset {name!r} is not one fedbus bundles ({', '.join(BUILTIN)}). Point it at your copy "
        f"of the data (a CSV or Parquet file{shape}{target}):\n    fedbus simulate {where} --dataset FILE.csv"
    )


def _fit_to_file(exp: Experiment, data: Any) -> Any:
    """The experiment with a file-safe dataset key, and its features taken from the file when it
    declares none (a MediNet export: ``features_info.input_features`` must match the file's
    encoded columns, else the model's input layer would not fit)."""
    from protocol.config import ConfigError, load_experiment
    from site_worker.columns import plan_columns, safe_key

    wire = exp.to_wire()
    ds = wire["dataset"]
    ds["name"] = safe_key(exp.dataset.name)
    if data.kind == "tabular" and exp.dataset.features is None:
        plan = plan_columns(data.frame, target=data.target, exclude=tuple(exp.dataset.exclude))
        want = exp.input_shape[0] if len(exp.input_shape) == 1 else None
        if want is not None and plan.width != want:
            cats = ", ".join(f"{c} ({len(v)})" for c, v in plan.categorical.items()) or "none"
            raise SimulationInputError(
                f"--dataset {data.name}: the file encodes to {plan.width} input columns "
                f"({len(plan.features) - len(plan.categorical)} numeric + one-hot of {cats}), the experiment's model "
                f"takes {want}; use the file the experiment was designed on, or list dataset.features/categorical"
                + (f" (left out: {', '.join(plan.excluded)})" if plan.excluded else "")
            )
        ds["features"] = plan.features
        ds["categorical"] = plan.categorical
    try:
        return load_experiment(wire)
    except ConfigError as e:
        raise SimulationInputError(f"experiment with --dataset {data.name}: {e}") from None


def simulate(
    experiment_path: str | Path | dict[str, Any],
    sites: int | None = None,
    partition: str = "iid",
    dataset: str | None = None,
    broker: str = "memory",
    rounds: int | None = None,
    out: str | Path | None = None,
    baselines: bool = False,
    faults: str | None = None,
    json_out: bool = False,
    *,
    target: str | None = None,
    seed: int | None = None,
    site_suffix: str = "",
    rows: int | None = None,
    round_timeout_s: float | None = None,
    progress: bool = True,
    keep_work: bool | None = None,
    reproducible_dp: bool = False,
    site_budget: float | None = None,
    cohort_only: bool = False,
    bins: int | None = None,
    site_metrics: str = "exact",
    site_test_fraction: float | None = None,
    broker_users: bool = False,
) -> dict[str, Any]:
    """Run the experiment over simulated sites; returns the docs/design.md result document.

    ``cohort_only``: train nothing; ask the sites for the cohort table (``simulator.cohort``)
    with ``bins`` histogram bins, and return the cohort document instead.

    ``site_metrics`` is every simulated site's ``policy.metrics`` ("exact", the research default;
    "dp" as a hospital's kit; bench/dp_interval_check.py); ``site_test_fraction`` their
    ``policy.test_fraction`` (None: the policy's default; the README demo's kits: 0.4). ``site_budget`` is every simulated site's ``max_epsilon`` (lifetime, per dataset; None: no
    limit, the research default). Either way each site announces the ε it has spent.

    ``site_suffix`` is appended to every site id (tests sharing a broker use a unique one;
    site ids seed the tasks, so compare runs only with the same suffix). ``rows`` sizes
    generated datasets (ecg_synthetic). ``json_out`` prints the document on stdout.
    """
    import torch

    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    # Many tiny trainers share a few cores: intra-op threads only add spin contention
    # (measured 14x slower MLP steps on a loaded 2-core machine). Restored at the end.
    torch.set_num_threads(1)
    try:
        return _simulate(experiment_path, sites, partition, dataset, broker, rounds, out, baselines, faults, json_out,
                         target=target, seed=seed, site_suffix=site_suffix, rows=rows,
                         round_timeout_s=round_timeout_s, progress=progress, keep_work=keep_work, t_start=t_start,
                         reproducible_dp=reproducible_dp, site_budget=site_budget, cohort_only=cohort_only,
                         bins=bins, site_metrics=site_metrics, site_test_fraction=site_test_fraction,
                         broker_users=broker_users)
    finally:
        torch.set_num_threads(threads)


def _simulate(experiment_path: Any, sites: int | None, partition: str, dataset: str | None, broker: str,
              rounds: int | None, out: Any, baselines: bool, faults: str | None, json_out: bool, *,
              target: str | None, seed: int | None, site_suffix: str, rows: int | None,
              round_timeout_s: float | None, progress: bool, keep_work: bool | None, t_start: float,
              score_rounds_max_sites: int = 100, reproducible_dp: bool = False,
              site_budget: float | None = None, cohort_only: bool = False, bins: int | None = None,
              site_metrics: str = "exact", site_test_fraction: float | None = None,
              broker_users: bool = False) -> dict[str, Any]:
    exp = _load_experiment(experiment_path, seed=seed, rounds=rounds)
    run_seed = int(exp.training.seed)
    try:
        spec = parse_spec(partition)
        plan = parse_faults(faults, seed=run_seed)
    except (PartitionError, FaultSpecError) as e:
        raise SimulationInputError(str(e)) from None
    ds_name = dataset or exp.dataset.name
    if dataset is None:
        _need_dataset_option(exp, experiment_path)
    try:
        data = load_dataset(ds_name, target=target or exp.dataset.target, seed=run_seed, rows=rows)
        _check_columns(exp, data, target=target)
        exp = _fit_to_file(exp, data) if dataset is not None else exp
        groups = data.column(spec.column) if spec.kind == "natural" else None
        part = make_partition(data.labels, spec, sites=sites, seed=run_seed, groups=groups)
    except (DatasetError, PartitionError, DataError) as e:
        raise SimulationInputError(str(e)) from None
    ids = {s: f"{s}{site_suffix}" for s in part.sites}
    unknown = plan.sites_named() - set(ids.values())
    if unknown:
        raise SimulationInputError(
            f"--faults names site(s) {sorted(unknown)} that are not in this run; sites: {sorted(ids.values())}"
        )

    memory = broker in ("memory", "memory://")
    if not memory and urlsplit(broker).scheme not in ("amqp", "amqps"):
        raise SimulationInputError(f"--broker {broker!r}: use memory or an amqp:// URL")
    tag = uuid.uuid4().hex[:10]
    federation = f"sim-{tag}"
    url = f"memory://sim-{tag}" if memory else broker

    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        work = out_dir / "work"
        coord_state = out_dir / "coordinator"
    else:
        work = Path(tempfile.mkdtemp(prefix="fedbus-sim-"))
        coord_state = work / "coordinator"

    with _site_users(url, list(ids.values()), enabled=broker_users and not memory) as site_urls:
        from simulator.workspace import build_workspace

        t_ws = time.perf_counter()
        ws = build_workspace(
            work / tag, data=data, partition=part, site_ids=ids, federation=federation, broker_url=url,
            dataset_name=exp.dataset.name, coordinator_state=coord_state,
            dp_seed=run_seed if reproducible_dp else None, split_seed=run_seed, site_budget=site_budget,
            peers=exp.federated.secure_aggregation is not None, site_metrics=site_metrics,
            site_test_fraction=site_test_fraction, site_broker_urls=site_urls,
        )
        if cohort_only:
            return _cohort_only(exp, ws, memory=memory, url=url, federation=federation, bins=bins, out_dir=out_dir,
                                work=work, keep_work=keep_work, json_out=json_out, sites=ids, groups=part.groups)
        fault_log = FaultLog()
        try:
            from simulator import privacy

            planned = privacy.plan(exp, ws, input_shape=scoring.input_shape(exp))  # the coordinator shows and stores it
            t_run = time.perf_counter()
            result, timing = _run_federation(exp, ws, memory=memory, url=url, federation=federation, plan=plan,
                                             fault_log=fault_log, round_timeout_s=round_timeout_s, progress=progress,
                                             privacy_plan=planned)
            doc = _document(result)
            final_weights = scoring.final_weights(result, coord_state, doc)
            timing["setup_s"] = t_run - t_ws
            t_score = time.perf_counter()
            scorer = scoring.scorer(exp, ws)
            scored = scorer(final_weights)
            from simulator.history import enrich_rounds

            # Per-round held-out scores cost one forward pass per round over those rows: skip for huge runs.
            enrich_rounds(doc, state_dir=coord_state, scorer=scorer if len(ws.sites) <= score_rounds_max_sites else None)
            timing["scoring_s"] = time.perf_counter() - t_score
            # "final" is what each site reported on its own fixed test split (the global model and, when the
            # experiment personalises, its personalised one), as `coordinator runs show` shows it. The
            # simulator also keeps rows no site ever holds: the global model on those is "holdout".
            doc["holdout"] = {**{k: v for k, v in scored.items() if k != "per_site"}, "per_site": scored["per_site"],
                              "split": HOLDOUT_SPLIT}
            scoring.holdout_personalized(doc, exp, ws)
            dp_block = privacy.spent(exp, ws, run_id=doc["run_id"], planned=planned, reported=doc.get("epsilon"))
            if dp_block is not None:
                doc["privacy"] = {**(doc.get("privacy") or {}), **dp_block}  # keeps the coordinator's central DP
                doc["epsilon"] = dict(dp_block["epsilon"])
            if baselines:
                from simulator.baselines import run_baselines

                rounds_run = int(exp.training.rounds)
                t_base = time.perf_counter()
                doc["baselines"] = run_baselines(
                    exp, train_files={s: f.train for s, f in ws.sites.items()},
                    test_files={s: f.test for s, f in ws.sites.items()}, rounds=rounds_run, seed=run_seed,
                    work_dir=ws.root,
                )
                timing["baselines_s"] = time.perf_counter() - t_base
            doc.setdefault("timing", {})
            doc["timing"] = {**timing, **{k: v for k, v in (doc.get("timing") or {}).items() if v is not None}}
            doc["timing"]["simulate_s"] = time.perf_counter() - t_start
            doc.update(
                experiment=exp.name, dataset=data.name, partition=str(spec), broker="memory" if memory else redact(url),
                seed=run_seed, federation=federation, reproducible_dp=reproducible_dp, coordinator_state=str(coord_state), work_dir=str(ws.root) if (out_dir is not None or keep_work) else None,
                sites=sorted(ids.values()), site_groups={ids[s]: v for s, v in (part.groups or {}).items()} or None,
                faults={"plan": plan.to_json(), "events": fault_log.events} if not plan.empty else None,
            )
            if out_dir is not None:
                from simulator.report import write_report

                scoring.save_model(out_dir, exp, final_weights)
                write_report(doc, out_dir, experiment=exp.raw)
        finally:
            if out_dir is None and not keep_work:
                shutil.rmtree(work, ignore_errors=True)
        if json_out:
            print(json.dumps(doc, default=_json_default))
        return doc


@contextlib.contextmanager
def _site_users(url: str, sites: list[str], *, enabled: bool) -> Iterator[dict[str, str]]:
    """Each site's own broker URL: a least-privilege broker user per site, as `fedbus broker provision`
    makes them, deleted at the end. The coordinator's reassembly quotas are per broker user, so sites
    sharing the admin user queue behind one another's large updates, as no deployment does."""
    if not enabled:
        yield {}
        return
    from protocol.transport.provision import deprovision, provision, user_url

    creds = provision(url, sites=sites)
    try:
        yield {s: user_url(url, s, creds.passwords[s]) for s in sites}
    finally:
        deprovision(url, sites)


def _cohort_only(exp: Experiment, ws: Any, *, memory: bool, url: str, federation: str, bins: int | None,
                 out_dir: Path | None, work: Path, keep_work: bool | None, json_out: bool, sites: dict[str, str],
                 groups: dict[str, Any] | None) -> dict[str, Any]:
    from protocol.cohort import DEFAULT_BINS, CohortError
    from simulator.cohort import run_cohort

    try:
        doc = run_cohort(exp, ws, memory=memory, url=url, federation=federation, bins=bins or DEFAULT_BINS)
    except CohortError as e:
        raise SimulationInputError(str(e)) from None
    finally:
        if out_dir is None and not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    doc["site_groups"] = {sites[s]: v for s, v in (groups or {}).items()} or None
    doc["coordinator_state"] = str(ws.coordinator_state) if out_dir is not None else None
    if json_out:
        print(json.dumps(doc, default=_json_default))
    return doc


def _json_default(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def _run_federation(exp: Experiment, ws: Any, *, memory: bool, url: str, federation: str, plan: Any, fault_log: FaultLog,
                    round_timeout_s: float | None, progress: bool,
                    privacy_plan: dict[str, Any] | None = None) -> tuple[Any, dict[str, float]]:
    from coordinator.run import Coordinator
    from protocol.signing import Signer
    from simulator.federation import running

    with running(ws, memory=memory, url=url, federation=federation, plan=plan, fault_log=fault_log) as live:
        coord = Coordinator(
            exp, bus=live.bus, state_dir=ws.coordinator_state, signer=Signer.from_file(ws.coordinator_key),
            federation=federation, sites=sorted(ws.sites), progress=progress, round_timeout_s=round_timeout_s,
            privacy_plan=privacy_plan, show_plan=progress,  # the plan from each site's real training rows
        )
        try:
            result = coord.run()
        except Exception as e:  # noqa: BLE001 - the coordinator's own failure, reported as a failed run
            raise SimulationFailed(f"the coordinator failed: {type(e).__name__}: {e}") from e
    return result, {"sites_start_s": live.sites_start_s, "sites_stop_s": live.sites_stop_s}


def _document(result: Any) -> dict[str, Any]:
    doc = result.to_json() if hasattr(result, "to_json") else dict(result)
    if isinstance(doc, str):
        doc = json.loads(doc)
    status = doc.get("status")
    if status not in (None, "finished", "completed", "completed_with_gaps", "done", "ok", "succeeded", "stopped_early"):
        raise SimulationFailed(f"run {doc.get('run_id')} ended {status}: {doc.get('reason') or 'no reason given'}",
                               document=doc)
    return doc
