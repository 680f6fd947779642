"""The reproducible install (issue 21): ``make setup`` installs exactly ``requirements.lock``.

The suite runs in the venv that ``make setup`` built, so the venv itself is the evidence: every
distribution in it must be in the lock at the locked version. A package upgraded or added by
hand without ``make lock`` fails here, as does a lock that a fresh clone could not reproduce.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
# Not in the lock: the venv's own bootstrap, fedbus (editable, this checkout) and torch (the
# Makefile installs the CPU build by its own pin first).
UNLOCKED = {"pip", "setuptools", "wheel", "fedbus", "torch"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, str]:
    """``name==version`` lines of a pip constraints file; anything else is refused."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if m is None:
            raise ValueError(f"requirements.lock line {n} is not name==version: {raw!r}")
        name = _norm(m.group(1))
        if name in pins:
            raise ValueError(f"requirements.lock pins {name} twice")
        pins[name] = m.group(2)
    return pins


def installed() -> dict[str, str]:
    return {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}


def lock_mismatches(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """What differs between the lock and a venv, one line each (empty: they agree)."""
    out = []
    for name, version in sorted(have.items()):
        if name in UNLOCKED:
            continue
        if name not in pins:
            out.append(f"{name}=={version} is installed but not in requirements.lock")
        elif pins[name] != version:
            out.append(f"{name}=={version} is installed, requirements.lock says {pins[name]}")
    return out


def test_the_lock_parses_and_names_no_unlocked_package() -> None:
    pins = parse_lock(LOCK.read_text())
    assert len(pins) > 50  # the whole dependency tree, not a hand-picked few
    assert not UNLOCKED & set(pins)
    # bench/vs_flower.py was measured against this Flower; a floating pin resolved another.
    assert "flwr" in pins


def test_the_running_venv_is_exactly_the_lock() -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("not in a venv: the suite runs in the one `make setup` builds")
    problems = lock_mismatches(parse_lock(LOCK.read_text()), installed())
    assert not problems, ("the venv and requirements.lock differ; after a deliberate upgrade run "
                          "`make lock` and commit it:\n" + "\n".join(problems))


def test_a_drifted_or_extra_package_is_reported() -> None:
    pins = {"flwr": "1.32.1", "numpy": "2.0.0"}
    assert lock_mismatches(pins, {"flwr": "1.32.1", "numpy": "2.0.0", "pip": "1", "torch": "2"}) == []
    assert lock_mismatches(pins, {"flwr": "1.42.0", "numpy": "2.0.0"}) == [
        "flwr==1.42.0 is installed, requirements.lock says 1.32.1"]
    assert lock_mismatches(pins, {"flwr": "1.32.1", "numpy": "2.0.0", "ray": "2.9"}) == [
        "ray==2.9 is installed but not in requirements.lock"]
    with pytest.raises(ValueError, match="line 2"):
        parse_lock("flwr==1.32.1\nnumpy>=2\n")


def test_setup_installs_through_the_lock_and_the_lint_tools_are_pinned_in_both() -> None:
    """``make setup`` passes the lock as constraints; the lint tools' pins agree with it."""
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -c requirements.lock -e '.[test]'" in makefile
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = parse_lock(LOCK.read_text())
    for tool in ("ruff", "mypy", "import-linter"):
        spec = next(r for r in extras["test"] if _norm(re.split(r"[=<>!~\[ ]", r, maxsplit=1)[0]) == tool)
        assert spec.split("==")[1] == pins[tool], spec


def test_the_locked_versions_satisfy_each_other() -> None:
    """A lock pip cannot install is no lock: mypy 2.x wanted pathspec>=1 while flwr 1.32.1 wants <0.13,
    and a fresh ``make setup`` failed to resolve while this venv still imported fine."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not in a venv: the suite runs in the one `make setup` builds")
    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
