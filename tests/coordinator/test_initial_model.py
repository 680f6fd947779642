"""A coordinator without torch gets its initial model from a child process, bit for bit the
model torch builds in-process (same layers, same seed), and a model that does not build is
the child's ConfigError, naming the JSON path (issue 23: the coordinator's memory floor)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.initial_model import built_in_child
from protocol.config import load_experiment
from protocol.config_error import ConfigError
from protocol.model import build_model, to_tensors

REPO = Path(__file__).resolve().parents[2]


def test_the_child_builds_the_same_bits_as_torch_here(tmp_path: Path) -> None:
    layers = list(load_experiment(json.loads((REPO / "examples/ecg_resnet.json").read_text())).architecture.layers)
    child = built_in_child(layers, seed=123, workdir=tmp_path)
    here = to_tensors(build_model(layers, seed=123))
    assert [n for n, _ in child] == [n for n, _ in here]
    for (name, a), (_, b) in zip(child, here):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    other = to_tensors(build_model(layers, seed=124))
    assert not all(np.array_equal(a, b) for (_, a), (_, b) in zip(child, other))  # the seed is the child's
    assert list(tmp_path.iterdir()) == []  # its file is gone


def test_a_model_that_does_not_build_is_the_childs_config_error(tmp_path: Path) -> None:
    layers = [{"type": "input", "params": {"features": 4}}, {"type": "Linear", "params": {"in_features": 5, "out_features": 1}}]
    with pytest.raises(ConfigError) as e:
        built_in_child(layers, seed=1, workdir=tmp_path)
    assert e.value.path.startswith("architecture.layers[1]"), e.value


def test_a_coordinator_makes_the_example_models_without_importing_torch() -> None:
    """Issue 23, fixed cost: the examples' models (MLPs, the ECG CNNs) are made by
    protocol.initial_numpy in a fresh interpreter that never imports torch, and equal torch's."""
    import subprocess
    import sys

    code = ("import json, sys, numpy as np\n"
            "from coordinator.initial_model import initial_weights\n"
            "out = {}\n"
            "for name in ('heart_failure', 'ecg_resnet'):\n"
            "    layers = json.load(open(f'examples/{name}.json'))['architecture']['layers']\n"
            "    w = initial_weights(layers, seed=7)\n"
            "    np.savez(f'{sys.argv[1]}/{name}.npz', **dict(w))\n"
            "print('torch' in sys.modules)\n")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.run([sys.executable, "-c", code, d], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == "False", proc.stdout  # torch was never imported
        for name in ("heart_failure", "ecg_resnet"):
            made = np.load(f"{d}/{name}.npz")
            layers = json.loads((REPO / f"examples/{name}.json").read_text())["architecture"]["layers"]
            for key, b in to_tensors(build_model(layers, seed=7)):
                assert np.array_equal(made[key], b), (name, key)
