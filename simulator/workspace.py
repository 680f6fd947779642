"""The on-disk set-up of a simulated federation, laid out as production lays it out.

``WORK/keys`` holds the coordinator's and every site's Ed25519 key pair; each site gets
``WORK/sites/<site>/`` with its own ``site.toml``, state directory and training file
(CSV or ``.npy`` pair) that its worker reads exactly as a hospital's worker would;
the held-out test splits live in ``WORK/holdout/``, outside every site's config, so no
site can read them. The coordinator's state directory has every site enrolled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.signing import generate_keypair
from site_worker.readers import by_kind
from simulator.datasets import SimDataset
from simulator.partitions import Partition


@dataclass(frozen=True)
class SiteFiles:
    site: str
    config: Path  # site.toml
    train: Path  # the site's data file (the _X.npy path for signals)
    test: Path  # held-out split, outside the site's config
    key: Path
    pub: Path


@dataclass(frozen=True)
class Workspace:
    root: Path
    coordinator_state: Path
    coordinator_key: Path
    coordinator_pub: Path
    sites: dict[str, SiteFiles]


SUGGESTED_BUDGET = 10.0  # deploy/site.toml's suggested max_epsilon, what `simulate --site-budget` mirrors


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def site_toml(
    *, site_id: str, federation: str, broker_url: str, key: Path, coordinator_pub: Path, state_dir: Path,
    dataset: str, train: Path, target: str, kind: str = "tabular", dp_seed: int | None = None,
    max_epsilon: float | None = None, peers: bool = False, metrics: str = "exact", test_fraction: float | None = None,
) -> str:
    """The ``site.toml`` a hospital would write for this site (see deploy/site.toml)."""
    lines = [
        f"site_id = {_toml_str(site_id)}",
        f"federation = {_toml_str(federation)}",
        f"broker_url = {_toml_str(broker_url)}",
        f"key_path = {_toml_str(str(key))}",
        f"coordinator_pub = {_toml_str(str(coordinator_pub))}",
        f"state_dir = {_toml_str(str(state_dir))}",
        "grace_s = 5.0",
    ]
    if peers:  # every site's .pub (secure aggregation): only for runs that ask for it
        lines.append(f"peers_dir = {_toml_str(str(coordinator_pub.parent))}")
    lines += [
        "",
        "[policy]",
        "allow_no_dp = true  # simulated experiments may run without DP; a hospital decides this itself",
        (f"metrics = {_toml_str(metrics)}" if metrics != "exact" else
         'metrics = "exact"  # research default: exact validation metrics (a leak a hospital would not allow)'),
        "max_sample_rate = 1.0  # small simulated partitions train in one batch",
        "max_evaluations_per_run = 100000",
    ]
    if test_fraction is not None:  # a project's kits may set it (the README demo: 0.4)
        lines.append(f"test_fraction = {float(test_fraction)!r}")
    if max_epsilon is not None:  # simulate --site-budget EPS: a hospital's lifetime budget per dataset
        lines.append(f"max_epsilon = {float(max_epsilon)!r}  # the site's lifetime budget per dataset")
    else:  # research default: no limit, so any experiment (a MediNet export included) runs; ε is still announced
        lines.append("# max_epsilon unset: this simulated site spends what the experiment asks (simulate --site-budget sets one)")
    if dp_seed is not None:  # fedbus simulate --reproducible-dp: DP noise from a site seed, reported as such
        lines += ["reproducible_dp = true", f"dp_seed = {int(dp_seed) & 0x7FFFFFFFFFFFFFFF}"]
    lines += [
        "",
        f"[datasets.{_toml_str(dataset)}]",
        f"path = {_toml_str(str(train))}",
        f"target = {_toml_str(target)}",
    ]
    lines += [f"{k} = {_toml_str(v)}" for k, v in by_kind(kind).site_toml(train).items()]  # the reader's keys
    return "\n".join(lines) + "\n"


def build_workspace(
    root: Path,
    *,
    data: SimDataset,
    partition: Partition,
    site_ids: dict[str, str],
    federation: str,
    broker_url: str,
    dataset_name: str,
    coordinator_state: Path,
    dp_seed: int | None = None,
    split_seed: int | None = None,
    site_budget: float | None = None,
    peers: bool = False,
    site_metrics: str = "exact",
    site_test_fraction: float | None = None,
    site_broker_urls: dict[str, str] | None = None,
) -> Workspace:
    """Keys, per-site files and configs, enrolment. ``site_ids`` maps partition site -> site id;
    ``site_broker_urls``: a site's own broker URL (its own broker user), else ``broker_url``."""
    root.mkdir(parents=True, exist_ok=True)
    keys = root / "keys"
    ckey, cpub = generate_keypair("coordinator", keys)
    sites: dict[str, SiteFiles] = {}
    for part_site in partition.sites:
        sid = site_ids[part_site]
        key, pub = generate_keypair(sid, keys)
        home = root / "sites" / sid
        train = data.subset(partition.train[part_site]).write(home / "data" / "train")
        test = data.subset(partition.test[part_site]).write(root / "holdout" / f"{sid}_test")
        cfg = home / "site.toml"
        cfg.write_text(
            site_toml(
                site_id=sid, federation=federation, broker_url=(site_broker_urls or {}).get(sid, broker_url), key=key,
                coordinator_pub=cpub,
                state_dir=home / "state", dataset=dataset_name, train=train, target=data.target,
                kind=data.kind, dp_seed=dp_seed, max_epsilon=site_budget, peers=peers, metrics=site_metrics,
                test_fraction=site_test_fraction,
            ),
            encoding="utf-8",
        )
        if split_seed is not None:
            _seed_split_secret(home / "state", split_seed, sid)
        sites[sid] = SiteFiles(site=sid, config=cfg, train=train, test=test, key=key, pub=pub)
    enroll(coordinator_state, {s: f.pub for s, f in sites.items()})
    return Workspace(root=root, coordinator_state=coordinator_state, coordinator_key=ckey, coordinator_pub=cpub, sites=sites)


def _seed_split_secret(state_dir: Path, seed: int, site: str) -> None:
    """A simulated site's split secret from the run seed, so same seed, same splits (a real site
    draws its own from the OS on first start: site_worker.splits)."""
    import hashlib

    from protocol.durable import write_atomic
    from site_worker.splits import SECRET_FILE

    secret = hashlib.sha256(f"fedbus-simulated-split\0{int(seed)}\0{site}".encode()).digest()
    write_atomic(state_dir / SECRET_FILE, secret, mode=0o600)


def enroll(state_dir: Path, pubs: dict[str, Path]) -> None:
    """Enroll every site's public key in the coordinator's state (as ``fedbus coordinator enroll``)."""
    from coordinator.state import StateStore

    store = StateStore(state_dir)
    try:
        for site, pub in pubs.items():
            store.enroll(site, pub.read_bytes())
    finally:
        store.close()


def describe(ws: Workspace) -> dict[str, Any]:
    return {"root": str(ws.root), "coordinator_state": str(ws.coordinator_state), "sites": len(ws.sites)}
