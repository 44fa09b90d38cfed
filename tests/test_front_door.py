"""One front door: one reading of every argument on every framework's attention and layers.

Each test here is a case that went silently wrong (or raised a framework error)
when the same rule was written in several places.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import posbias
from conftest import FRAMEWORKS, native, to_np
from posbias.testing import _layers as lp

B, H, L, D = 2, 4, 6, 8


def _inputs(backend, heads=H, length=L, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, heads, length, D)).astype(dtype) for _ in range(3))
    return [native(backend, lp._to_layout(t, backend)) for t in (q, k, v)]


def _module(backend, *args, **kwargs):
    return lp.framework_module(backend).PositionalBias(*args, **kwargs)


# ------------------------------------------------------------------ bias= forms
def test_the_four_attention_signatures_agree(backend):
    reference = (
        inspect.signature(lp.framework_module("torch").attention)
        if ("torch" in FRAMEWORKS)
        else None
    )
    signature = inspect.signature(lp.framework_module(backend).attention)
    names = list(signature.parameters)
    assert names[:4] == ["q", "k", "v", "bias"]
    assert "key_mask" in names and "key_padding_mask" not in names
    if reference is not None:
        simplified = [(p.name, p.kind, p.default) for p in signature.parameters.values()]
        expected = [(p.name, p.kind, p.default) for p in reference.parameters.values()]
        assert simplified == expected
    doc = lp.framework_module(backend).attention.__doc__
    for part in ("Args:", "Returns:", "Raises:", "Example:", "arXiv:2108.12409"):
        assert part in doc, part


@pytest.mark.parametrize("form", ["spec", "config", "callable"])
def test_every_bias_form_is_checked_against_the_query_heads(backend, form):
    q, k, v = _inputs(backend)
    one_head = posbias.get("alibi", num_heads=1)
    bias = {
        "spec": one_head,
        "config": one_head.to_config(),
        "callable": lambda q_pos, k_pos, dtype: one_head.bias(
            q_pos=q_pos, k_pos=k_pos, dtype=dtype, backend=backend
        ),
    }[form]
    attention = lp.framework_module(backend).attention
    if form == "callable":
        with pytest.raises(posbias.InvalidArgumentError, match=r"one bias per query head \(4"):
            attention(q, k, v, bias, causal=True)
    else:
        with pytest.raises(posbias.InvalidArgumentError, match="has 1 head but the queries have 4"):
            attention(q, k, v, bias, causal=True)


def test_a_positional_bias_module_of_the_wrong_head_count_is_not_broadcast(framework):
    """The issue's example: a 1-head module with a padding mask was 0.28 off 4-head ALiBi."""
    q, k, v = _inputs(framework)
    mask = np.ones((B, L), bool)
    mask[0, :2] = False
    module = _module(framework, "alibi", 1)
    with pytest.raises(posbias.InvalidArgumentError, match="has 1 head but the queries have 4"):
        lp.framework_module(framework).attention(q, k, v, module, key_mask=native(framework, mask))


def test_a_module_of_the_right_head_count_equals_its_spec(framework):
    q, k, v = _inputs(framework)
    module = _module(framework, "t5", H, seed=3)
    spec_params = {n: np.asarray(a, np.float64) for n, a in module.export_params().items()}
    attention = lp.framework_module(framework).attention
    got = to_np(attention(q, k, v, module, causal=True))
    ref = posbias.numpy.attention(
        *(lp._to_layout(to_np(t), framework).astype(np.float64) for t in (q, k, v)),
        lambda q_pos, k_pos, dtype: posbias.get("t5", num_heads=H).bias(
            q_pos=q_pos, k_pos=k_pos, dtype=dtype, params=spec_params
        ),
        causal=True,
    )
    np.testing.assert_allclose(lp._to_layout(got, framework), ref, atol=2e-6)


