"""The run's initial weights: without torch where the layers allow, else by torch, in a child
process when this one has no torch.

``protocol.initial_numpy`` makes torch's seeded initialisation of the common layer types bit for
bit without importing torch (about 1–2.5 s of a coordinator's start-up). A chain with any other
parametrised type (BatchNorm1d) is built by torch, as follows.

The weights every site starts from are torch's seeded initialisation of the experiment's
layers (``protocol.model.build_model``). A coordinator without site DP needs torch for
nothing else, and importing it costs about 250 MB of resident memory for the whole run
(its libraries and allocator), most of the coordinator's floor: issue 23's bound on the
coordinator, 3 × model + 300 MB, cannot hold with it. So where torch is not imported yet, a
child process (``python -m coordinator.initial_model``) builds a model of at least 1 MiB, writes it as a
checkpoint and exits; this process reads the arrays back (the same bits: same torch, same
seed, same code). Where torch is already imported (the simulator, whose sites train in this
process, or a run whose privacy plan imported Opacus), and for smaller models (where a second
interpreter's start-up would cost more than the memory is worth), the model is built here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from protocol.config_error import ConfigError
from protocol.messages import Tensors

# Below this many bytes of float32 weights the model is built here: the coordinator's floor
# matters less than the second interpreter's start-up, which every run would pay (fixed cost).
CHILD_FROM_BYTES = 1 << 20


def initial_weights(layers: list[Any], *, seed: int, workdir: Path | None = None) -> Tensors:
    """``to_tensors(build_model(layers, seed=seed))``: made without torch where every layer type
    allows (``protocol.initial_numpy``, the same bits), else by torch, in a child process unless
    torch is loaded."""
    from protocol.initial_numpy import weights
    from protocol.layers import parameter_count, resolve_layers

    chain = resolve_layers(layers)
    made = weights(chain, seed=seed)
    if made is not None:
        return made
    if "torch" in sys.modules or 4 * parameter_count(chain) < CHILD_FROM_BYTES:
        from protocol.model import build_model, to_tensors

        return to_tensors(build_model(layers, seed=seed))
    return built_in_child(layers, seed=seed, workdir=workdir)


def built_in_child(layers: list[Any], *, seed: int, workdir: Path | None = None) -> Tensors:
    """The initial weights as a child process builds them (``python -m coordinator.initial_model``)."""
    from coordinator.checkpoints import load_tensors

    spec = [layer.model_dump(mode="json") if hasattr(layer, "model_dump") else dict(layer) for layer in layers]
    fd, name = tempfile.mkstemp(prefix="fedbus-initial-", suffix=".safetensors", dir=workdir)
    os.close(fd)
    path = Path(name)
    try:
        proc = subprocess.run([sys.executable, "-m", "coordinator.initial_model", str(path)],
                              input=json.dumps({"layers": spec, "seed": seed}), text=True, capture_output=True,
                              env=_child_env(), timeout=600)
        if proc.returncode == 3:  # the layers do not build: the child's ConfigError, path and message
            where, _, message = proc.stdout.strip().partition("\t")
            raise ConfigError(where, message)
        if proc.returncode != 0:
            raise RuntimeError(f"building the initial model failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return load_tensors(path)
    finally:
        path.unlink(missing_ok=True)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[1])  # this checkout first: the child builds with this code
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    return env


def _main(out: str) -> int:
    from coordinator.checkpoints import save_tensors
    from protocol.model import build_model, to_tensors

    doc = json.loads(sys.stdin.read())
    try:
        weights = to_tensors(build_model(doc["layers"], seed=int(doc["seed"])))
    except ConfigError as e:
        sys.stdout.write(f"{e.path}\t{e.message}\n")
        return 3
    save_tensors(Path(out), weights)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
