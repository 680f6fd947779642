"""Every site cap at its edge, each on its own with the other caps relaxed (issue 26, place 3).

The value exactly at a cap passes and the nearest value beyond it is refused, naming the
policy setting; so a check that is off by one, inverted or removed fails here. The
functions are the ones the handler calls before anything is trained (``check_policy``,
``site_plan``, ``check_memory``, ``check_eval_memory``) and the DP metrics release
(``statistics``), whose claimed sensitivity is tested where its loss clip is reached.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protocol.config import load_experiment
from site_worker.config import SitePolicy
from protocol.dp_plan import site_plan
from site_worker.dp import check_eval_memory, check_memory, eval_memory_mb, train_memory_mb
from site_worker.policy import PolicyViolation, check_policy
from site_worker.release import BINS, release_size, statistics
from site_worker.trainer import TrainSpec
from tests.site_worker.support import experiment_dict

N_TRAIN = 64  # training rows: batch 32 -> 2 batches per epoch, sample rate 1/2


def _spec(*, epochs: int = 2, batch_size: int = 32, noise: float | None = 1.0, delta: float = 1e-5):
    dp = {"noise_multiplier": noise, "max_grad_norm": 1.0, "delta": delta}
    exp = load_experiment(experiment_dict(**{"training.epochs": epochs, "training.batch_size": batch_size,
                                             "training.optimizer.differential_privacy": dp}))
    return TrainSpec.from_experiment(exp, seed=1)


# Every cap relaxed: only the one a test tightens can refuse.
RELAXED = dict(min_noise_multiplier=0.0, max_sample_rate=1.0, max_steps_per_task=10**9, max_epochs=10**6, delta=1e-3)


def _plan(spec, **policy):
    return site_plan(SitePolicy(**{**RELAXED, **policy}), spec, n_train=N_TRAIN, rows=100)


@pytest.mark.parametrize("setting, at, beyond, spec", [
    # the sample rate of batch 32 on 64 rows is 1/2; of batch 33, still 2 batches: 1/2; of batch 64, 1
    ("max_sample_rate", 0.5, 0.4999999, {}),
    # 2 epochs x 2 batches = 4 DP-SGD steps
    ("max_steps_per_task", 4, 3, {}),
    ("max_epochs", 2, 1, {}),
    # the experiment's own sigma 1.0
    ("min_noise_multiplier", 1.0, 1.0000001, {}),
    # the experiment asks delta 1e-5: a site delta of 1e-5 is the edge, just under it refuses
    ("delta", 1e-5, 0.99999e-5, {}),
])
def test_each_dp_cap_alone_at_its_edge(setting, at, beyond, spec):
    s = _spec(**spec)
    plan = _plan(s, **{setting: at})
    assert plan.sample_rate == 0.5 and plan.steps == 4 and plan.noise_multiplier == 1.0
    with pytest.raises(PolicyViolation, match=rf"^{setting}: "):
        _plan(s, **{setting: beyond})


def test_min_noise_applies_to_a_noise_the_site_derives_itself():
    """A run budget's noise (``noise_multiplier=``; a target epsilon's is the same comparison,
    tested in test_site_owns_dp): at the minimum it runs, a hair below it is refused without
    the figure (it follows from the site's rows)."""
    policy = SitePolicy(**{**RELAXED, "min_noise_multiplier": 0.7})
    assert site_plan(policy, _spec(), n_train=N_TRAIN, rows=100, noise_multiplier=0.7).noise_multiplier == 0.7
    with pytest.raises(PolicyViolation, match=r"^min_noise_multiplier: noise multiplier is below"):
        site_plan(policy, _spec(), n_train=N_TRAIN, rows=100, noise_multiplier=0.6999999)


def test_accountant_request_must_be_the_sites():
    with pytest.raises(PolicyViolation, match=r"^accountant: "):
        _plan(_spec(), accountant="prv")


# ------------------------------------------------------------------ check_policy: what needs no data
def _exp(**changes):
    return load_experiment(experiment_dict(**changes))


def _policy(**kw) -> SitePolicy:
    return SitePolicy(**{"max_epsilon": None, "min_noise_multiplier": 0.0, **kw})


def test_max_parameters_at_its_edge():
    exp = _exp()
    check_policy(_policy(max_parameters=1000), exp, parameters=1000)
    with pytest.raises(PolicyViolation, match=r"^max_parameters: model has 1001 parameters"):
        check_policy(_policy(max_parameters=1000), exp, parameters=1001)


def test_max_epsilon_bounds_the_total_and_the_target_epsilon_at_their_edges():
    dp = {"max_grad_norm": 1.0, "delta": 1e-5}
    total = _exp(**{"training.optimizer.differential_privacy": {**dp, "total_epsilon": 4.0}})
    check_policy(_policy(max_epsilon=4.0), total, parameters=10)
    with pytest.raises(PolicyViolation, match=r"^max_epsilon: total epsilon 4.0 "):
        check_policy(_policy(max_epsilon=3.999), total, parameters=10)
    target = _exp(**{"training.optimizer.differential_privacy": {**dp, "target_epsilon": 2.0}})
    check_policy(_policy(max_epsilon=2.0), target, parameters=10)
    with pytest.raises(PolicyViolation, match=r"^max_epsilon: target epsilon 2.0 "):
        check_policy(_policy(max_epsilon=1.999), target, parameters=10)


def test_explicit_noise_below_the_minimum_is_refused_before_any_data_is_read():
    exp = _exp()  # sigma 1.0
    check_policy(_policy(min_noise_multiplier=1.0), exp, parameters=10)
    with pytest.raises(PolicyViolation, match=r"^min_noise_multiplier: noise multiplier 1 is below"):
        check_policy(_policy(min_noise_multiplier=1.0000001), exp, parameters=10)


def test_no_dp_and_aggregators_and_layers():
    plain = _exp(**{"training.optimizer.differential_privacy": None})
    check_policy(_policy(allow_no_dp=True), plain, parameters=10)
    with pytest.raises(PolicyViolation, match=r"^allow_no_dp: "):
        check_policy(_policy(), plain, parameters=10)
    check_policy(_policy(allowed_aggregators=("FedAvg",)), _exp(), parameters=10)
    with pytest.raises(PolicyViolation, match=r"^allowed_aggregators: "):
        check_policy(_policy(allowed_aggregators=("FedProx",)), _exp(), parameters=10)
    layers = {layer["type"] for layer in experiment_dict()["architecture"]["layers"]} - {"input", "output"}
    check_policy(_policy(allowed_layers=tuple(layers)), _exp(), parameters=10)
    with pytest.raises(PolicyViolation, match=r"^allowed_layers: "):
        check_policy(_policy(allowed_layers=tuple(sorted(layers))[1:]), _exp(), parameters=10)


# ------------------------------------------------------------------ memory and release size
def test_training_memory_cap_at_its_edge():
    kw = dict(activations=50, batch_size=32, n_train=N_TRAIN, sample_rate=None)
    mb = train_memory_mb(1000, **kw)
    assert check_memory(SitePolicy(max_train_memory_mb=mb), 1000, **kw) == mb
    with pytest.raises(PolicyViolation, match=r"^max_train_memory_mb: "):
        check_memory(SitePolicy(max_train_memory_mb=mb * (1 - 1e-9)), 1000, **kw)


def test_eval_memory_and_release_values_caps_at_their_edges():
    exp = _exp()
    chain = exp.chain
    mb = eval_memory_mb(chain, rows=100)
    values = release_size(task="binary", loss_name="bce_with_logits", outputs=chain.output_values)
    assert values == 4 + 2 * BINS + 1
    policy = SitePolicy(max_eval_memory_mb=mb, max_release_values=values, metrics="dp")
    assert check_eval_memory(policy, chain, rows=100, release_values=values) == mb
    with pytest.raises(PolicyViolation, match=r"^max_release_values: "):
        check_eval_memory(SitePolicy(max_eval_memory_mb=mb, max_release_values=values - 1, metrics="dp"), chain,
                          rows=100, release_values=values)
    with pytest.raises(PolicyViolation, match=r"^max_eval_memory_mb: "):
        check_eval_memory(SitePolicy(max_eval_memory_mb=mb * (1 - 1e-9), max_release_values=values), chain,
                          rows=100, release_values=values)


# ------------------------------------------------------------------ the DP metrics' loss clip, where it is reached
class Fixed(torch.nn.Module):
    """Outputs the logits it is given: the test decides every row's loss."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x.reshape(-1).long()]


@pytest.mark.parametrize("loss_name, logits, labels, sensitivity", [
    # binary: the last row is confidently wrong (logit -200 on a positive: loss 200 >> C = 5)
    ("bce_with_logits", [[2.0], [-1.0], [0.5], [-200.0]], [1, 0, 1, 1], math.sqrt(3.0)),
    # three classes, the last row confidently wrong
    ("cross_entropy", [[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [300.0, 0, 0]], [0, 1, 2, 2], math.sqrt(2.0)),
])
def test_one_row_moves_the_release_vector_by_at_most_its_sensitivity_when_its_loss_is_clipped(
        loss_name, logits, labels, sensitivity):
    """Removing the row whose loss is far above the clip moves the statistics vector by exactly
    the claimed L2 sensitivity (one confusion cell, one histogram cell, 1 of scaled loss), and
    no row moves it further; the loss coordinate of that row is exactly C / C = 1."""
    clip = SitePolicy().metrics_loss_clip
    out = torch.tensor(logits)
    y = torch.tensor(labels, dtype=torch.float32 if loss_name == "bce_with_logits" else torch.int64)
    if loss_name == "bce_with_logits":
        y = y.unsqueeze(1)
    model = Fixed(out)
    x = torch.arange(len(out), dtype=torch.float32).unsqueeze(1)
    task = "binary" if loss_name == "bce_with_logits" else "multiclass"
    _, full, sens = statistics(model, x, y, loss_name=loss_name, task=task, clip=clip)
    assert sens == pytest.approx(sensitivity)
    moves = []
    for i in range(len(out)):
        keep = [j for j in range(len(out)) if j != i]
        _, without, _ = statistics(model, x[keep], y[keep], loss_name=loss_name, task=task, clip=clip)
        moves.append(float(np.linalg.norm(full - without)))
    assert max(moves) <= sens + 1e-12
    assert moves[-1] == pytest.approx(sens, abs=1e-12)  # the clipped row: at the sensitivity, not above
