"""A simulated site's data as its worker splits it (the simulator reads what each site holds).

Personalised models are no longer made here: after the rounds the coordinator sends each
site a ``PersonalizeTask`` and the site worker fine-tunes and reports (``coordinator/final.py``,
``site_worker/final_model.py``), in the simulator as in production. The simulator uses the
site's own split only for the privacy plan from real training rows (``simulator/privacy.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from site_worker.data import prepare

if TYPE_CHECKING:
    from protocol.config import Experiment
    from site_worker.config import SiteConfig


def site_data(cfg: SiteConfig, exp: Experiment, input_shape: tuple[int, ...] | None) -> Any:
    """The site's prepared data, split with the site's own keyed split (as its worker splits it)."""
    from site_worker.splits import SplitKey

    key = SplitKey.load_or_create(cfg.state_dir, test_fraction=cfg.policy.test_fraction)
    return prepare(cfg.datasets[exp.dataset.name], exp.dataset, key=key, input_shape=input_shape)