def test_layers_check_the_head_count_of_a_config_dict(backend):
    cls = lp.framework_module(backend).MultiHeadAttention
    with pytest.raises(posbias.InvalidArgumentError, match="has 1 head but the queries have 2"):
        cls(8, 2, bias={"name": "alibi", "num_heads": 1})
    with pytest.raises(posbias.InvalidArgumentError, match="has 3 heads but the queries have 2"):
        cls(8, 2, bias=posbias.get("alibi", num_heads=3))


def test_a_bias_of_another_type_is_a_posbias_error(backend):
    q, k, v = _inputs(backend)
    with pytest.raises(posbias.InvalidTypeError, match="bias must be"):
        lp.framework_module(backend).attention(q, k, v, 3.5)


# -------------------------------------------------------------- head-parallel
def test_a_head_slice_keeps_the_toeplitz_fast_path():
    """Head-parallel attention passes a slice of the heads with the spec kept: the
    Hankel table path and FlashAttention's slopes still apply (not an opaque closure)."""
    pytest.importorskip("torch")
    if "torch" not in FRAMEWORKS:
        pytest.skip("PyTorch is not under test")
    import torch

    from posbias._core import problem
    from posbias._core.bias_arg import read_bias
    from posbias.backends.torch import TorchBackend
    from posbias.torch import _sdpa

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 8, 64, 16)
    piece = read_bias("alibi", 8).for_heads(range(4, 8))
    p = problem.prepare(TorchBackend(), q[:, 4:], k[:, 4:], v[:, 4:], piece, causal=True)
    assert _sdpa._toeplitz_table(p) is not None
    assert _sdpa.tile_fn(p) is not _sdpa._masked_tile
    np.testing.assert_array_equal(p.bias.symmetric_slopes(), posbias.alibi_slopes(8)[4:])
    full = posbias.torch.attention(q, k, v, "alibi", causal=True)[:, 4:]
    part = posbias.torch.attention(q[:, 4:], k[:, 4:], v[:, 4:], piece, causal=True)
    torch.testing.assert_close(part, full, rtol=0, atol=2e-6)


# ------------------------------------------------------------------ key_mask
def test_key_padding_mask_is_an_error_that_names_key_mask(backend):
    q, k, v = _inputs(backend)
    mask = native(backend, np.ones((B, L), bool))
    module = lp.framework_module(backend)
    with pytest.raises(posbias.InvalidTypeError, match="key_mask=~key_padding_mask"):
        module.attention(q, k, v, "alibi", key_padding_mask=mask)
    layer = module.MultiHeadAttention(16, 2, causal=True)
    x = native(backend, np.ones((B, L, 16), np.float32))
    with pytest.raises(posbias.InvalidTypeError, match="True = ignore"):
        layer(x, key_padding_mask=mask)


def test_a_misspelt_keyword_suggests_the_right_one(backend):
    q, k, v = _inputs(backend)
    with pytest.raises(posbias.InvalidTypeError, match="Did you mean causal"):
        lp.framework_module(backend).attention(q, k, v, "alibi", casual=True)


@pytest.mark.parametrize(
    "bias",
    [
        dict(name="alibi_scaled", train_length=3),  # not shift-invariant
        dict(name="swin", window=(2, 4)),  # 2-D: padding's position -1 is no grid point
    ],
    ids=lambda b: b["name"],
)
def test_key_mask_left_padding_equals_the_unpadded_sequence(backend, bias):
    """Bias positions come from cumsum(key_mask) - 1: a left-padded row equals the unpadded
    row for every real token, also for a bias that is not shift-invariant or is 2-D."""
    scaled = posbias.from_config({**bias, "num_heads": H})
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(1, H, L, D)).astype(np.float32) for _ in range(3))
    pad = 2
    padded = [np.concatenate([np.zeros((1, H, pad, D), np.float32), t], 2) for t in (q, k, v)]
    mask = np.ones((1, L + pad), bool)
    mask[0, :pad] = False
    attention = lp.framework_module(backend).attention
    as_native = [native(backend, lp._to_layout(t, backend)) for t in padded]
    got = lp._to_layout(to_np(attention(*as_native, scaled, causal=True,
                                        key_mask=native(backend, mask))), backend)  # fmt: skip
    plain = [native(backend, lp._to_layout(t, backend)) for t in (q, k, v)]
    ref = lp._to_layout(to_np(attention(*plain, scaled, causal=True)), backend)
    np.testing.assert_allclose(got[:, :, pad:], ref, atol=2e-6)


