"""The runnable examples of docs/distributed.md run as written (subprocesses, bounded time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from posbias import testing as pt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "distributed"


def _run(argv: list[str]) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)  # the example sets its own
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif("jax" not in pt.backends_under_test(), reason="JAX is not under test")
def test_jax_example():
    out = _run([sys.executable, str(EXAMPLES / "jax_sharded.py")])
    assert "devices: 4, max |sharded - single device|" in out


@pytest.mark.skipif("torch" not in pt.backends_under_test(), reason="PyTorch is not under test")
def test_torch_example_under_torchrun():
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", str(EXAMPLES / "torch_distributed.py")]  # fmt: skip
    out = _run(argv)
    assert "rank 0/2: ring" in out and "rank 1/2: ring" in out


@pytest.mark.skipif("jax" not in pt.backends_under_test(), reason="JAX is not under test")
def test_jax_gates_example():
    out = _run([sys.executable, str(EXAMPLES / "jax_gates.py")])
    assert "devices: 4, gates: max |sharded - single device|" in out


@pytest.mark.skipif("torch" not in pt.backends_under_test(), reason="PyTorch is not under test")
def test_torch_gates_example_under_torchrun():
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", str(EXAMPLES / "torch_gates.py")]  # fmt: skip
    out = _run(argv)
    assert "rank 0/2: gates ring" in out and "rank 1/2: gates ring" in out
