"""Every curated mutant of ``make mutants`` still applies: a moved guarantee fails here, in CI.

The full mutant run takes minutes (docs/testing.md); this check takes a second, so a
refactoring that silently disarms a mutant (its snippet no longer matches exactly once)
is caught by the normal suite, not only by the next ``make mutants``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.mutant_catalogue import MUTANTS, Edit, Mutant
from scripts.mutants import apply, restore, stale_reasons

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_applies_exactly_once_and_compiles(mutant):
    assert stale_reasons(mutant, REPO) == []


def test_mutant_names_are_unique_and_each_names_its_tests():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
    assert all(m.tests and m.edits for m in MUTANTS)


def test_a_moved_snippet_is_reported_stale_and_apply_restores(tmp_path):
    (tmp_path / "t.py").write_text("x = 1\nx = 1\ny = 2\n")
    (tmp_path / "test_t.py").write_text("")
    twice = Mutant("twice", "g", (Edit("t.py", "x = 1\n", "x = 0\n"),), ("test_t.py",))
    gone = Mutant("gone", "g", (Edit("t.py", "z = 3\n", "z = 0\n"),), ("test_t.py",))
    assert "occurs 2 times" in stale_reasons(twice, tmp_path)[0]
    assert "occurs 0 times" in stale_reasons(gone, tmp_path)[0]
    broken = Mutant("broken", "g", (Edit("t.py", "y = 2\n", "y = (\n"),), ("test_t.py",))
    assert "does not compile" in stale_reasons(broken, tmp_path)[0]
    ok = Mutant("ok", "g", (Edit("t.py", "y = 2\n", "y = 3\n"),), ("test_t.py",))
    assert stale_reasons(ok, tmp_path) == []
    originals = apply(ok, tmp_path)
    assert (tmp_path / "t.py").read_text() == "x = 1\nx = 1\ny = 3\n"
    restore(originals)
    assert (tmp_path / "t.py").read_text() == "x = 1\nx = 1\ny = 2\n"