# ------------------------------------------------------- strict scalar arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(causal="no"), posbias.InvalidTypeError, "causal must be a bool"),
        (dict(scale="0.5"), posbias.InvalidTypeError, "scale must be a real number"),
        (dict(scale=float("nan")), posbias.InvalidArgumentError, "finite and > 0"),
        (dict(scale=float("inf")), posbias.InvalidArgumentError, "finite and > 0"),
        (dict(q_offset=1.5), posbias.InvalidTypeError, "q_offset must be an integer"),
        (dict(q_offset=True), posbias.InvalidTypeError, "q_offset must be an integer"),
        (dict(q_offset="0"), posbias.InvalidTypeError, "q_offset must be an integer"),
        (
            dict(q_pos=np.arange(L), k_pos=np.arange(L + 3)),
            posbias.InvalidArgumentError,
            "k_pos must have shape",
        ),
        (dict(q_pos=np.arange(L)), posbias.InvalidArgumentError, "give both q_pos and k_pos"),
    ],
)
def test_scalar_and_position_arguments_are_read_strictly(backend, kwargs, error, match):
    q, k, v = _inputs(backend)
    with pytest.raises(error, match=match):
        lp.framework_module(backend).attention(q, k, v, "alibi", **kwargs)


def test_layers_read_booleans_strictly(backend):
    cls = lp.framework_module(backend).MultiHeadAttention
    with pytest.raises(posbias.InvalidTypeError, match="causal must be a bool"):
        cls(16, 2, causal="no")


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64])
def test_attention_inputs_must_be_floating(backend, dtype):
    if dtype is np.complex64 and backend == "tensorflow":
        pytest.skip("tensorflow converts complex NumPy arrays to complex tensors alike")
    q = np.ones((B, H, L, D)).astype(dtype)
    x = native(backend, lp._to_layout(q, backend))
    with pytest.raises(posbias.InvalidTypeError, match="must be a floating tensor"):
        lp.framework_module(backend).attention(x, x, x, "alibi")


# --------------------------------------------------------- TensorFlow matmul
def test_mlp_biases_with_one_query_row_per_sequence(backend):
    """FIRE with batched positions of one query each: TF 2.21's broadcasting matmul
    returned garbage for (B, 1, Lk, W) @ (W, H); the blockwise path hit it."""
    spec = posbias.get("fire", num_heads=4)
    q_pos, k_pos = np.array([[9], [12]]), np.tile(np.arange(13), (2, 1))
    ref = spec.bias(q_pos=q_pos, k_pos=k_pos, dtype="float64")
    got = to_np(spec.bias(q_pos=q_pos, k_pos=k_pos, backend=backend))
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("name", ["alibi", "t5"])
def test_flex_score_mod_takes_key_mask_positions_like_attention(name):
    """FlexAttention with padding (holes included) gets posbias's cumsum(key_mask) - 1."""
    if "torch" not in FRAMEWORKS:
        pytest.skip("PyTorch is not under test")
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import posbias.torch as pt

    torch.manual_seed(0)
    q, k, v = torch.randn(3, B, H, 8, 16)
    mask = torch.ones(B, 8, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, 4:6] = False
    spec = posbias.get(name, num_heads=H)
    blocks = create_block_mask(
        pt.mask_mod(causal=True, q_len=8, k_len=8, key_mask=mask), B, None, 8, 8, device="cpu"
    )
    out = flex_attention(q, k, v, score_mod=spec.score_mod(8, 8, key_mask=mask), block_mask=blocks)
    ref = pt.attention(q, k, v, spec, causal=True, key_mask=mask)
    seen = mask.cumsum(-1) > 0  # rows that see at least one key (flex leaves the others)
    torch.testing.assert_close(out * seen[:, None, :, None], ref, rtol=0, atol=2e-6)
