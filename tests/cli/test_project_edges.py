"""PROJECT.toml's checks at their edges (``fedbus.kits.load_project``): each refusal names its
key; the value just inside is accepted (issue 26: walk every comparison in fedbus/kits.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbus.kits import COORDINATOR, ProjectError, load_project

HEAD = ['[federation]', 'name = "cardio"', 'broker = "amqp://127.0.0.1:5672/%2F"',
        'admin = "amqp://guest:guest@127.0.0.1:5672/%2F"']


def _load(tmp: Path, federation: list[str] = (), sites: list[list[str]] = (['id = "a"'],)):
    p = tmp / "project.toml"
    p.write_text("\n".join([*HEAD, *federation, *("[[sites]]\n" + "\n".join(s) for s in sites)]) + "\n")
    return load_project(p)


def _refused(tmp: Path, key: str, **kw) -> str:
    with pytest.raises(ProjectError) as e:
        _load(tmp, **kw)
    assert str(e.value).startswith(f"{key}:") or getattr(e.value, "key", None) == key, str(e.value)
    return str(e.value)


@pytest.mark.parametrize("where", ["federation", "site"])
def test_a_budget_must_be_positive_and_the_smallest_positive_is_accepted(tmp_path, where):
    def kw(v):
        if where == "federation":
            return {"federation": [f"max_epsilon = {v}"]}
        return {"sites": [['id = "a"', f"max_epsilon = {v}"]]}

    key = "federation.max_epsilon" if where == "federation" else "sites[0].max_epsilon"
    assert _load(tmp_path, **kw("1e-300")).sites[0].max_epsilon == 1e-300
    _refused(tmp_path, key, **kw("0"))
    _refused(tmp_path, key, **kw("-1e-300"))
    _refused(tmp_path, key, **kw("true"))


def test_site_ids_are_unique_and_never_the_coordinators(tmp_path):
    assert [s.id for s in _load(tmp_path, sites=[['id = "a"'], ['id = "b"']]).sites] == ["a", "b"]
    _refused(tmp_path, "sites[1].id", sites=[['id = "a"'], ['id = "a"']])
    _refused(tmp_path, "sites[0].id", sites=[[f'id = "{COORDINATOR}"']])


def test_the_coordinator_user_is_no_sites_name(tmp_path):
    assert _load(tmp_path, federation=['coordinator_user = "coord"']).coordinator_user == "coord"
    _refused(tmp_path, "federation.coordinator_user", federation=['coordinator_user = "a"'])


def test_broker_scheme_and_quorum(tmp_path):
    assert _load(tmp_path, federation=["quorum = true"]).quorum is True
    _refused(tmp_path, "federation.quorum", federation=['quorum = "yes"'])
    p = tmp_path / "project.toml"
    p.write_text("\n".join(['[federation]', 'name = "cardio"', 'broker = "http://127.0.0.1:5672/"',
                            'admin = "amqp://guest:guest@127.0.0.1:5672/%2F"', '[[sites]]', 'id = "a"']) + "\n")
    with pytest.raises(ProjectError, match="amqp:// or amqps://"):
        load_project(p)
