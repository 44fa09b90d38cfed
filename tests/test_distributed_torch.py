"""posbias.torch.distributed with 2 gloo processes on loopback equals single-device attention.

The module fixture spawns two ranks once (bounded time, killed on overrun);
each runs every check in tests/_distributed_worker.py and writes its errors
to JSON. Collectives have a 60 s timeout, the whole run 420 s.
"""

from __future__ import annotations

import pytest

from posbias import testing as pt

if "torch" not in pt.backends_under_test():
    pytest.skip("PyTorch is not under test", allow_module_level=True)

import torch
import torch.distributed as dist

import posbias
from posbias.torch.distributed import layout_positions, ring_attention, shard, shard_score_mod

WORLD = 2
DEADLINE_S = 420


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is needed for these tests")
    import _distributed_worker as worker
    from _distributed_worker import spawn

    return spawn(worker.main, tmp_path_factory.mktemp("ranks"), DEADLINE_S, WORLD)


def _keys(prefix: str) -> list[str]:
    biases = ["alibi", "t5", "kerple_log", "learnable_t5"]
    if prefix == "forward":
        return [
            f"forward/{f}/{b}/causal={c}/{o}"
            for f in ("ring", "heads")
            for b in biases
            for c in (True, False)
            for o in ("contiguous", "zigzag")
        ]
    return [
        f"grad/{f}/{o}/{part}"
        for f in ("ring", "heads")
        for o in ("contiguous", "zigzag")
        for part in ("qkv", "bias_params")
    ]


@pytest.mark.parametrize("key", _keys("forward"))
def test_forward_equals_single_device(ranks, key):
    for rank in ranks:
        assert rank[key] < 5e-6, (key, rank[key])


@pytest.mark.parametrize("key", _keys("grad"))
def test_gradients_equal_single_device(ranks, key):
    for rank in ranks:
        assert rank[key] < 2e-5, (key, rank[key])


@pytest.mark.parametrize(
    "key",
    ["float64/ring", "positions/ring/zigzag", "positions/heads/fire", "packed/ring"]
    + [f"positions/{f}/{n}" for f in ("ring", "heads") for n in ("shuffled", "restarting")]
    + ["padding/ring/contiguous", "padding/ring/zigzag", "padding/decode"]
    + [
        f"decode/{n}/{b}/{o}"
        for n in (1, 3)
        for b in ("alibi", "t5")
        for o in ("contiguous", "zigzag")
    ],
)
def test_positions_packing_and_float64(ranks, key):
    tol = 1e-12 if key.startswith("float64") else 5e-6
    for rank in ranks:
        assert rank[key] < tol, (key, rank[key])


