"""Loading a checkpoint costs one model of memory, and a file that lies about itself is refused.

``safetensors.numpy.load_file`` reads the whole file into one bytes object and copies every tensor
out of it: two models at once (762 MB at 100 M parameters, when the coordinator starts or resumes,
issue 23). ``coordinator.checkpoints.read_safetensors`` reads each tensor straight into its own
array. Peak memory is measured in a fresh process (``VmHWM`` only grows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.checkpoints import load_tensors, read_safetensors, save_tensors

REPO = Path(__file__).resolve().parents[2]
MB = 48  # the model: 48 MiB of float32 in two tensors

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")

CHILD = """
import hashlib, sys
from pathlib import Path
import numpy as np
from coordinator.checkpoints import load_tensors

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

before = kb("VmRSS")
weights = load_tensors(Path(sys.argv[1]))
grew = (kb("VmHWM") - before) * 1024
digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for _, a in weights)).hexdigest()
print(grew, digest, [n for n, _ in weights])
"""


def test_loading_a_checkpoint_holds_one_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)  # test data, not privacy noise
    n = MB * 2**20 // 4
    weights = (("w", rng.standard_normal(n - 1024, dtype=np.float32)), ("b", rng.standard_normal(1024, dtype=np.float32)))
    path = tmp_path / "round-0001.safetensors"
    save_tensors(path, weights)
    size = sum(a.nbytes for _, a in weights)
    want = __import__("hashlib").sha256(b"".join(a.tobytes() for _, a in weights)).hexdigest()
    del weights
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    grew, digest, names = out.stdout.split(maxsplit=2)
    assert digest == want and json.loads(names.replace("'", '"')) == ["w", "b"]  # saved order, same bytes
    assert int(grew) <= size * 5 // 4, f"loading a {MB} MiB checkpoint grew the peak by {int(grew) / 2**20:.0f} MiB"


def _rewrite_header(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


@pytest.mark.parametrize("edit, reason", [
    (lambda h: h["w"].update(data_offsets=[0, 10**9]), "outside the 40 data bytes"),
    (lambda h: h["w"].update(data_offsets=[0, 36]), "needs 32"),
    (lambda h: h["w"].update(dtype="F99"), "has dtype 'F99'"),
    (lambda h: h["w"].update(shape=[-8]), "shape [-8]"),
])
def test_a_checkpoint_whose_header_lies_is_refused_with_a_reason(tmp_path: Path, edit, reason: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.safetensors"
    save_tensors(path, (("w", np.arange(8, dtype=np.float32)), ("b", np.ones(2, dtype=np.float32))))
    assert [n for n, _ in load_tensors(path)] == ["w", "b"]  # as written: read back
    _rewrite_header(path, edit)
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        read_safetensors(path)


def test_a_cut_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_tensors(path, (("w", np.arange(8, dtype=np.float32)),))
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])  # one data byte short: the offsets now point past the end
    with pytest.raises(ValueError, match="outside the 31 data bytes"):
        read_safetensors(path)
    path.write_bytes(raw[:6])
    with pytest.raises(ValueError, match="header length -1 does not fit"):
        read_safetensors(path)
