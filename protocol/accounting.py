"""Privacy accounting on Opacus accountant histories: the ε of a list of ``(σ, q, steps)`` entries.

Shared by the site's ledger (``site_worker.ledger``: what a dataset spent) and every planner
(``protocol.privacy_plan``: what a run will spend), so the two can never drift. A metrics
release (a Gaussian mechanism with noise σ·Δ on a vector of L2 sensitivity Δ) is the entry
``(σ, 1.0, 1)``: one step of the subsampled Gaussian with sampling rate 1, exactly the
Gaussian mechanism in RDP and PRV. Opacus is imported on first use, so importing this module
stays cheap.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

History = list[tuple[float, float, int]]


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one DP-SGD step at Opacus' default orders (the expensive part; a few pairs per site)."""
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                 orders=RDPAccountant.DEFAULT_ALPHAS), dtype=float)
    rdp.setflags(write=False)
    return rdp


def epsilon_of(history: History, *, delta: float, accountant: str = "rdp") -> float:
    """ε of an accountant with this history, as Opacus' ``get_epsilon`` computes it; 0 for no history.

    For RDP this is ``RDPAccountant.get_privacy_spent`` with the per-step RDP cached by
    (sample rate, noise): Opacus recomputes it on every call, which costs ~0.3 s.
    """
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant, create_accountant

    if accountant != "rdp":
        acc = create_accountant(mechanism=accountant)
        acc.history = [tuple(h) for h in history]
        return float(acc.get_epsilon(delta=delta))
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(_rdp_per_step(float(sr), float(nm)) * int(n) for nm, sr, n in history)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def rdp_of(history: History) -> np.ndarray:
    """The RDP curve of a Gaussian history at Opacus' default orders (to compose with other
    RDP mechanisms at the same orders, e.g. ``protocol.secagg.skellam``)."""
    import numpy as np

    return np.asarray(sum((_rdp_per_step(float(sr), float(nm)) * int(n) for nm, sr, n in history),
                          np.zeros(len(_rdp_per_step(1.0, 1.0)))), dtype=float)


def simulate_steps(history: History, *, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """The history after ``steps`` more DP-SGD steps (what ``RDPAccountant.step`` would record)."""
    out: History = [(h[0], h[1], h[2]) for h in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        nm, sr, n = out.pop()
        out.append((nm, sr, int(n) + steps))
    else:
        out.append((noise_multiplier, sample_rate, steps))
    return out


def merge(entries: Iterable[Any]) -> History:
    """Opacus-style history of ``(σ, q, steps)`` entries (consecutive equal pairs merged); the
    entries may be lists, as a ledger file stores them."""
    out: History = []
    for nm, sr, n in entries:
        out = simulate_steps(out, noise_multiplier=float(nm), sample_rate=float(sr), steps=int(n))
    return out


__all__ = ["History", "epsilon_of", "merge", "rdp_of", "simulate_steps"]
