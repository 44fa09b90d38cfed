"""``log_gates=`` in posbias.torch.distributed with 2 gloo processes on loopback.

ring_attention and head_parallel_attention with forget gates sharded like the
tokens equal single-device attention: outputs and gradients of q, k, v and
the gates (tests/_distributed_gates_worker.py runs the checks on each rank).
"""

from __future__ import annotations

import pytest

from posbias import testing as pt

if "torch" not in pt.backends_under_test():
    pytest.skip("PyTorch is not under test", allow_module_level=True)

import torch.distributed as dist

WORLD = 2
DEADLINE_S = 300
TOL = 2e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is needed for these tests")
    import _distributed_gates_worker as worker
    from _distributed_worker import spawn

    return spawn(worker.main, tmp_path_factory.mktemp("gate_ranks"), DEADLINE_S, WORLD)


CASES = [
    f"{fname}/causal={causal}/{order}"
    for fname in ("ring", "heads")
    for causal in (True, False)
    for order in ("contiguous", "zigzag")
]


@pytest.mark.parametrize("key", CASES)
def test_forward_and_gradients_equal_single_device(ranks, key):
    """Outputs, and gradients of q, k, v, log_gates (and log_gates_after), relative."""
    for rank in ranks:
        assert rank[f"gates_matter/{key.split('/')[1]}"] > 0.1  # the gates change the output
        assert rank[f"forward/{key}"] < TOL, (key, rank[f"forward/{key}"])
        assert rank[f"grad/{key}"] < TOL, (key, rank[f"grad/{key}"])


@pytest.mark.parametrize(
    "key",
    [
        f"{name}/{fname}/{order}"
        for name in ("padding/causal", "padding/bidirectional", "packed")
        for fname in ("ring", "heads")
        for order in ("contiguous", "zigzag")
    ],
)
def test_padding_and_packing(ranks, key):
    for rank in ranks:
        assert rank[key] < TOL, (key, rank[key])


@pytest.mark.parametrize("fname", ["ring", "heads"])
def test_the_handshake_covers_the_gates(ranks, fname):
    for rank in ranks:
        given = rank[f"disagree/given/{fname}"]
        assert given.startswith("DistributedError") and "log_gates, log_gates_after" in given
        grad = rank[f"disagree/grad/{fname}"]
        assert grad.startswith("DistributedError") and "log-gates that require grad" in grad
    own = ranks[1][f"bad_gates/{fname}"]
    assert own.startswith("InvalidArgumentError") and "log-gates <= 0" in own, own
    assert ranks[0][f"bad_gates/{fname}"].startswith("DistributedError")


def test_decoding_with_gates_is_refused(ranks):
    for rank in ranks:
        assert rank["decode"].startswith("InvalidArgumentError"), rank["decode"]
        assert "decoding against a sequence-sharded KV cache" in rank["decode"]
