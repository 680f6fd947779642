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


def site_data(cfg: Any, exp: Any, input_shape: tuple[int, ...] | None) -> Any:
    """The site's prepared data, split with the site's own keyed split (as its worker splits it)."""
    from site_worker.splits import SplitKey

    key = SplitKey.load_or_create(cfg.state_dir, test_fraction=cfg.policy.test_fraction)
    return prepare(cfg.datasets[exp.dataset.name], exp.dataset, key=key, input_shape=input_shape)


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
            data = site_data(cfg, exp, input_shape)
            personalize.personalize_at_site(exp, model, data, config=cfg, dataset=exp.dataset.name, run_id=run_id,
                                            seed=int(exp.training.seed))
        model.eval()
        models[site] = model
    return models
