"""Each pip extra installs and works alone (the per-backend nox sessions run this file).

``nox -s "tests(backend='torch')"`` installs ``.[torch,test]`` only and runs
these tests plus the framework module's docstring examples; the whole suite
runs once, with every framework, in ``tests(backend='all')``.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest

import posbias
from conftest import BACKENDS, to_np
from posbias import testing as pt
from posbias.cli import main

EXTRAS = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}


def test_frameworks_not_under_test_fail_with_the_extra_to_install():
    for name, module in EXTRAS.items():
        if name in BACKENDS or importlib.util.find_spec(module) is not None:
            continue
        with pytest.raises(posbias.BackendUnavailableError, match=rf"posbias\[{name}\]"):
            posbias.get("alibi", num_heads=2).bias(q_len=2, k_len=2, backend=name)


@pytest.mark.parametrize("name", ["alibi", "t5"])  # closed form; learnable table (gather)
def test_parity_on_the_installed_backends(name):
    cells = pt.run_parity([name], BACKENDS, ["float32", "bfloat16"], head_counts=[3], jobs=2)
    assert cells and all(c.passed for c in cells), [f for c in cells for f in c.failures]


def test_attention_and_layers(framework):
    module = importlib.import_module(f"posbias.{framework}")
    xp = posbias.backends.load(framework)()
    rng = np.random.default_rng(0)
    q, k, v = (xp.from_numpy(rng.normal(size=(1, 4, 6, 8)).astype(np.float32)) for _ in range(3))
    out = to_np(module.attention(q, k, v, "alibi", causal=True))
    assert out.shape == (1, 4, 6, 8) and np.isfinite(out).all()
    layer = module.MultiHeadAttention(16, 2, bias="t5", causal=True)
    y = to_np(layer(xp.from_numpy(rng.normal(size=(2, 5, 16)).astype(np.float32))))
    assert y.shape == (2, 5, 16)
    assert set(layer.portable_weights()) >= {"q.kernel", "o.kernel"}


def test_parity_command(capsys):
    """The command runs; its attention cells are test_attention_and_layers' job here."""
    argv = ["parity", "--variants", "alibi", "--head-counts", "3", "--dtypes", "float32"]
    assert main([*argv, "--backends", ",".join(BACKENDS), "--no-layers", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bias cells:" in out and "summary (" in out and "FAIL" not in out
