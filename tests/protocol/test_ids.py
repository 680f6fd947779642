"""One site-id rule (issue 21): 64 characters everywhere, tested at its edge on every path.

It was 64 in the kits and key names, 128 in site.toml and 101 in broker provisioning, so a
site.toml could name a site that no kit, key or broker user could exist for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.ids import NAME_MAX, is_name

INSIDE = "s" * NAME_MAX
OUTSIDE = "s" * (NAME_MAX + 1)


@pytest.mark.parametrize("value, ok", [
    (INSIDE, True), (OUTSIDE, False), ("site-a.b_c", True), ("site-a\n", False), ("-site", False),
    ("", False), ("a b", False), ("../x", False), (None, False), (7, False),
])
def test_the_rule(value: object, ok: bool) -> None:
    assert is_name(value) is ok


def test_site_config_takes_64_and_refuses_65(tmp_path: Path) -> None:
    from site_worker.config import SiteConfigError, site_config_from_dict
    from tests.site_worker.support import make_keys

    keys = make_keys(tmp_path, "k")
    (tmp_path / "hf.csv").write_text("a,y\n1,0\n")
    raw = {"site_id": INSIDE, "federation": "f", "broker_url": "amqp://u:p@localhost/%2F",
           "key_path": str(keys.site_key), "coordinator_pub": str(keys.coordinator_pub),
           "state_dir": str(tmp_path / "state"), "datasets": {"hf": {"path": "hf.csv", "target": "y"}}}
    assert site_config_from_dict(raw, base_dir=tmp_path).site_id == INSIDE
    for bad in (OUTSIDE, "site-a\n"):
        raw["site_id"] = bad
        with pytest.raises(SiteConfigError) as e:
            site_config_from_dict(raw, base_dir=tmp_path)
        assert e.value.key == "site_id"


def test_keys_and_provisioning_take_64_and_refuse_65(tmp_path: Path) -> None:
    from protocol.signing import generate_keypair
    from protocol.transport.provision import ProvisionError, _check_name

    generate_keypair(INSIDE, tmp_path)
    with pytest.raises(ValueError, match="1-64 letters"):
        generate_keypair(OUTSIDE, tmp_path)
    _check_name("site id", INSIDE)
    with pytest.raises(ProvisionError, match="1-64 letters"):
        _check_name("site id", OUTSIDE)


def test_a_project_file_takes_64_and_refuses_65(tmp_path: Path) -> None:
    from fedbus.kits import ProjectError, load_project

    def project(site: str) -> Path:
        p = tmp_path / "project.toml"
        p.write_text('[federation]\nname = "f"\nbroker = "amqp://admin:pw@127.0.0.1:5672/%2F"\n'
                     f'dataset = "hf"\ntarget = "y"\n\n[[sites]]\nid = "{site}"\n')
        return p

    assert [s.id for s in load_project(project(INSIDE)).sites] == [INSIDE]
    with pytest.raises(ProjectError) as e:
        load_project(project(OUTSIDE))
    assert e.value.key.endswith("id")
