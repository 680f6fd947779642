"""Drive an existing Flower ``NumPyClient`` with fedbus tasks.

A hospital that already has a Flower client (``get_parameters``/``fit``/``evaluate``)
names its factory in ``site.toml`` as ``flower_client = "module:function"``; the site
worker then calls the client instead of its own trainer. Parameters travel in the
task's tensor order; the client's returned arrays are matched back to those names and
shapes, so the coordinator receives exactly the layout it sent.

The site's ledger covers this path too: a client declares the DP parameters it trains
with (``fedbus_dp_plan``) and the handler checks and reserves them before ``fit``; a
client that declares none runs only where the policy allows an unprotected client.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
from typing import Any, Callable

import numpy as np

from protocol.messages import EvalResult, EvalTask, Tensors, TrainTask, Update
from protocol.dp_plan import DPPlan


class FlowerClientError(RuntimeError):
    """The Flower client could not be loaded or returned something unusable."""


def load_factory(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` from the site's own code (never from the wire)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FlowerClientError(f"flower_client: cannot import module {module_name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise FlowerClientError(f"flower_client: {spec!r} is not a callable in {module_name}")
    return factory


def make_client(spec: str, site_config: Any) -> Any:
    """Call the factory (with the SiteConfig when it takes an argument) and check the result."""
    from flwr.client import NumPyClient

    factory = load_factory(spec)
    takes_arg = any(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                    for p in inspect.signature(factory).parameters.values())
    client = factory(site_config) if takes_arg else factory()
    if not isinstance(client, NumPyClient):
        raise FlowerClientError(f"flower_client: {spec!r} returned {type(client).__name__}, not a flwr NumPyClient")
    return client


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in (metrics or {}).items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _flower_config(task: TrainTask | EvalTask, server_round: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {"server_round": server_round, "seed": task.seed, "dataset": task.dataset,
                           "base_round": task.base_round}
    cfg.update(task.config.overrides())  # epochs, learning_rate, ... where the task sets them
    if task.config.proximal_mu > 0:
        cfg["proximal_mu"] = task.config.proximal_mu
    if task.config.personal_layers > 0:
        cfg["personal_layers"] = task.config.personal_layers
    return cfg


class FlowerAdapter:
    """fedbus TrainTask/EvalTask -> NumPyClient.fit/evaluate -> Update/EvalResult."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def shapes(self) -> list[tuple[int, ...]]:
        """The client's own parameter shapes (``get_parameters``), for checks and diagnostics."""
        return [tuple(np.asarray(a).shape) for a in self.client.get_parameters(config={})]

    def _check(self, names: list[str], like: Tensors, arrays: list[Any]) -> Tensors:
        if len(arrays) != len(like):
            raise FlowerClientError(f"the Flower client returned {len(arrays)} arrays, the task has {len(like)}")
        out = []
        for (name, ref), arr in zip(like, arrays):
            a = np.ascontiguousarray(np.asarray(arr))
            if a.shape != ref.shape:
                raise FlowerClientError(f"the Flower client returned shape {list(a.shape)} for {name!r}, "
                                        f"expected {list(ref.shape)}")
            out.append((name, a.astype(ref.dtype, copy=False)))
        return tuple(out)

    def dp_plan(self, task: TrainTask, *, server_round: int) -> DPPlan | None:
        """The DP parameters the client declares for this fit (``fedbus_dp_plan(config)`` returning
        ``{"noise_multiplier", "sample_rate", "steps", "max_grad_norm"}``), or None when it declares none.
        The site cannot see inside the client: it accounts what the client declares."""
        declare = getattr(self.client, "fedbus_dp_plan", None)
        if not callable(declare):
            return None
        doc = declare(_flower_config(task, server_round))
        try:
            return DPPlan(noise_multiplier=float(doc["noise_multiplier"]), sample_rate=float(doc["sample_rate"]),
                          steps=int(doc["steps"]), max_grad_norm=float(doc.get("max_grad_norm", 1.0)),
                          delta=0.0, accountant="")
        except (KeyError, TypeError, ValueError):
            raise FlowerClientError("fedbus_dp_plan must return noise_multiplier, sample_rate and steps") from None

    def fit(self, task: TrainTask, *, task_id: str, server_round: int, epsilon: float | None,
            delta: float | None, keep_metrics: bool) -> Update:
        """Run the client's fit; epsilon/delta are the ledger's (the client's own are dropped), and
        its metrics (exact statistics of private rows) travel only with ``keep_metrics``."""
        params = [np.array(a, copy=True) for _, a in task.weights]  # writable copies: clients mutate
        result = self.client.fit(parameters=params, config=_flower_config(task, server_round))
        try:
            new_params, num_examples, metrics = result
        except (TypeError, ValueError):
            raise FlowerClientError("NumPyClient.fit must return (parameters, num_examples, metrics)") from None
        weights = self._check([n for n, _ in task.weights], task.weights, list(new_params))
        m = _numeric(metrics)
        m.pop("epsilon", None)
        m.pop("delta", None)
        return Update(task_id=task_id, weights=weights, num_examples=int(num_examples),
                      metrics=m if keep_metrics else {}, epsilon=epsilon, delta=delta, base_round=task.base_round)

    def evaluate(self, task: EvalTask, *, task_id: str, server_round: int) -> EvalResult:
        params = [np.array(a, copy=True) for _, a in task.weights]
        result = self.client.evaluate(parameters=params, config=_flower_config(task, server_round))
        try:
            loss, num_examples, metrics = result
        except (TypeError, ValueError):
            raise FlowerClientError("NumPyClient.evaluate must return (loss, num_examples, metrics)") from None
        m = _numeric(metrics)
        m["loss"] = float(loss)
        m["n"] = float(num_examples)
        return EvalResult(task_id=task_id, num_examples=int(num_examples), metrics=m, base_round=task.base_round)
