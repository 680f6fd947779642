"""A coordinator signs models a site cannot verify: row-mixing layers, buffers, memory bombs.

Played against the real site handler (``TaskHandler.handle``, what ``SiteWorker`` calls for
every verified task). Each attack must end in ``Declined(policy)`` naming the layer or the
policy setting, with nothing charged to the ledger, nothing built and nothing trained; and
the honest task after it is still served.
"""

from __future__ import annotations

import math
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch

from protocol.codec import new_envelope
from protocol.config import load_experiment
from protocol.dp_plan import plan_dp
from protocol.layers import LAYER_TYPES, _LayerType, _same
from protocol.messages import Declined, EvalResult, EvalTask, PersonalizeTask, TrainTask, Update
from protocol.model import build_model, summarize, to_tensors
from protocol.train_spec import TrainSpec
from site_worker.config import DatasetSource, SiteConfig, SitePolicy
from site_worker.dp import eval_memory_mb, step_ghost_values, train_memory_mb
from site_worker.handlers import TaskHandler
from site_worker.secure_rng import poisson_batch_bound

from tests.site_worker.support import ECG_CNN, ecg_arrays, experiment_dict, heart_failure_csv, initial_weights

DP = "training.optimizer.differential_privacy"
NO_DP = {DP: {"enabled": False}}
HF = "heart_failure"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("data")
    xp, yp = ecg_arrays(tmp, n=64)
    return {"csv": heart_failure_csv(tmp / "hf.csv"), "x": xp, "y": yp}


def handler(tmp: Path, files: dict[str, Path], **policy: Any) -> TaskHandler:
    datasets = {HF: DatasetSource(name=HF, path=files["csv"], target="DEATH_EVENT"),
                "ecg": DatasetSource(name="ecg", path=files["x"], target="label", format="npy",
                                     labels_path=files["y"])}
    cfg = SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp / "k",
                     coordinator_pub=tmp / "p", state_dir=tmp / "state", datasets=datasets,
                     policy=SitePolicy(**{"max_epsilon": 1e6, **policy}))
    return TaskHandler(cfg)


def send(site: TaskHandler, task: Any, *, round: int = 1) -> Any:
    return site.handle(new_envelope(task, federation="f", run_id="r", round=round, sender="coordinator",
                                    recipient="s"))


def train_task(exp: dict, weights=None, dataset: str = HF) -> TrainTask:
    return TrainTask(experiment=exp, weights=weights if weights is not None else initial_weights(exp),
                     dataset=dataset, base_round=0, seed=5, deadline=time.time() + 600)


def eval_task(exp: dict, weights, dataset: str = HF) -> EvalTask:
    return EvalTask(experiment=exp, weights=weights, dataset=dataset, base_round=1, seed=3,
                    deadline=time.time() + 600, split="test")


def spent(site: TaskHandler, dataset: str = HF) -> list:
    return site.ledger.releases(dataset)


def batchnorm_experiment(*, affine: bool, track: bool, dp: bool) -> tuple[dict, Any]:
    """The honest MLP with BatchNorm1d after its first Linear; weights built without config
    validation (a DP experiment with it does not validate: the attacker signs it anyway)."""
    exp = experiment_dict(**({"training.epochs": 1} if dp else {"training.epochs": 1, **NO_DP}))
    layers = exp["architecture"]["layers"]
    layers.insert(2, {"type": "BatchNorm1d", "params": {"affine": affine, "track_running_stats": track}})
    return exp, to_tensors(build_model(layers, seed=0))


VARIANTS = [(a, t) for a in (False, True) for t in (False, True)]


