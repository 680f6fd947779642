"""What a DP task will spend, fixed by the site's policy before anything is trained.

The experiment's differential-privacy block is a *request*: noise multiplier or target
epsilon, delta, accountant, and (through the training block and per-round overrides)
epochs and batch size, hence sample rate and steps. ``site_plan`` checks every request
against the site's policy and either returns the plan the site will run, accounted at the
site's own delta with the site's own accountant, or raises ``PolicyViolation`` naming the
policy setting that refused it. It never weakens a setting to make a request fit.

``DPPlan`` is the one object the trainer, the ledger and the handler share; callers that
derive noise differently (a per-run budget) build it with ``plan_dp(..., noise_multiplier=)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import structlog

from site_worker.config import SitePolicy
from site_worker.ledger import History
from site_worker.metrics import EVAL_ROWS
from site_worker.policy import PolicyViolation
from site_worker.secure_rng import SecureRandom, poisson_batch_bound

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DPPlan:
    """Noise, sampling and steps of one DP task, with the delta/accountant it is reported at."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epochs: int = 1
    reproducible: bool = False  # noise from the site's dp_seed (research), else from os.urandom

    def entries(self) -> History:
        """The accountant history entries this task adds (Opacus ``(σ, q, steps)``)."""
        return [(float(self.noise_multiplier), float(self.sample_rate), int(self.steps))]


def batches_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def plan_dp(spec: Any, n_train: int, *, delta: float | None = None, accountant: str | None = None,
            noise_multiplier: float | None = None) -> DPPlan:
    """Sample rate and steps as Opacus derives them (1 / len(loader)); noise from
    ``noise_multiplier``, else the spec's σ, else the spec's target ε at ``delta``."""
    assert spec.dp is not None
    delta = float(spec.dp.delta if delta is None else delta)
    accountant = str(spec.dp.accountant if accountant is None else accountant)
    per_epoch = batches_per_epoch(n_train, spec.batch_size)
    sample_rate = 1.0 / per_epoch
    noise = noise_multiplier if noise_multiplier is not None else spec.dp.noise_multiplier
    if noise_multiplier is None and spec.dp.target_epsilon is not None:
        from opacus.accountants.utils import get_noise_multiplier

        noise = get_noise_multiplier(target_epsilon=spec.dp.target_epsilon, target_delta=delta,
                                     sample_rate=sample_rate, epochs=spec.epochs, accountant=accountant)
    assert noise is not None
    return DPPlan(noise_multiplier=float(noise), sample_rate=sample_rate, steps=per_epoch * spec.epochs,
                  max_grad_norm=spec.dp.max_grad_norm, delta=delta, accountant=accountant, epochs=spec.epochs)


def check_dp_request(policy: SitePolicy, dp: Any, *, rows: int) -> float:
    """The experiment's accountant and delta against the policy; returns the site's delta."""
    asked = str(getattr(dp, "accountant", "rdp") or "rdp")
    if asked != policy.accountant:
        raise PolicyViolation(
            f"accountant: the experiment asks for {asked!r}; this site's policy.accountant is "
            f"{policy.accountant!r} and the site reports every epsilon with it "
            f"(set training.optimizer.differential_privacy.accountant to {policy.accountant!r})")
    site_delta = policy.site_delta(rows)
    if float(dp.delta) > site_delta:
        raise PolicyViolation(
            f"delta: the experiment asks for delta {float(dp.delta):g}, above this site's policy.delta "
            f"{site_delta:g} for {rows} rows (set training.optimizer.differential_privacy.delta <= {site_delta:g})")
    return site_delta


def check_epochs(policy: SitePolicy, epochs: int) -> None:
    """Local epochs per task (the experiment's or a per-round override), DP or not."""
    if epochs > policy.max_epochs:
        raise PolicyViolation(f"max_epochs: the task asks for {epochs} local epochs, this site's "
                              f"policy.max_epochs is {policy.max_epochs}")


def site_plan(policy: SitePolicy, spec: Any, *, n_train: int, rows: int,
              noise_multiplier: float | None = None) -> DPPlan:
    """The plan this site will run for ``spec`` on ``n_train`` training rows, or PolicyViolation."""
    assert spec.dp is not None
    delta = check_dp_request(policy, spec.dp, rows=rows)
    check_epochs(policy, spec.epochs)
    plan = plan_dp(spec, n_train, delta=delta, accountant=policy.accountant, noise_multiplier=noise_multiplier)
    # The sample rate, steps and a target-ε noise follow from the training rows this site holds:
    # a refusal names the setting and the experiment's own numbers, never those (issue 20, class 2).
    if plan.sample_rate > policy.max_sample_rate:
        raise PolicyViolation(
            f"max_sample_rate: batch size {spec.batch_size} samples this site's training rows at a rate above its "
            f"policy.max_sample_rate {policy.max_sample_rate:g} (use a smaller training.batch_size)")
    if plan.steps > policy.max_steps_per_task:
        raise PolicyViolation(f"max_steps_per_task: {spec.epochs} epoch(s) at batch size {spec.batch_size} take more "
                              f"DP-SGD steps than this site's policy.max_steps_per_task {policy.max_steps_per_task}")
    if plan.noise_multiplier < policy.min_noise_multiplier:
        fixed = noise_multiplier is None and spec.dp.target_epsilon is None  # the experiment's own σ: public
        asked = f" {plan.noise_multiplier:g}" if fixed else ""
        raise PolicyViolation(f"min_noise_multiplier: noise multiplier{asked} is below this "
                              f"site's policy.min_noise_multiplier {policy.min_noise_multiplier:g}")
    return replace(plan, reproducible=policy.reproducible_dp)


