"""One broker-URL type (issue 21): a password, user or certificate goes in IPv6-safe everywhere.

Before, five copies built such URLs and only one kept the brackets of an IPv6 host, so a site
configured with ``amqp://site-a@[::1]:5672/`` connected to ``amqp://site-a:pw@::1:5672/``,
which is not a URL. Each test here goes through one real path that builds one.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from typer.testing import CliRunner

from protocol.broker_url import BrokerURL, BrokerURLError, redact, with_certificate, with_password

PASSWORD = "p@ss:w/rd%"  # every character that must be quoted in a netloc


def assert_ipv6_login(url: str, user: str, password: str | None) -> None:
    p = urlsplit(url)
    assert "[::1]:5672" in p.netloc, url
    assert p.hostname == "::1" and p.port == 5672
    assert unquote(p.username or "") == user
    assert (unquote(p.password) if p.password is not None else None) == password


def test_the_type_round_trips_ipv6_user_and_quoted_password() -> None:
    u = BrokerURL.parse("amqp://site-a@[::1]:5672/%2F?heartbeat=30")
    assert (u.host, u.port, u.user, u.password, u.vhost, u.query) == ("::1", 5672, "site-a", None, "/", "heartbeat=30")
    out = str(u.with_password(PASSWORD))
    assert_ipv6_login(out, "site-a", PASSWORD)
    assert out.endswith("/%2F?heartbeat=30")
    assert BrokerURL.parse(out).with_password(PASSWORD) == BrokerURL.parse(out)
    # IPv4 and names are left as they were
    assert str(BrokerURL.parse("amqps://h.example:5671/v").with_user("s", "x")) == "amqps://s:x@h.example:5671/v"


def test_every_node_of_a_cluster_gets_the_password() -> None:
    out = with_password("amqp://s@[::1]:5672/, amqp://s@10.0.0.2:5673/", PASSWORD)
    first, second = out.split(",")
    assert_ipv6_login(first, "s", PASSWORD)
    assert urlsplit(second).hostname == "10.0.0.2" and unquote(urlsplit(second).password or "") == PASSWORD


@pytest.mark.parametrize("url, fragment", [
    ("amqp://[::1]:5672/", "names no user"),
    ("http://s@[::1]:5672/", "is not amqp"),
    ("amqp://s@[::1]:99999/", "Port out of range"),
    ("", "empty"),
])
def test_a_url_that_cannot_take_a_password_is_refused(url: str, fragment: str) -> None:
    with pytest.raises(BrokerURLError, match=fragment):
        with_password(url, PASSWORD)


def test_redact_hides_quoted_passwords_and_keeps_ipv6() -> None:
    url = str(BrokerURL.parse("amqp://s@[::1]:5672/").with_password(PASSWORD))
    assert redact(url) == "amqp://s:***@[::1]:5672/"
    assert "ss" not in redact("amqp://s:p%40ss@host:99999/")  # unparseable port: still hidden
    assert redact("amqp://host/") == "amqp://host/"


# ----------------------------------------------------------------------------- the paths

def test_site_config(tmp_path: Path) -> None:
    from site_worker.config import SiteConfigError, site_config_from_dict
    from tests.site_worker.support import make_keys

    keys = make_keys(tmp_path, "site-a")
    (tmp_path / "hf.csv").write_text("a,y\n1,0\n")
    (tmp_path / "broker.password").write_text(PASSWORD + "\n")
    raw = {"site_id": "site-a", "federation": "f", "broker_url": "amqp://site-a@[::1]:5672/",
           "broker_password_file": "broker.password",
           "key_path": str(keys.site_key), "coordinator_pub": str(keys.coordinator_pub),
           "state_dir": str(tmp_path / "state"), "datasets": {"hf": {"path": "hf.csv", "target": "y"}}}
    assert_ipv6_login(site_config_from_dict(raw, base_dir=tmp_path).broker_url, "site-a", PASSWORD)
    raw["broker_url"] = "amqp://[::1]:5672/"
    with pytest.raises(SiteConfigError) as e:
        site_config_from_dict(raw, base_dir=tmp_path)
    assert e.value.key == "broker_password_file"


def test_coordinator_config(tmp_path: Path) -> None:
    from fedbus.kits import ProjectError, load_coordinator_config

    (tmp_path / "broker.password").write_text(PASSWORD + "\n")
    toml = ('federation = "f"\nbroker_url = "amqp://coordinator@[::1]:5672/"\n'
            'broker_password_file = "broker.password"\nkey_path = "c.key"\nstate_dir = "state"\n')
    (tmp_path / "coordinator.toml").write_text(toml)
    assert_ipv6_login(load_coordinator_config(tmp_path / "coordinator.toml").broker_url, "coordinator", PASSWORD)
    (tmp_path / "coordinator.toml").write_text(toml.replace("coordinator@", ""))
    with pytest.raises(ProjectError) as e:
        load_coordinator_config(tmp_path / "coordinator.toml")
    assert e.value.key == "broker_password_file"


def test_provisioning() -> None:
    from fedbus.kits import party_url
    from protocol.transport.provision import user_url

    admin = "amqp://admin:secret@[::1]:5672/%2F"
    assert_ipv6_login(user_url(admin, "site-a", PASSWORD), "site-a", PASSWORD)
    assert_ipv6_login(party_url(admin, "site-a"), "site-a", None)  # a kit's URL: the password is in a file


def test_certificate_login() -> None:
    from protocol.transport.endpoints import certificate_url

    out = certificate_url("amqps://[::1]:5671/", ca="ca.pem", cert="me.pem", key="me.key")
    p = urlsplit(out)
    assert p.netloc == "[::1]:5671" and "auth=external" in p.query and "certfile=me.pem" in p.query
    assert urlsplit(with_certificate("amqps://u:pw@[::1]/", ca="a", cert="b", key="c")).password is None


@pytest.mark.parametrize("argv", [
    ["coordinator", "dead-letters", "list", "--federation", "f"],
])
def test_dead_letter_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    import protocol.transport
    from fedbus.cli import app

    seen: list[str] = []

    def fake_open_bus(url: str, **_: object) -> object:
        seen.append(url)
        raise ValueError("stop here")

    monkeypatch.setattr(protocol.transport, "open_bus", fake_open_bus)
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    out = CliRunner().invoke(app, [*argv, "--broker", "amqp://admin@[::1]:5672/",
                                   "--broker-password-file", str(tmp_path / "pw")])
    assert out.exit_code == 2, out.output
    assert len(seen) == 1
    assert_ipv6_login(seen[0], "admin", PASSWORD)
    assert PASSWORD not in out.output
