"""Each site's personalised model after a simulated run, scored on that site's own test split.

The personalised model starts from the final global model; with FedPer the site's own head
(kept in its state directory during the rounds) replaces the global head; with
``training.personalization`` the site then fine-tunes it on its own training rows
(``site_worker.personalize.personalize_at_site``: the site's code, its ledgers, its budget).
"""

from __future__ import annotations

from typing import Any

from site_worker import personalize
from site_worker.config import load_site_config
from site_worker.data import prepare


def enabled(exp: Any) -> bool:
    return personalize.personal_layers(exp) > 0 or exp.training.personalization is not None


def method(exp: Any) -> str:
    parts = []
    if personalize.personal_layers(exp) > 0:
        parts.append(f"FedPer head ({personalize.personal_layers(exp)} layer(s))")
    p = exp.training.personalization
    if p is not None:
        parts.append(f"fine-tune {p.mode} {p.epochs} epoch(s)")
    return " + ".join(parts)


def personalized_models(exp: Any, ws: Any, *, run_id: str, make_model: Any,
                        input_shape: tuple[int, ...] | None) -> dict[str, Any]:
    """``{site: model}``: what each site keeps as its own model next to the global one."""
    models: dict[str, Any] = {}
    layers = personalize.personal_layers(exp)
    for site, files in sorted(ws.sites.items()):
        cfg = load_site_config(files.config)
        model = make_model()
        if layers:
            personalize.HeadStore(cfg.state_dir).apply(model, run_id, exp.dataset.name, layers)
        if exp.training.personalization is not None:
            data = prepare(cfg.datasets[exp.dataset.name], exp.dataset, seed=int(exp.training.seed),
                           input_shape=input_shape)
            personalize.personalize_at_site(exp, model, data, state_dir=cfg.state_dir, dataset=exp.dataset.name,
                                            run_id=run_id, seed=int(exp.training.seed),
                                            min_noise=cfg.policy.min_noise_multiplier)
        model.eval()
        models[site] = model
    return models
