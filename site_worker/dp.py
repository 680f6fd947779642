"""The site's side of a DP task: its secret noise, and the memory checks made from shapes alone.

What a task will spend (``DPPlan``, ``plan_dp``, ``site_plan``: the policy's checks of the
experiment's DP request) is ``protocol.dp_plan``, shared with every planner (issue 21).
"""

from __future__ import annotations

from typing import Any, Callable

import structlog

from protocol.policy import PolicyViolation, SitePolicy
from site_worker.metrics import EVAL_ROWS
from site_worker.secure_rng import SecureRandom, poisson_batch_bound

log = structlog.get_logger(__name__)


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
                    sample_rate: float | None, ghost_values: int | None = None) -> float:
    """Memory of one training step: a batch (a Poisson upper bound under DP) x (the per-sample
    values the step keeps, ``activations`` = ``ResolvedChain.train_values``, + the per-sample
    gradients) x 4 bytes, plus the summed gradient, the weights and two optimizer moments.

    Per-sample gradients are every parameter at once (Opacus' ``GradSampleModule``), or with
    ghost clipping (``ghost_values`` = ``ResolvedChain.ghost_values``) only the largest one
    layer makes and drops in its backward hook."""
    batch = poisson_batch_bound(n_train, sample_rate) if sample_rate is not None else min(batch_size, n_train)
    per_sample = parameters if ghost_values is None else ghost_values
    return (batch * (per_sample + activations) * 4 + 4 * parameters * 4) / 2**20


def step_ghost_values(chain: Any, *, dp: bool) -> int | None:
    """``ghost_values`` for ``check_memory``: the chain's under DP when ghost clipping trains it
    (``ResolvedChain.clipping``), else None (per-sample gradients of every parameter, the bound
    without DP too)."""
    return chain.ghost_values if dp and chain.clipping == "ghost" else None


def check_memory(policy: SitePolicy, parameters: int, *, activations: int, batch_size: int, n_train: int,
                 sample_rate: float | None, ghost_values: int | None = None) -> float:
    """Refuse a task whose training step would not fit ``max_train_memory_mb``: per-sample
    gradients and activations, from the shapes alone, before anything is allocated."""
    mb = train_memory_mb(parameters, activations=activations, batch_size=batch_size, n_train=n_train,
                         sample_rate=sample_rate, ghost_values=ghost_values)
    if mb > policy.max_train_memory_mb:
        # Public figures only: the MiB and the Poisson batch bound follow from the private row count.
        log.info("train_memory_refused", mib=round(mb, 1), n_train=n_train, sample_rate=sample_rate)
        grads = (f"{parameters} parameters' per-sample gradients" if ghost_values is None else
                 f"{ghost_values} values of ghost clipping's largest layer")
        raise PolicyViolation(
            f"max_train_memory_mb: one training step (batch_size {batch_size}, up to its Poisson bound under DP, x "
            f"({grads} + {activations} activation values) x 4 bytes, plus 4 x {parameters} weights' values) does "
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
