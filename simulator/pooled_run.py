"""A pooled-DP experiment on a dataset's natural partition, in memory, scored like ``simulate``.

The same data path as the simulator (``load_dataset``, ``make_partition``, ``build_workspace``;
each site's training rows from ``site_worker.data.prepare`` as the baselines read them) and the
same held-out rows (``scoring.scorer``), with the rounds run by ``simulator.pooled_dp``: every
site one DP-SGD step a round with its Skellam share, the coordinator one step on the unmasked
noisy sum. ``bench/privacy_utility.py`` calls it for its "pooled DP (secure sum)" series.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from protocol.config import Experiment, load_experiment
from protocol.model import build_model
from protocol.secagg import skellam
from protocol.secagg.rules import pooled_mu


def simulate_pooled(experiment: dict[str, Any], *, seed: int, partition: str = "natural:dataset",
                    honest: int | None = None, work: Path | None = None, noise: bool = True) -> dict[str, Any]:
    """Run ``experiment`` (its ``federated.secure_aggregation.dp = "pooled"``) and score the final
    model on the held-out rows; ``honest`` is every site's m (default: all sites); ``noise=False``
    is the same pipeline with mu = 0 (no DP: the mode's own no-DP twin)."""
    from simulator import scoring
    from simulator.datasets import load_dataset
    from simulator.evaluation import source_for
    from simulator.partitions import make_partition, parse_spec
    from simulator.pooled_dp import DATASET, federation
    from simulator.workspace import build_workspace
    from site_worker.data import prepare

    exp: Experiment = load_experiment({**experiment, "training": {**experiment["training"], "seed": seed}})
    sa = exp.federated.secure_aggregation
    assert sa is not None and sa.dp == "pooled"
    data = load_dataset(exp.dataset.name, target=exp.dataset.target, seed=seed)
    spec = parse_spec(partition)
    groups = data.column(spec.column) if spec.kind == "natural" else None
    part = make_partition(data.labels, spec, sites=None, seed=seed, groups=groups)
    root = Path(work or tempfile.mkdtemp(prefix="fedbus-pooled-")) / uuid.uuid4().hex[:8]
    ws = build_workspace(root / "ws", data=data, partition=part, site_ids={s: s for s in part.sites},
                         federation="pooled", broker_url="memory://pooled", dataset_name=exp.dataset.name,
                         coordinator_state=root / "coordinator", split_seed=seed, peers=False)
    shape = scoring.input_shape(exp)
    target = exp.dataset.target or "label"
    tensors = {}
    for s, f in sorted(ws.sites.items()):
        prepared = prepare(source_for(f.train, target, exp.dataset.name), exp.dataset, seed=seed, input_shape=shape)
        tensors[s] = (prepared.x_train, prepared.y_train)
    mu = pooled_mu(exp) if noise else 0.0
    model = build_model(exp.architecture.layers, seed=seed)
    m = len(tensors) if honest is None else honest
    fed = federation(root / "sites", tensors, model, loss=exp.training.loss_function, clip=sa.clip, scale=sa.scale,
                     mu=mu, sample_rate=sa.sample_rate, max_batch=sa.max_batch,
                     learning_rate=float(exp.training.optimizer.learning_rate), honest=m,
                     min_contributors=max(sa.min_contributors, m), threshold=sa.threshold, privacy=sa.privacy,
                     delta=sa.delta)
    for tag in range(1, int(exp.training.rounds) + 1):
        fed.round(tag)
    weights = [(k, v.detach().cpu().numpy()) for k, v in model.state_dict().items()]
    scored = scoring.scorer(exp, ws)(weights)
    spent = {s: site.ledger.spent(DATASET, delta=sa.delta, accountant=skellam.ACCOUNTANT)
             for s, site in fed.sites.items()}
    l1, l2 = skellam.sensitivities(sa.clip, sa.scale, fed.dim)
    return {"holdout": scored, "privacy": {"epsilon": spent, "delta": sa.delta, "accountant": skellam.ACCOUNTANT,
                                           "mu": mu, "gaussian_noise_multiplier": skellam.gaussian_equivalent(mu, l2)
                                           if mu else 0.0, "rows": {s: len(t[0]) for s, t in tensors.items()}}}


__all__ = ["simulate_pooled"]
