"""What a site's hello says about each dataset's privacy budget: its own ledger, read at hello time.

Daemons and simulated sites both say hello through ``SiteWorker.hello`` and so through
this function: the coordinator (and its dashboard) learns ε spent against the budget
per dataset before any run, at the δ and with the accountant the site reports every ε
at. These are the site's own bookkeeping figures (no patient value; the same ε every
Update already carries), not a new release.
"""

from __future__ import annotations

from dataclasses import replace

from protocol.messages import DatasetInfo
from protocol.policy import SitePolicy
from site_worker.ledger import PrivacyLedger


def with_budget(info: DatasetInfo, *, ledger: PrivacyLedger, policy: SitePolicy) -> DatasetInfo:
    """``info`` plus ε spent (all committed and reserved releases), the budget, δ and accountant."""
    delta = policy.site_delta(info.rows)
    spent = ledger.spent(info.name, delta=delta, accountant=policy.accountant)
    return replace(info, epsilon_spent=float(spent), max_epsilon=policy.max_epsilon, delta=float(delta),
                   accountant=policy.accountant)


__all__ = ["with_budget"]
