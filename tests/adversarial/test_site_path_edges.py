"""A malicious coordinator against each site cap at its edge, on the paths the unit tests do not
reach (issue 26, place 3): a Flower client's declared DP plan against every cap it must
respect, each alone, and an evaluation of the training rows.

The site is the production ``SiteWorker`` on the in-memory bus; every task is signed with the
coordinator's real key. A declined task leaves the ledger as it was.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import pytest

from protocol.codec import encode_envelope, encode_frame, signed_digest
from protocol.messages import Declined, EvalResult, EvalTask, Update
from tests.adversarial.site_harness import start_site, stop_site
from tests.site_worker.support import initial_weights
from tests.site_worker.test_flower_adapter import tiny_experiment

DECLARING = "tests.adversarial.dp_flower_client:make_declaring_client"
# Every cap at the value the client declares by default (DeclaringClient.plan), and 3 epochs.
EDGES = {"min_noise_multiplier": 1.0, "max_sample_rate": 0.25, "max_steps_per_task": 6, "max_epochs": 3,
         "max_epsilon": 1000.0}


@pytest.fixture
def flower_site(tmp_path):
    site = start_site(tmp_path, f"memory://edge-{uuid.uuid4().hex[:8]}", policy=EDGES,
                      extra={"flower_client": DECLARING})
    yield site
    stop_site(site)


def _dp_experiment() -> dict:
    exp = tiny_experiment()
    exp["training"]["optimizer"]["differential_privacy"] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    return exp


@pytest.mark.parametrize("declared, epochs, setting", [
    ({"noise_multiplier": 0.9999999}, 3, "min_noise_multiplier"),
    ({"sample_rate": 0.2500001}, 3, "max_sample_rate"),
    ({"steps": 7}, 3, "max_steps_per_task"),
    ({}, 4, "max_epochs"),
])
def test_a_flower_clients_plan_is_held_to_every_cap_each_alone(flower_site, declared, epochs, setting):
    """At every edge at once the client trains and is charged; one value past one cap, the
    others still at theirs, is declined naming that cap, and charges nothing."""
    exp = _dp_experiment()
    client = flower_site.worker.handler.flower.client
    reply = flower_site.coordinator.train(exp, weights=initial_weights(exp), config={"epochs": 3})
    assert isinstance(reply, Update) and reply.epsilon is not None and reply.epsilon > 0, reply
    charged = list(flower_site.ledger.history("heart_failure"))
    assert charged == [(1.0, 0.25, 6)]
    client.plan = {**type(client).plan, **declared}
    reply = flower_site.coordinator.train(exp, weights=initial_weights(exp), config={"epochs": epochs})
    assert isinstance(reply, Declined) and reply.reason == "policy" and reply.detail.startswith(f"{setting}:"), reply
    assert flower_site.ledger.history("heart_failure") == charged


def test_an_evaluation_of_the_training_rows_is_refused_on_the_wire_and_by_the_handler(tmp_path):
    """``split = "train"`` (exact statistics of the rows DP-SGD trained on, outside any ε) is
    refused at decode (dead-lettered with the field's path) and, should a frame ever get past
    decoding, by the handler itself; the site still answers an honest evaluation after it."""
    from urllib.parse import urlsplit

    from protocol.transport.memory import get_broker
    from tests.adversarial.site_harness import DATASET, HONEST, POLICY
    from tests.site_worker.support import experiment_dict

    url = f"memory://edge-{uuid.uuid4().hex[:8]}"
    site = start_site(tmp_path, url, policy={**POLICY, "metrics": "exact"})
    try:
        exp = experiment_dict(**HONEST)
        coord = site.coordinator
        task = EvalTask(experiment=exp, weights=initial_weights(exp), dataset=DATASET, base_round=1, seed=3,
                        deadline=time.time() + 600, split="validation")
        env = dataclasses.replace(coord.task_envelope(task), payload=dataclasses.replace(task, split="train"))
        body = encode_envelope(env)
        coord.publish_frame(encode_frame(coord.signer.kid, body, coord.signer.sign(signed_digest(body))), env.message_id)
        honest = coord.evaluate(exp, split="validation")  # answered next: the forged task got no reply
        assert isinstance(honest, EvalResult), honest
        dead = [d for d in get_broker(urlsplit(url).netloc).dead_letters() if d.message_id == env.message_id]
        assert len(dead) == 1 and "split" in (dead[0].reason or ""), dead
        # the handler's own check, behind the codec's
        history = list(site.ledger.history(DATASET))
        reply = site.worker.handler.handle(env)
        assert isinstance(reply, Declined) and reply.reason == "data" and "'train'" in reply.detail, reply
        assert site.ledger.history(DATASET) == history
    finally:
        stop_site(site)
