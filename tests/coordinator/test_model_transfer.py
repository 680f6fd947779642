"""Publish once, fetch by hash (issue 23): the model's chunks are fanned out by the broker once per
version; a site verifies them against the signed hash before use, caches them, and declines a
version it does not hold instead of waiting."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from coordinator.models import ModelPublisher
from protocol.messages import TrainTask
from protocol.model_blob import MODEL_CHUNK_HEADER, iter_chunks, model_ref
from protocol.transport import Topology, open_bus
from protocol.transport.topology import site_queue
from site_worker.model_cache import ChunkRefused, ModelCache, ModelMismatch, ModelUnavailable
from tests.transport.conftest import Collector


def tensors(n: int = 1000, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (("a.weight", rng.normal(size=(n, 3)).astype(np.float32)), ("a.bias", rng.normal(size=n).astype(np.float32)))


def task_for(ref, **over) -> TrainTask:
    fields = {"model_sha256": ref.sha256, "model_size": ref.size, "model_chunks": ref.chunks, **over}
    return TrainTask(experiment={}, weights=(), dataset="d", base_round=0, seed=1, deadline=0.0, **fields)


def cached(tmp: Path, w, *, chunk_size: int, max_bytes: int = 2**30) -> tuple[ModelCache, object]:
    cache = ModelCache(tmp, max_bytes=max_bytes)
    ref = model_ref(w, chunk_size=chunk_size)
    for digest, chunk in zip(ref.chunks, iter_chunks(w, chunk_size=chunk_size), strict=True):
        cache.put(digest, chunk)
    return cache, ref


@pytest.mark.parametrize("chunk_size", [1, 4096, 16_000, 16_036, 10**7])
def test_chunks_reassemble_to_the_same_tensors_zero_copy(tmp_path, chunk_size):
    w = tensors()
    cache, ref = cached(tmp_path, w, chunk_size=chunk_size)
    if chunk_size > 100:  # (1-byte chunks: a few hundred thousand files; the count is the point)
        assert len(ref.chunks) == -(-ref.size // chunk_size)
    out = cache.resolve(task_for(ref))
    assert [n for n, _ in out] == [n for n, _ in w]
    for (_, a), (_, b) in zip(out, w):
        np.testing.assert_array_equal(a, b)
    assert out[0][1].base is not None  # a view of the assembled buffer, not a copy


def test_a_chunk_that_does_not_match_its_claim_is_refused_and_not_stored(tmp_path):
    cache = ModelCache(tmp_path)
    good = b"x" * 100
    claim = hashlib.sha256(good).hexdigest()
    assert cache.put(claim, good) == claim  # just inside: the claim matches
    tampered = b"x" * 99 + b"y"  # just outside: one byte differs from what its claim hashes
    with pytest.raises(ChunkRefused, match="tampered"):
        cache.put(hashlib.sha256(b"z" * 100).hexdigest(), tampered)
    assert not cache.has(hashlib.sha256(tampered).hexdigest())
    with pytest.raises(ChunkRefused, match="not a sha256"):
        cache.put("../../etc/passwd", good)


def test_the_whole_blob_is_verified_against_the_signed_hash_before_use(tmp_path):
    w = tensors()
    cache, ref = cached(tmp_path, w, chunk_size=4096)
    cache.resolve(task_for(ref))  # the signed hash: used
    wrong = hashlib.sha256(b"another model").hexdigest()
    with pytest.raises(ModelMismatch, match="refused unused"):
        cache.resolve(task_for(ref, model_sha256=wrong))
    with pytest.raises(ModelMismatch):
        cache.resolve(task_for(ref, model_size=ref.size - 1))
    # A chunk corrupted on disk after it was stored is caught too.
    (cache.dir / ref.chunks[1]).write_bytes(b"\0" * 4096)
    with pytest.raises(ModelMismatch, match="no longer hashes"):
        cache.resolve(task_for(ref))


def test_a_gone_version_is_unavailable_and_the_cache_is_bounded(tmp_path):
    w = tensors()
    size = model_ref(w, chunk_size=4096).size
    cache, ref = cached(tmp_path, w, chunk_size=4096, max_bytes=size)  # just fits
    cache.resolve(task_for(ref))
    small, small_ref = cached(tmp_path / "b", w, chunk_size=4096, max_bytes=size - 1)  # one byte short: evicts
    assert sum(p.stat().st_size for p in small.dir.iterdir()) <= size - 1
    with pytest.raises(ModelUnavailable, match="not in this site's cache"):
        small.resolve(task_for(small_ref))


# ------------------------------------------------------------------ over a bus (memory and RabbitMQ)
def test_each_version_is_published_once_and_fanned_out_to_every_site(bus_url):
    tag = uuid.uuid4().hex[:8]
    sites = [f"site-{tag}-{i}" for i in range(3)]
    bus = open_bus(bus_url, chunk_size=4096)
    bus.declare(Topology(sites=sites, federations=[f"fed-{tag}"]))
    got = {s: Collector(lambda d: d.ack()) for s in sites}
    consumers = [bus.consume(site_queue(s), got[s], prefetch=8) for s in sites]
    try:
        models = ModelPublisher(bus, chunk_size=4096, inline_below=0)
        w = tensors()
        ref = models.ref(w)
        assert ref is not None and len(ref.chunks) > 1
        models.send(w, ref, sites)
        models.send(w, ref, sites)  # already sent: nothing more
        assert (models.publishes, models.bytes_published) == (1, ref.size)  # egress: one model for three sites
        for s in sites:
            assert got[s].wait_count(len(ref.chunks)), s
            assert [d.headers[MODEL_CHUNK_HEADER] for d in got[s].deliveries] == list(ref.chunks)
            assert all("BCC" not in d.headers for d in got[s].deliveries)  # the broker strips it
        models.forget(sites[0])  # it declined model_unavailable: the next task re-sends to it alone
        models.send(w, ref, sites)
        assert (models.publishes, models.bytes_published) == (2, 2 * ref.size)
        assert got[sites[0]].wait_count(2 * len(ref.chunks))
        assert len(got[sites[1]].deliveries) == len(ref.chunks)
    finally:
        for c in consumers:
            c.cancel()
        if bus_url.startswith("amqp"):
            for s in sites:
                bus.delete_queue(site_queue(s))  # type: ignore[attr-defined]
        bus.close()


def test_small_models_stay_inline(tmp_path):
    bus = open_bus(f"memory://inline-{uuid.uuid4().hex[:6]}")
    w = tensors(10)
    size = model_ref(w, chunk_size=4096).size
    assert ModelPublisher(bus, inline_below=size + 1).ref(w) is None  # just under the threshold: inline
    assert ModelPublisher(bus, inline_below=size).ref(w) is not None  # at it: by hash
    bus.close()


# ------------------------------------------------------------------ a real site worker
@pytest.fixture
def hospital(tmp_path, bus_url):
    """One heart-failure hospital (site_worker.daemon) and a test coordinator on ``bus_url``."""
    import pandas as pd

    from coordinator.state import StateStore
    from protocol.signing import Signer, generate_keypair
    from site_worker.daemon import SiteWorker
    from tests.site_worker.support import TestCoordinator, enrolled_hospital, heart_failure_csv

    fed, sid = f"fed-{uuid.uuid4().hex[:8]}", f"hosp-{uuid.uuid4().hex[:8]}"
    url = bus_url if bus_url.startswith("amqp") else f"memory://mt-{uuid.uuid4().hex[:8]}"
    ckey, cpub = generate_keypair("coordinator", tmp_path / "keys")
    store = StateStore(tmp_path / "coord")
    rows = pd.read_csv(heart_failure_csv(tmp_path / "hf.csv")).iloc[:120]
    cfg = enrolled_hospital(tmp_path, rows, site_id=sid, store=store, federation=fed, broker_url=url,
                            coordinator_pub=cpub, policy={"max_epsilon": 100.0})
    bus = open_bus(url, chunk_size=2048)
    coord = TestCoordinator(bus, Signer.from_file(ckey), federation=fed, site_id=sid,
                            site_pub=tmp_path / "keys" / f"{sid}.pub")
    worker = SiteWorker(cfg, bus=open_bus(url))
    worker.start()
    dead = Collector(lambda d: d.ack())
    yield coord, worker, bus, url, dead
    worker.stop(grace_s=2)
    coord.close()
    if url.startswith("amqp"):
        from protocol.transport.topology import control_queue, updates_queue

        for q in (site_queue(sid), updates_queue(fed), control_queue(fed)):
            bus.delete_queue(q)  # type: ignore[attr-defined]
    bus.close()


def test_a_site_trains_on_the_verified_model_refuses_a_wrong_hash_and_declines_a_gone_version(hospital):
    from protocol.transport.memory import get_broker
    from tests.site_worker.support import experiment_dict, initial_weights

    coord, worker, bus, url, _ = hospital
    exp = experiment_dict(**{"training.epochs": 1})
    w = initial_weights(exp)
    ref = model_ref(w, chunk_size=2048)

    def task(**over):
        fields = {"model_sha256": ref.sha256, "model_size": ref.size, "model_chunks": ref.chunks, **over}
        env = coord.task_envelope(TrainTask(experiment=exp, weights=(), dataset="heart_failure", base_round=0,
                                            seed=7, deadline=time.time() + 600, **fields))
        coord.publish(env)
        return env

    # Not sent yet: a Declined naming the reason, at once (never a wait).
    env = task()
    reply = coord.reply(timeout=60)
    assert (reply.type, reply.payload.task_id, reply.payload.reason) == ("Declined", env.message_id, "model_unavailable")
    # The chunks, once to the site queue (one of them tampered first: refused, not stored).
    models = ModelPublisher(bus, chunk_size=2048, inline_below=0)
    bad = bytearray(next(iter_chunks(w, chunk_size=2048)))
    bad[0] ^= 1
    bus.publish("fedbus.tasks", coord.site_id, bytes(bad), message_id=uuid.uuid4().hex,
                headers={MODEL_CHUNK_HEADER: ref.chunks[0]})
    models.send(w, models.ref(w), [coord.site_id])
    # A task naming another hash over the same chunks: dead-lettered unrun, no reply.
    wrong = task(model_sha256=hashlib.sha256(b"not this model").hexdigest())
    assert coord.no_reply(1.0)
    # The signed hash: trained.
    env = task()
    reply = coord.reply(timeout=120)
    assert (reply.type, reply.payload.task_id) == ("Update", env.message_id)
    assert worker.stats["rejected"] == 2  # the tampered chunk and the wrong-hash task, both before the Update
    if url.startswith("memory"):
        reasons = {d.message_id: d.reason for d in get_broker(url.split("//")[1]).dead_letters()}
        assert reasons[wrong.message_id].startswith("model_hash_mismatch")
        assert any(r.startswith("model_chunk_refused") for r in reasons.values())


@pytest.mark.slow
def test_a_run_publishes_each_version_once_whatever_the_number_of_sites(tmp_path):
    from coordinator.run import Coordinator
    from tests.site_worker.support import experiment_dict, running_hospitals

    with running_hospitals(tmp_path, {f"h{i}": {"max_epsilon": 100.0} for i in (1, 2, 3)}, url_prefix="mt") as run:
        bus, signer, state, fed, sites = run
        exp = experiment_dict(**{"training.epochs": 1, "training.rounds": 2, "federated.parameters.fraction_eval": 0.0})
        coord = Coordinator(exp, bus=bus, state_dir=state, signer=signer, federation=fed, progress=False,
                            model_inline_below=0)
        result = coord.run()
        assert result.ok, result.reason
        assert [r["replies"] for r in result.to_json()["rounds"]] == [3, 3]
        models = coord.tasks.models
        # Round 1's model, round 2's, and the final one for the closing test/personalise tasks.
        assert models.publishes == 3
        sizes = [model_ref(w, chunk_size=models.chunk_size).size for w in (result.weights,)]
        assert models.bytes_published == 3 * sizes[0]  # the same layout each version: one model each, not three
