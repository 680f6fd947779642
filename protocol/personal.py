"""Which tensors of a model stay at the site in personalised FL (FedPer's personal head).

One rule both sides apply: the coordinator's ``FedPer`` aggregator names the number of
personal layers in ``TrainTask.config["personal_layers"]``; the site keeps the tensors of
the last that many parameterised modules (grouped by state-dict name prefix) as its own.
"""

from __future__ import annotations

from collections.abc import Iterable


def personal_names(names: Iterable[str], layers: int) -> list[str]:
    """Tensor names of the last ``layers`` modules (``"4.weight"``, ``"4.bias"``, ...), in order."""
    names = list(names)
    if layers <= 0:
        return []
    groups: list[str] = []
    for n in names:
        prefix = n.rsplit(".", 1)[0] if "." in n else ""
        if not groups or groups[-1] != prefix:
            groups.append(prefix)
    keep = set(groups[-layers:])
    return [n for n in names if (n.rsplit(".", 1)[0] if "." in n else "") in keep]
