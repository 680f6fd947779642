"""`fedbus keys generate`: files, modes, refusal to overwrite, and keys that work."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedbus import cli_keys
from protocol.codec import new_envelope, open_frame, seal
from protocol.messages import Update
from protocol.signing import Signer, TrustStore

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(*args: str):
    """``fedbus keys ARGS`` in-process (the group as ``fedbus.cli`` mounts it; importing the
    whole CLI pulls in torch, which the subprocess test below covers)."""
    return runner.invoke(cli_keys.app, list(args))


def test_generate_writes_a_private_key_0600_and_a_public_key(tmp_path):
    out = tmp_path / "keys"
    result = invoke("generate", "site-1", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    key, pub = out / "site-1.key", out / "site-1.pub"
    assert doc == {"key": str(key), "pub": str(pub), "kid": Signer.from_file(key).kid}
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_generated_keys_sign_frames_the_trust_store_accepts(tmp_path):
    for name in ("site-1", "coordinator"):
        assert invoke("generate", name, "--out", str(tmp_path)).exit_code == 0
    signer = Signer.from_file(tmp_path / "site-1.key")
    trust = TrustStore.from_files({"site-1": tmp_path / "site-1.pub", "coordinator": tmp_path / "coordinator.pub"})
    update = Update(task_id="t", weights=(("w", np.ones(3, np.float32)),), num_examples=3, metrics={},
                    epsilon=None, delta=None, base_round=0)
    env = new_envelope(update, federation="f", run_id="r", round=1, sender="site-1", recipient="coordinator")
    opened = open_frame(seal(env, signer), trust)
    assert opened.signer == "site-1" and opened.kid == signer.kid


def test_existing_key_is_kept_unless_forced(tmp_path):
    assert invoke("generate", "site-1", "--out", str(tmp_path)).exit_code == 0
    before = (tmp_path / "site-1.key").read_bytes()
    result = invoke("generate", "site-1", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert (tmp_path / "site-1.key").read_bytes() == before
    result = invoke("generate", "site-1", "--out", str(tmp_path), "--force")
    assert result.exit_code == 0
    assert (tmp_path / "site-1.key").read_bytes() != before
    assert stat.S_IMODE(os.stat(tmp_path / "site-1.key").st_mode) == 0o600


def test_bad_input_exits_2_with_a_message(tmp_path):
    result = invoke("generate", "../escape", "--out", str(tmp_path))
    assert result.exit_code == 2 and "not allowed" in result.stderr
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = invoke("generate", "k", "--out", str(a_file))
    assert result.exit_code == 2 and "not a directory" in result.stderr
    assert invoke("generate", "k").exit_code == 2  # --out missing
    assert invoke("generate").exit_code == 2


@pytest.mark.slow
def test_runs_as_a_module_from_the_shell(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedbus.cli", "keys", "generate", "coord", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "key id " + Signer.from_file(tmp_path / "coord.key").kid in proc.stderr
    assert proc.stdout == ""  # human output goes to stderr