@pytest.mark.parametrize(("affine", "track"), VARIANTS, ids=lambda v: str(v))
def test_every_batchnorm_variant_is_declined_naming_the_layer_on_every_path(tmp_path, files, affine, track):
    """The issue's attack: BatchNorm1d(affine=false, track_running_stats=false) passed Opacus'
    validator, and DP-SGD then normalised each batch with its own statistics (one patient moved
    the sum of clipped gradients by 137 against a bound of 1). Every variant, every task type."""
    named = r"architecture\.layers\[2\].*BatchNorm1d.*GroupNorm or LayerNorm"
    site = handler(tmp_path, files, allow_no_dp=True)
    dp_exp, weights = batchnorm_experiment(affine=affine, track=track, dp=True)
    reply = send(site, train_task(dp_exp, weights))
    assert isinstance(reply, Declined) and reply.reason == "policy", reply
    assert re.search(named, reply.detail), reply.detail
    plain, weights = batchnorm_experiment(affine=affine, track=track, dp=False)
    for task in (train_task(plain, weights), eval_task(plain, weights),
                 PersonalizeTask(experiment=plain, weights=weights, dataset=HF, base_round=1, seed=1,
                                 deadline=time.time() + 600)):
        reply = send(site, task)
        assert isinstance(reply, Declined) and reply.reason == "policy", (type(task).__name__, reply)
        assert reply.detail.startswith("row_independent: layer architecture.layers[2] of type 'BatchNorm1d'"), reply
        assert "GroupNorm or LayerNorm" in reply.detail
    # Even a site that allows exact metrics and no DP refuses it: it cannot verify the model.
    exact = handler(tmp_path / "exact", files, allow_no_dp=True, metrics="exact")
    reply = send(exact, train_task(plain, weights))
    assert isinstance(reply, Declined) and reply.detail.startswith("row_independent:"), reply
    assert spent(site) == [] and spent(exact) == []
    honest = experiment_dict(**{"training.epochs": 1})
    assert isinstance(send(site, train_task(honest)), Update)


