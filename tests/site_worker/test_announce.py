"""A site's hello carries each dataset's ledger ε, budget, δ and accountant, and survives the wire."""

from __future__ import annotations

import pandas as pd

from protocol.codec import new_envelope, open_frame, seal
from protocol.messages import SiteHello
from protocol.signing import Signer, TrustStore
from site_worker.announce import with_budget
from site_worker.config import DatasetSource, SitePolicy
from site_worker.data import catalogue
from site_worker.ledger import PrivacyLedger, epsilon_of
from tests.site_worker.support import heart_failure_csv


def _hello(info) -> SiteHello:
    signer = Signer.generate()
    trust = TrustStore()
    trust.add("s1", signer.public_pem())
    hello = SiteHello(site_id="s1", software_version="t", datasets=(info,), policy={})
    env = new_envelope(hello, federation="f", run_id="", round=0, sender="s1", recipient="coordinator")
    return open_frame(seal(env, signer), trust).envelope.payload


def test_hello_reports_the_ledger_spent_budget_delta_and_accountant(tmp_path):
    csv = heart_failure_csv(tmp_path / "hf.csv")
    source = DatasetSource(name="hf", path=csv, target="DEATH_EVENT")
    policy = SitePolicy(max_epsilon=7.5, accountant="rdp")
    ledger = PrivacyLedger(tmp_path / "state")
    rows = len(pd.read_csv(csv))
    fresh = _hello(with_budget(catalogue(source), ledger=ledger, policy=policy)).datasets[0]
    assert (fresh.epsilon_spent, fresh.max_epsilon, fresh.accountant) == (0.0, 7.5, "rdp")
    assert fresh.delta == policy.site_delta(rows) and fresh.rows == rows

    entries = [(2.0, 0.1, 10)]
    ledger.reserve("hf", release_id="t1", kind="train", entries=entries, delta=fresh.delta, accountant="rdp",
                   max_epsilon=7.5)
    ledger.commit("hf", "t1")
    after = _hello(with_budget(catalogue(source), ledger=ledger, policy=policy)).datasets[0]
    assert after.epsilon_spent == epsilon_of(entries, delta=fresh.delta) > 0
    assert after.max_epsilon == 7.5


def test_a_site_without_a_budget_says_so(tmp_path):
    source = DatasetSource(name="hf", path=heart_failure_csv(tmp_path / "hf.csv"), target="DEATH_EVENT")
    info = _hello(with_budget(catalogue(source), ledger=PrivacyLedger(tmp_path), policy=SitePolicy())).datasets[0]
    assert info.max_epsilon is None and info.epsilon_spent == 0.0
