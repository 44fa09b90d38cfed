"""PyTorch idioms: nn.Module, state_dict, gradients, torch.compile, half precision, SDPA truth."""

import numpy as np
import pytest

import posbias
from conftest import BACKENDS

if "torch" not in BACKENDS:
    pytest.skip("torch not under test", allow_module_level=True)

import torch
import torch.nn.functional as F

from posbias.torch import MultiHeadAttention, PositionalBias, attention


def test_state_dict_round_trip():
    a = MultiHeadAttention(32, 4, causal=True, num_kv_heads=2, seed=1)
    b = MultiHeadAttention(32, 4, causal=True, num_kv_heads=2, seed=2)
    x = torch.randn(2, 5, 32)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert set(a.state_dict()) == {f"{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")}


def test_gradients_flow():
    mha = MultiHeadAttention(32, 4, causal=True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    mha(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in mha.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_compile_fullgraph_forward_and_decode():
    mha = MultiHeadAttention(32, 4, causal=True, num_kv_heads=2)
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    compiled = torch.compile(mha, fullgraph=True)
    torch.testing.assert_close(
        compiled(x, key_mask=mask), mha(x, key_mask=mask), rtol=1e-5, atol=1e-6
    )
    cache = mha.init_cache(2, 8)
    step = torch.compile(lambda t, c: mha(t, cache=c), fullgraph=True)
    y, cache = step(x[:, :5], cache)
    y2, cache = step(x[:, 5:], cache)
    torch.testing.assert_close(torch.cat([y, y2], 1), mha(x), rtol=1e-5, atol=1e-6)


def _example(name, heads=4):
    """A valid spec of a registered variant (some need hyper-parameters, e.g. a grid)."""
    return posbias.registered()[name].parity_examples(heads)[0]


@pytest.mark.parametrize("name", posbias.list_biases())
def test_compile_fullgraph_positional_bias_every_variant(name):
    """The bias module alone: learnable parameters are read without NumPy on every call."""
    torch._dynamo.reset()  # one compiled module per variant: stay under the recompile limit
    module = PositionalBias(_example(name))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    # FIRE's MLP runs chunked in eager mode on CPU (TorchBackend.scalar_mlp) and as plain
    # operations when traced: the same float32 products summed in another order
    exact = {} if name == "fire" else dict(rtol=0, atol=0)
    torch.testing.assert_close(compiled(6, 6), module(6, 6), **exact)


@pytest.mark.parametrize("name", posbias.list_biases())
def test_compile_fullgraph_mha_forward_and_decode_every_variant(name):
    """torch.compile(fullgraph=True) of a causal layer with every registered bias: the
    forward pass (with gradients) and one KV-cache decode step equal eager mode.
    (``aot_eager`` traces the whole graph, forward and backward, as Inductor would, but
    skips code generation: graph breaks are what this test is about.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, bias=_example(name), causal=True, seed=1)
    x = torch.randn(2, 5, 16)
    eager = mha(x)
    forward = torch.compile(mha, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(forward(x), eager, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        _, cache = mha(x[:, :4], cache=mha.init_cache(2, 6))
        expected, expected_cache = mha(x[:, 4:], cache=cache)
        step = torch.compile(lambda t, c: mha(t, cache=c), fullgraph=True, backend="aot_eager")
        y, new_cache = step(x[:, 4:], cache)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, eager[:, 4:].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_cache.k, expected_cache.k, rtol=0, atol=0)


def test_half_precision_keeps_bias_in_float32():
    mha = MultiHeadAttention(32, 4, causal=True).to(torch.bfloat16)
    assert mha.q_proj.weight.dtype == torch.bfloat16
    bias = mha.positional_bias(4, 4)
    assert bias.dtype == torch.float32
    torch.testing.assert_close(bias, PositionalBias("alibi", 4)(4, 4), rtol=0, atol=0)
    assert mha(torch.randn(1, 4, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("heads", "kv"), [(8, 8), (12, 4)])
def test_matches_sdpa_with_an_explicit_float_mask(causal, heads, kv):
    """External truth: SDPA given the same bias as a float mask (and masking) agrees."""
    torch.manual_seed(0)
    q = torch.randn(2, heads, 7, 16)
    k = torch.randn(2, kv, 7, 16)
    v = torch.randn(2, kv, 7, 16)
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, 5:] = False
    spec = posbias.get("alibi", num_heads=heads)
    mask = spec.bias(q_len=7, k_len=7, backend="torch").expand(2, heads, 7, 7).clone()
    visible = pad[:, None, None, :].expand(2, heads, 7, 7)
    if causal:
        visible = visible & torch.ones(7, 7, dtype=torch.bool).tril()
    mask = mask.masked_fill(~visible, float("-inf"))
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1), attn_mask=mask
    )
    # right padding keeps positions = indices, so the SDPA mask above is exactly the bias
    out = attention(q, k, v, spec, causal=causal, key_mask=pad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gpu_placement_follows_inputs():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    mha = MultiHeadAttention(32, 4, causal=True).cuda()
    x = torch.randn(1, 5, 32, device="cuda")
    with torch.no_grad():
        out = mha(x)
        assert out.device.type == "cuda"
        np.testing.assert_allclose(out.cpu().numpy(), mha.cpu()(x.cpu()).numpy(), atol=1e-5)
