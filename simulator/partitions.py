"""Split one dataset into per-site parts, each with a held-out test split kept apart.

Specs (``--partition``):

* ``iid`` - shuffled, equal sizes;
* ``dirichlet:ALPHA`` - label skew: each class is spread over sites with
  proportions drawn from Dirichlet(ALPHA) (small ALPHA, strong skew);
* ``quantity:500,800,600`` - sites of the given sizes (rows drawn iid; the sizes
  fix the number of sites);
* ``natural:COLUMN`` - one site per distinct value of COLUMN (e.g. the four
  hospitals of heart_disease), named after the value.

Each site's rows are then split (stratified where possible) into the part the site
worker trains and validates on, and a test part it never sees, used by the
simulator for the final evaluation and the baselines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np


class PartitionError(ValueError):
    """A partition spec that cannot be applied; the message says what to change."""


@dataclass(frozen=True)
class PartitionSpec:
    kind: Literal["iid", "dirichlet", "quantity", "natural"]
    alpha: float | None = None
    sizes: tuple[int, ...] = ()
    column: str | None = None

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "quantity":
            return "quantity:" + ",".join(map(str, self.sizes))
        if self.kind == "natural":
            return f"natural:{self.column}"
        return "iid"


@dataclass(frozen=True)
class Partition:
    """Row indices into the dataset, per site: ``train`` (site-visible) and ``test`` (held out)."""

    spec: PartitionSpec
    sites: tuple[str, ...]
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    groups: dict[str, str] | None = None  # natural: site id -> column value


def parse_spec(spec: str) -> PartitionSpec:
    """Parse ``iid | dirichlet:ALPHA | quantity:N,N,... | natural:COLUMN``."""
    text = spec.strip()
    kind, _, arg = text.partition(":")
    kind = kind.lower()
    if kind == "iid" and not arg:
        return PartitionSpec("iid")
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise PartitionError(f"--partition {spec!r}: ALPHA must be a number, e.g. dirichlet:0.5") from None
        if not alpha > 0:
            raise PartitionError(f"--partition {spec!r}: ALPHA must be > 0")
        return PartitionSpec("dirichlet", alpha=alpha)
    if kind == "quantity":
        try:
            sizes = tuple(int(s) for s in arg.split(","))
        except ValueError:
            raise PartitionError(f"--partition {spec!r}: sizes must be integers, e.g. quantity:500,800,600") from None
        if not sizes or min(sizes) < 2:
            raise PartitionError(f"--partition {spec!r}: give at least one size, each >= 2")
        return PartitionSpec("quantity", sizes=sizes)
    if kind == "natural" and arg:
        return PartitionSpec("natural", column=arg)
    raise PartitionError(
        f"--partition {spec!r}: use iid, dirichlet:ALPHA, quantity:N,N,... or natural:COLUMN"
    )


def site_slug(value: object) -> str:
    """A site id from a column value: ``"VA Long Beach"`` -> ``"va-long-beach"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(value).strip().lower()).strip("-")
    return slug or "site"


