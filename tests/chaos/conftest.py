"""Fixtures of the chaos suite: a real federation per test, torn down whatever happens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import Federation


@pytest.fixture
def make_federation(tmp_path: Path, local_broker: str) -> Iterator[Callable[..., Federation]]:
    """``make_federation(sites=4, ...)`` -> a ``Federation`` in its own vhost (deleted afterwards)."""
    made: list[Federation] = []

    def make(**kwargs: Any) -> Federation:
        fed = Federation(tmp_path / f"fed{len(made)}", broker_url=local_broker, **kwargs)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()