def noise_source(policy: SitePolicy, *, task_seed: int, purpose: str,
                 inputs: Callable[[], bytes] | None = None) -> SecureRandom:
    """Secret randomness for one task (256 bits from the OS); the site's dp_seed only when
    the policy turns reproducible_dp on. Never anything the coordinator chose alone.

    ``inputs`` gives the digest of what the release is computed from (``release_inputs``),
    needed in reproducible mode: a repeated task seed then repeats the noise only on an
    identical release, never on a different model, split, data or plan (issue 20, class 6)."""
    if policy.reproducible_dp:
        if policy.dp_seed is None or inputs is None:
            raise ValueError("reproducible_dp needs dp_seed and the release's inputs to key its noise")
        return SecureRandom.reproducible_from(policy.dp_seed, task_seed, purpose, inputs())
    return SecureRandom.secret()


def release_inputs(*parts: Any) -> bytes:
    """SHA-256 over what a release is computed from: tensors (by dtype, shape and bytes),
    modules (their state), ``PreparedData`` (every split), anything else by its ``repr``."""
    import hashlib

    import torch

    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        elif isinstance(x, torch.nn.Module):
            for k, v in x.state_dict().items():
                h.update(k.encode())
                feed(v)
        elif hasattr(x, "x_train") and hasattr(x, "y_train"):  # PreparedData
            for t in (x.x_train, x.y_train, x.x_val, x.y_val, x.x_test, x.y_test):
                feed(t if t is not None else "none")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for y in x:
                feed(y)
            h.update(b"]")
        else:
            h.update(repr(x).encode())
        h.update(b"\0")

    for p in parts:
        feed(p)
    return h.digest()


def train_memory_mb(parameters: int, *, activations: int, batch_size: int, n_train: int,
                    sample_rate: float | None) -> float:
    """Memory of one training step: a batch (a Poisson upper bound under DP) x (parameters,
    for Opacus' per-sample gradients, + ``activations``, the per-sample values the step keeps,
    ``ResolvedChain.train_values``) x 4 bytes, plus the summed gradient, the weights and two
    optimizer moments."""
    batch = poisson_batch_bound(n_train, sample_rate) if sample_rate is not None else min(batch_size, n_train)
    return (batch * (parameters + activations) * 4 + 4 * parameters * 4) / 2**20


def check_memory(policy: SitePolicy, parameters: int, *, activations: int, batch_size: int, n_train: int,
                 sample_rate: float | None) -> float:
    """Refuse a task whose training step would not fit ``max_train_memory_mb``: per-sample
    gradients and activations, from the shapes alone, before anything is allocated."""
    mb = train_memory_mb(parameters, activations=activations, batch_size=batch_size, n_train=n_train,
                         sample_rate=sample_rate)
    if mb > policy.max_train_memory_mb:
        # Public figures only: the MiB and the Poisson batch bound follow from the private row count.
        log.info("train_memory_refused", mib=round(mb, 1), n_train=n_train, sample_rate=sample_rate)
        raise PolicyViolation(
            f"max_train_memory_mb: one training step (batch_size {batch_size}, up to its Poisson bound under DP, x "
            f"({parameters} parameters' per-sample gradients + {activations} activation values) x 4 bytes) does "
            f"not fit this site's policy.max_train_memory_mb {policy.max_train_memory_mb:g}")
    return mb


def eval_memory_mb(chain: Any, *, rows: int) -> float:
    """Memory of evaluating ``rows`` rows: one inference pass of up to ``EVAL_ROWS`` rows at the
    chain's per-sample peak (``ResolvedChain.eval_values``) x 4 bytes, plus every row's outputs
    kept for the metrics (float32, and a float64 copy: 12 bytes a value)."""
    return (EVAL_ROWS * chain.eval_values * 4 + rows * chain.output_values * 12) / 2**20


def check_eval_memory(policy: SitePolicy, chain: Any, *, rows: int, release_values: int) -> float:
    """Refuse a model whose evaluation would not fit ``max_eval_memory_mb``, or whose DP metrics
    release vector (``release_values``) is longer than ``max_release_values``; from the shapes
    and the site's announced (public) row count, before anything is allocated."""
    if policy.metrics == "dp" and release_values > policy.max_release_values:
        raise PolicyViolation(
            f"max_release_values: a metrics release of this model holds {release_values} values (a model with "
            f"{chain.output_values} outputs), above this site's policy.max_release_values "
            f"{policy.max_release_values}")
    mb = eval_memory_mb(chain, rows=rows)
    if mb > policy.max_eval_memory_mb:
        raise PolicyViolation(
            f"max_eval_memory_mb: evaluating this model needs about {mb:.0f} MiB ({EVAL_ROWS} rows per pass x "
            f"{chain.eval_values} values per row at its largest layer x 4 bytes, plus {chain.output_values} outputs "
            f"per row), above this site's policy.max_eval_memory_mb {policy.max_eval_memory_mb:g}")
    return mb