def make_partition(
    labels: np.ndarray,
    spec: PartitionSpec | str,
    *,
    sites: int | None = None,
    seed: int = 42,
    test_fraction: float = 0.2,
    groups: np.ndarray | None = None,
    min_rows: int = 8,
) -> Partition:
    """Assign every row to one site, then split each site's rows into train and test.

    ``groups`` holds the column values for ``natural:COLUMN``. ``sites`` is the site
    count for iid/dirichlet (natural and quantity determine it; a different explicit
    count is an error, not silently ignored).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    labels = np.asarray(labels)
    n = labels.shape[0]
    rng = np.random.default_rng(seed)
    names: list[str]
    group_of: dict[str, str] | None = None
    if spec.kind == "natural":
        if groups is None:
            raise PartitionError(f"--partition {spec}: the dataset has no column {spec.column!r}")
        values = sorted({str(v) for v in groups})
        if sites is not None and sites != len(values):
            raise PartitionError(
                f"--partition {spec} gives {len(values)} sites ({', '.join(values)}); drop --sites or set it to {len(values)}"
            )
        names = [site_slug(v) for v in values]
        if len(set(names)) != len(names):
            raise PartitionError(f"--partition {spec}: values {values} give duplicate site ids {names}")
        text = np.array([str(v) for v in groups])
        parts = [np.flatnonzero(text == v) for v in values]
        parts = [rng.permutation(p) for p in parts]
        group_of = dict(zip(names, values))
    elif spec.kind == "quantity":
        if sites is not None and sites != len(spec.sizes):
            raise PartitionError(
                f"--partition {spec} gives {len(spec.sizes)} sites; drop --sites or set it to {len(spec.sizes)}"
            )
        if sum(spec.sizes) > n:
            raise PartitionError(f"--partition {spec} asks for {sum(spec.sizes)} rows; the dataset has {n}")
        order = rng.permutation(n)
        bounds = np.cumsum((0, *spec.sizes))
        parts = [order[bounds[i] : bounds[i + 1]] for i in range(len(spec.sizes))]
        names = _numbered(len(parts))
    else:
        count = sites if sites is not None else 3
        if count < 1:
            raise PartitionError(f"--sites must be >= 1, got {count}")
        if n < count * min_rows:
            raise PartitionError(
                f"{count} sites need at least {count * min_rows} rows ({min_rows} each); the dataset has {n}"
            )
        if spec.kind == "iid":
            parts = np.array_split(rng.permutation(n), count)
        else:
            parts = _dirichlet(labels, count, float(spec.alpha or 1.0), rng, min_rows)
        names = _numbered(count)
    train: dict[str, np.ndarray] = {}
    test: dict[str, np.ndarray] = {}
    for name, rows in zip(names, parts):
        if rows.shape[0] < min_rows:
            raise PartitionError(f"site {name} got {rows.shape[0]} rows; at least {min_rows} are needed")
        tr, te = _train_test(rows, labels[rows], test_fraction, rng)
        train[name], test[name] = np.sort(tr), np.sort(te)
    return Partition(spec=spec, sites=tuple(names), train=train, test=test, groups=group_of)


def _numbered(count: int) -> list[str]:
    return [f"site-{i + 1}" for i in range(count)]


def _dirichlet(
    labels: np.ndarray, count: int, alpha: float, rng: np.random.Generator, min_rows: int
) -> list[np.ndarray]:
    """Label-skewed split; redraws (bounded) until every site has ``min_rows`` rows."""
    classes = np.unique(labels)
    for _ in range(100):
        buckets: list[list[np.ndarray]] = [[] for _ in range(count)]
        for c in classes:
            rows = rng.permutation(np.flatnonzero(labels == c))
            share = rng.dirichlet(np.full(count, alpha))
            cuts = (np.cumsum(share)[:-1] * rows.shape[0]).astype(int)
            for site, piece in enumerate(np.split(rows, cuts)):
                buckets[site].append(piece)
        parts = [rng.permutation(np.concatenate(b)) for b in buckets]
        if min(p.shape[0] for p in parts) >= min_rows:
            return parts
    raise PartitionError(
        f"dirichlet:{alpha:g} over {count} sites keeps leaving a site with fewer than {min_rows} rows; "
        "raise ALPHA or lower --sites"
    )


def _train_test(
    rows: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of one site's rows; every class with >= 2 rows lands in both parts."""
    test: list[np.ndarray] = []
    train: list[np.ndarray] = []
    for c in np.unique(labels):
        mine = rng.permutation(rows[labels == c])
        k = int(round(mine.shape[0] * fraction))
        if mine.shape[0] >= 2:
            k = min(max(k, 1), mine.shape[0] - 1)
        else:
            k = 0
        test.append(mine[:k])
        train.append(mine[k:])
    return np.concatenate(train), np.concatenate(test)


def label_skew(partition: Partition, labels: np.ndarray) -> float:
    """Mean total-variation distance between each site's label mix and the global one (0 = iid)."""
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    distances = []
    for site in partition.sites:
        rows = np.concatenate([partition.train[site], partition.test[site]])
        mine = np.array([(labels[rows] == c).mean() for c in classes])
        distances.append(0.5 * np.abs(mine - overall).sum())
    return float(np.mean(distances))