class _Offset(torch.nn.Module):
    """A row-independent layer that carries a buffer (what a later layer type might do)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


def test_a_model_with_buffers_is_declined_under_dp_training_or_dp_metrics_only(tmp_path, files, monkeypatch):
    monkeypatch.setitem(LAYER_TYPES, "Offset", _LayerType(params={}, infer=_same, row_independent=True))
    monkeypatch.setitem(__import__("protocol.layers").layers._CANONICAL, "offset", "Offset")
    monkeypatch.setitem(__import__("protocol.model").model._MODULES, "Offset", _Offset)

    def with_offset(**changes: Any) -> dict:
        exp = experiment_dict(**{"training.epochs": 1, **changes})
        exp["architecture"]["layers"].insert(2, {"type": "Offset"})
        return exp

    assert summarize(with_offset()["architecture"]["layers"]).buffers == ("2.offset",)
    site = handler(tmp_path, files, allow_no_dp=True)  # metrics = "dp"
    for exp in (with_offset(), with_offset(**NO_DP)):  # DP training; DP metrics of a non-DP run
        for task in (train_task(exp), eval_task(exp, initial_weights(exp))):
            reply = send(site, task)
            assert isinstance(reply, Declined) and reply.reason == "policy", reply
            assert reply.detail.startswith("buffers: layer architecture.layers[2] carries buffers (2.offset)"), reply
    assert spent(site) == []
    # Neither DP training nor DP metrics: nothing accounted can be broken, so it runs.
    exact = handler(tmp_path / "exact", files, allow_no_dp=True, metrics="exact")
    assert isinstance(send(exact, train_task(with_offset(**NO_DP))), Update)


def _no_allocation(monkeypatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the site built the model or read the rows before checking the sizes")

    monkeypatch.setattr("site_worker.handlers.build_model", refuse)
    monkeypatch.setattr("site_worker.handlers.prepare", refuse)


def conv_bomb(padding: int, **changes: Any) -> dict:
    """A 4-parameter Conv1d (1 -> 1 channel, kernel 3, bias) with the given padding."""
    exp = experiment_dict(ECG_CNN, **{"training.epochs": 1, **changes})
    exp["architecture"]["layers"] = [
        {"type": "input", "params": {"channels": 1, "length": 185}},
        {"type": "Conv1d", "params": {"out_channels": 1, "kernel_size": 3, "padding": padding}},
        {"type": "AdaptiveAvgPool1d", "params": {"output_size": 1}},
        {"type": "Flatten"},
        {"type": "Linear", "params": {"out_features": 2}},
    ]
    return exp


def many_classes(k: int, **changes: Any) -> dict:
    exp = experiment_dict(**{"training.epochs": 1, "training.loss_function": "cross_entropy",
                             "dataset.task": "multiclass", "dataset.num_classes": k, **changes})
    layers = exp["architecture"]["layers"]
    layers[5]["params"].update(out_features=k, features=k)
    layers[6]["params"].update(features=k)
    return exp


@pytest.mark.parametrize(("name", "make", "dataset", "setting"), [
    ("conv_padding_1e8", lambda: conv_bomb(10**8), "ecg", "max_eval_memory_mb:"),
    ("classes_40000", lambda: many_classes(40_000), HF, "max_release_values:"),
])
def test_memory_bombs_are_declined_before_anything_is_allocated(tmp_path, files, monkeypatch, name, make, dataset,
                                                                 setting):
    """The issue's bombs made a site try to allocate 22-42 GB. Declined from the shapes alone:
    no model built, no row read, a few MB of Python memory, well under a second of work."""
    exp = make()
    site = handler(tmp_path, files)
    chain = load_experiment(exp).chain
    # Under the site's parameter limit: the bomb is in the activations or the release, not the weights.
    assert summarize(exp["architecture"]["layers"]).parameters < 5_000_000  # the old default cap
    weights = initial_weights(exp)
    _no_allocation(monkeypatch)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        replies = [send(site, train_task(exp, weights, dataset)), send(site, eval_task(exp, weights, dataset))]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    for reply in replies:
        assert isinstance(reply, Declined) and reply.reason == "policy" and reply.detail.startswith(setting), reply
    assert peak < 64 * 2**20, f"{name}: {peak / 2**20:.0f} MiB traced while declining"
    assert elapsed < 10.0, elapsed  # generous for a loaded CI core; it is milliseconds of work
    assert spent(site, dataset) == []
    if name == "conv_padding_1e8":  # what it would have needed: one pass of 4096 rows of a 2e8-long signal
        assert chain.eval_values > 4 * 10**8 and eval_memory_mb(chain, rows=64) > 10**6
    monkeypatch.undo()
    assert isinstance(send(site, train_task(experiment_dict(**{"training.epochs": 1}))), Update)


def test_training_activations_are_bounded_with_the_per_sample_factor(tmp_path, files, monkeypatch):
    """A conv whose weights are tiny and whose evaluation fits, but whose training step (the
    Poisson batch x every kept activation and Opacus' unfold) does not: max_train_memory_mb."""
    exp = conv_bomb(20_000, **{"training.batch_size": 16})
    chain = load_experiment(exp).chain
    assert chain.train_values > 4 * 10**5  # per row; the weights are 4 + 4 values
    site = handler(tmp_path, files, max_eval_memory_mb=1e6, max_sample_rate=1.0, max_train_memory_mb=16)
    monkeypatch.setattr("site_worker.handlers.build_model", lambda *a, **k: pytest.fail("built the model"))
    reply = send(site, train_task(exp, dataset="ecg"))
    assert isinstance(reply, Declined) and reply.detail.startswith("max_train_memory_mb:"), reply
    assert f"{chain.train_values} activation values" in reply.detail
    assert spent(site, "ecg") == []


def _hf_sizes(site: TaskHandler, exp: dict) -> tuple[int, float]:
    """(training rows, DP sample rate) the site will use for ``exp`` on the heart-failure rows."""
    loaded = load_experiment(exp)
    data = site._data(train_task(exp), loaded, summarize(loaded.architecture.layers))
    spec = TrainSpec.from_experiment(loaded, seed=5)
    return len(data.x_train), plan_dp(spec, len(data.x_train)).sample_rate


def test_a_model_that_fits_at_batch_size_but_not_at_the_poisson_bound_is_declined_at_the_edge(tmp_path, files):
    exp = experiment_dict(**{"training.epochs": 1, "training.batch_size": 16})
    loaded = load_experiment(exp)
    params, acts = summarize(loaded.architecture.layers).parameters, loaded.chain.train_values
    n_train, q = _hf_sizes(handler(tmp_path, files), exp)  # same state dir, so the same split key
    assert poisson_batch_bound(n_train, q) > 16
    ghost = step_ghost_values(loaded.chain, dp=True)  # the bound the site applies under DP
    at_bound = train_memory_mb(params, activations=acts, batch_size=16, n_train=n_train, sample_rate=q,
                               ghost_values=ghost)
    at_batch = train_memory_mb(params, activations=acts, batch_size=16, n_train=n_train, sample_rate=None,
                               ghost_values=ghost)
    just_below = math.nextafter(at_bound, 0.0)
    assert at_batch < just_below  # fits at the nominal batch size: only the Poisson bound refuses it
    inside = send(handler(tmp_path, files, max_train_memory_mb=at_bound), train_task(exp))
    assert isinstance(inside, Update), inside
    outside = send(handler(tmp_path, files, max_train_memory_mb=just_below), train_task(exp))
    assert isinstance(outside, Declined) and outside.detail.startswith("max_train_memory_mb:"), outside
    assert "Poisson bound" in outside.detail  # says why, with public figures only:
    # the bound follows from the private rows: it is not among the figures on the wire
    assert str(poisson_batch_bound(n_train, q)) not in re.findall(r"\d+(?:\.\d+)?", outside.detail)


def test_evaluation_memory_and_release_size_are_bounded_at_the_edge(tmp_path, files):
    exp = experiment_dict(**NO_DP)
    weights = initial_weights(exp)
    rows = 299  # the heart-failure records the site announces
    need = eval_memory_mb(load_experiment(exp).chain, rows=rows)
    common = {"allow_no_dp": True}
    ok = send(handler(tmp_path / "a", files, max_eval_memory_mb=need, **common), eval_task(exp, weights))
    assert isinstance(ok, EvalResult), ok
    no = send(handler(tmp_path / "b", files, max_eval_memory_mb=math.nextafter(need, 0.0), **common),
              eval_task(exp, weights))
    assert isinstance(no, Declined) and no.detail.startswith("max_eval_memory_mb:"), no
    # A binary model's DP release holds 4 confusion counts, 2 x 10 histogram bins and a loss sum.
    ok = send(handler(tmp_path / "c", files, max_release_values=25, **common), eval_task(exp, weights))
    assert isinstance(ok, EvalResult), ok
    no = send(handler(tmp_path / "d", files, max_release_values=24, **common), eval_task(exp, weights))
    assert isinstance(no, Declined) and no.detail.startswith("max_release_values: a metrics release of this model "
                                                             "holds 25 values"), no
    k = 30  # a k-class model releases k*k confusion counts and a loss sum
    multi = many_classes(k, **NO_DP)
    w = initial_weights(multi)
    assert isinstance(send(handler(tmp_path / "e", files, max_release_values=k * k + 1, **common),
                           eval_task(multi, w)), EvalResult)
    no = send(handler(tmp_path / "f", files, max_release_values=k * k, **common), eval_task(multi, w))
    assert isinstance(no, Declined) and no.detail.startswith("max_release_values:"), no
    # metrics = "exact" releases no vector: the bound is the memory one only.
    exact = handler(tmp_path / "g", files, max_release_values=25, metrics="exact", **common)
    assert isinstance(send(exact, eval_task(multi, w)), EvalResult)


def test_a_layernorm_opacus_cannot_clip_is_declined_not_crashed_on(tmp_path, files):
    """Found by the row-independence property test: Opacus 1.6 raises inside the backward pass
    on a LayerNorm with a weight and no bias. The site declines it under DP, naming the layer."""
    exp = experiment_dict(**{"training.epochs": 1})
    exp["architecture"]["layers"].insert(2, {"type": "LayerNorm", "params": {"bias": False}})
    site = handler(tmp_path, files)
    reply = send(site, train_task(exp))
    assert isinstance(reply, Declined) and reply.reason == "policy", reply
    assert reply.detail.startswith("dp_trainable: layer architecture.layers[2] is a LayerNorm"), reply
    assert spent(site) == []
    exp["architecture"]["layers"][2]["params"]["bias"] = True
    assert isinstance(send(site, train_task(exp)), Update)
