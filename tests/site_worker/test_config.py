"""site.toml validation: good configs load, bad ones name the key."""

from __future__ import annotations

import pytest

from site_worker.config import SiteConfigError, load_site_config, site_config_from_dict

from tests.site_worker.support import ROOT, make_keys


@pytest.fixture
def base(tmp_path):
    keys = make_keys(tmp_path, "hospital-a")
    data = tmp_path / "hf.csv"
    data.write_text("a,b,DEATH_EVENT\n1,2,0\n")
    return {
        "site_id": "hospital-a", "federation": "cardio", "broker_url": "amqp://u:p@localhost/%2F",
        "key_path": str(keys.site_key), "coordinator_pub": str(keys.coordinator_pub),
        "state_dir": str(tmp_path / "state"),
        "datasets": {"hf": {"path": "hf.csv", "target": "DEATH_EVENT", "columns": {"b": "categorical"}}},
        "policy": {"max_epsilon": 8.0, "allowed_layers": ["Linear", "ReLU"], "max_parameters": 10000},
    }, tmp_path


def test_valid_config_resolves_paths_relative_to_the_file(base):
    raw, tmp = base
    cfg = site_config_from_dict(raw, base_dir=tmp)
    assert cfg.datasets["hf"].path == tmp / "hf.csv"
    assert cfg.datasets["hf"].format == "csv"
    assert cfg.datasets["hf"].columns == {"b": "categorical"}
    assert cfg.policy.max_epsilon == 8.0 and cfg.policy.allowed_layers == ("Linear", "ReLU")
    assert cfg.policy.allow_no_dp is False and cfg.grace_s == 30.0


@pytest.mark.parametrize("change, key", [
    (lambda r: r.pop("site_id"), "site_id"),
    (lambda r: r.update(site_id="bad id"), "site_id"),
    (lambda r: r.update(broker_url="http://x"), "broker_url"),
    (lambda r: r.update(key_path="nope.key"), "key_path"),
    (lambda r: r.update(grace_s="soon"), "grace_s"),
    (lambda r: r.update(surprise=1), "surprise"),
    (lambda r: r["policy"].update(max_parameters=-1), "policy.max_parameters"),
    (lambda r: r["policy"].update(max_epsilon="lots"), "policy.max_epsilon"),
    (lambda r: r["policy"].update(allowed_layers="Linear"), "policy.allowed_layers"),
    (lambda r: r["datasets"]["hf"].pop("target"), "datasets.hf.target"),
    (lambda r: r["datasets"]["hf"].update(path="missing.csv"), "datasets.hf.path"),
    (lambda r: r["datasets"]["hf"]["columns"].update(b="text"), "datasets.hf.columns.b"),
    (lambda r: r["datasets"]["hf"].update(format="xlsx"), "datasets.hf.format"),
    (lambda r: r.update(datasets={}), "datasets"),
    (lambda r: r.update(flower_client="no colon"), "flower_client"),
])
def test_errors_name_the_key(base, change, key):
    raw, tmp = base
    change(raw)
    with pytest.raises(SiteConfigError) as e:
        site_config_from_dict(raw, base_dir=tmp)
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}: ")


def test_toml_syntax_error_is_reported(tmp_path):
    p = tmp_path / "site.toml"
    p.write_text("site_id = \n")
    with pytest.raises(SiteConfigError, match="not valid TOML"):
        load_site_config(p)


def test_password_file_goes_into_the_url(base):
    raw, tmp = base
    (tmp / "pw").write_text("s3cr/et\n")
    raw.update(broker_url="amqps://hospital-a@broker.example.org:5671/%2F", broker_password_file="pw")
    cfg = site_config_from_dict(raw, base_dir=tmp)
    assert cfg.broker_url == "amqps://hospital-a:s3cr%2Fet@broker.example.org:5671/%2F"


def test_shipped_example_is_well_formed_toml():
    import tomllib

    doc = tomllib.loads((ROOT / "deploy" / "site.toml").read_text())
    assert doc["policy"]["max_epsilon"] > 0 and "heart_failure_clinical_records_dataset" in doc["datasets"]
    unit = (ROOT / "deploy" / "fedbus-site.service").read_text()
    for option in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "fedbus site run --config"):
        assert option in unit


def test_cli_exits_2_naming_the_key(base):
    import os
    import subprocess
    import sys

    import tomli_w

    raw, tmp = base
    raw["policy"]["max_epsilon"] = "lots"
    p = tmp / "site.toml"
    p.write_text(tomli_w.dumps(raw))
    r = subprocess.run([sys.executable, "-m", "fedbus.cli", "site", "run", "--config", str(p)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "policy.max_epsilon: must be a number" in r.stderr