def test_communication_volume(ranks):
    """Bytes sent per call match the closed forms in docs/distributed.md."""
    from _distributed_worker import B, D, H, L

    local = B * H * (L // WORLD) * D * 4  # one float32 tensor shard
    for rank in ranks:
        ring, heads = rank["traffic/ring"], rank["traffic/heads"]
        assert ring["ring"] == (WORLD - 1) * 2 * local  # K and V, world-1 steps
        assert heads["all_to_all"] == 4 * local * (WORLD - 1) // WORLD  # q, k, v, out
        assert "all_to_all" not in ring and "ring" not in heads


def test_rank_mismatch_is_an_error_on_every_rank(ranks):
    for rank in ranks:
        for fn in ("ring", "heads"):
            message = rank[f"mismatch/{fn}"]
            assert "disagree on query length: [8, 10]" in message, message
        assert "splits the heads over 2 ranks" in rank["heads_not_divisible"]
        assert "inputs that require grad (q, k, v bits): [0, 4]" in rank["grad_mismatch"]
    # bad input on one rank only: that rank's own error there, DistributedError elsewhere
    assert ranks[1]["bad_local_input"].startswith("InvalidArgumentError: q_pos must have shape")
    assert ranks[0]["bad_local_input"].startswith("DistributedError: ring_attention: the ranks")
    assert "inputs valid (0: this rank raised its own error): [1, 0]" in ranks[0]["bad_local_input"]


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(posbias.DistributedError, match="init_process_group"):
        ring_attention(q, q, q, "alibi")


def test_layout_helpers():
    assert layout_positions(8, 2, "zigzag").tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert layout_positions(8, 2).tolist() == list(range(8))
    x = torch.arange(16).reshape(1, 1, 16, 1)
    pieces = [shard(x, r, 4, "zigzag") for r in range(4)]
    assert torch.cat(pieces, 2).flatten().tolist() == layout_positions(16, 4, "zigzag").tolist()
    with pytest.raises(posbias.InvalidArgumentError, match="8 equal chunks"):
        layout_positions(12, 4, "zigzag")


@pytest.fixture
def fresh_dynamo():
    """Forget compiled flex_attention frames afterwards. torch 2.13's recompilation-reason
    helper raises IndexError when a later call passes a score_mod whose closure has fewer
    cells than a cached one with an aliasing guard (a torch bug, not posbias's)."""
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("bias", ["alibi", "t5", "kerple_log"])
@pytest.mark.parametrize("compiled", [False, True])
def test_shard_score_mod_with_flex_attention(bias, compiled):
    """Context-parallel FlexAttention: a zigzag query shard against all keys, global positions."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 4, 16, 8)
    ref = posbias.torch.attention(q, k, v, bias, causal=True)
    order = layout_positions(16, 2, "zigzag")
    mine = order[8:]  # rank 1 of 2 holds chunks 1 and 2 of 4
    q_pos, k_pos = torch.as_tensor(mine), torch.arange(16)
    mod = shard_score_mod(bias, q_pos, k_pos, num_heads=4)

    def causal(b, h, q_idx, kv_idx):
        return k_pos[kv_idx] <= q_pos[q_idx]

    mask = create_block_mask(causal, 1, None, 8, 16, device="cpu")
    attend = torch.compile(flex_attention) if compiled else flex_attention
    out = attend(q[:, :, mine], k, v, score_mod=mod, block_mask=mask)
    assert (out - ref[:, :, mine]).abs().max() < 1e-5


def test_shard_score_mod_refuses_biases_without_a_difference_table():
    with pytest.raises(posbias.InvalidArgumentError, match="depends on both positions"):
        shard_score_mod("fire", torch.arange(4), torch.arange(8), num_heads=4)


@pytest.mark.parametrize(
    "key",
    [f"key_mask/{f}/{o}" for f in ("ring", "heads") for o in ("contiguous", "zigzag")]
    + ["key_mask/decode/contiguous", "key_mask/decode/zigzag"],
)
def test_key_mask_means_the_same_as_on_one_device(ranks, key):
    """Left padding with a bias that is not shift-invariant (alibi_scaled), causal:
    bias positions are the global cumsum(key_mask) - 1 on every path."""
    for rank in ranks:
        assert rank[key] < 2e-6, (key, rank[key])


def test_key_padding_mask_names_key_mask(ranks):
    for rank in ranks:
        message = rank["key_padding_mask"]
        assert message.startswith("InvalidTypeError") and "key_mask" in message, message
        assert "True = ignore" in message, message


@pytest.mark.parametrize(
    "what", ["alibi_vs_none", "alibi_vs_t5", "max_bias", "scale", "causal", "parameter_values"]
)
@pytest.mark.parametrize("fname", ["ring", "heads"])
def test_ranks_that_disagree_raise_on_every_rank(ranks, what, fname):
    """Everything that changes the answer is part of the handshake: no rank returns."""
    for rank in ranks:
        message = rank[f"disagree/{what}/{fname}"]
        assert message.startswith("DistributedError"), message
        assert "disagree on" in message, message


def test_ranks_that_disagree_on_the_implementation_raise(ranks):
    for rank in ranks:
        message = rank["disagree/implementation/heads"]
        assert message.startswith("DistributedError") and "implementation" in message, message


@pytest.mark.parametrize("fname", ["ring", "heads"])
def test_a_bias_invalid_on_one_rank_is_checked_before_the_handshake(ranks, fname):
    assert ranks[0][f"bad_bias/{fname}"].startswith("DistributedError"), ranks[0]
    own = ranks[1][f"bad_bias/{fname}"]
    assert own.startswith("InvalidArgumentError") and "heads but the queries have" in own, own
