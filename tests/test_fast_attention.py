"""Every attention implementation against the NumPy float64 reference.

The blockwise paths (SDPA tiles with Hankel bias views in PyTorch, XLA/TF
blocks elsewhere) must give the textbook result for causal, bidirectional,
offset, batched-offset, padded, packed, explicit-position and GQA inputs, for
Toeplitz and non-Toeplitz biases, with one block or many.
"""

from __future__ import annotations

import numpy as np
import pytest

import posbias
from conftest import FRAMEWORKS, native, to_np
from posbias import numpy as pnp
from posbias._core import dispatch as _attention
from posbias._core import problem as _problem
from posbias.errors import InvalidArgumentError

LAYOUT = {"numpy": "bhld", "torch": "bhld", "jax": "blhd", "tensorflow": "blhd"}
TOL = 1e-5  # float32, normwise: max|x - ref| / max|ref|


def _module(backend: str):
    import importlib

    return importlib.import_module(f"posbias.{backend}")


def _inputs(batch, heads, kv, q_len, k_len, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, q_len, 16))
    k = rng.standard_normal((batch, kv, k_len, 16))
    v = rng.standard_normal((batch, kv, k_len, 16))
    return q, k, v


def _masks(batch, length):
    left = np.ones((batch, length), bool)
    left[0, :3] = False
    right = np.ones((batch, length), bool)
    right[-1, length - 4 :] = False
    segments = np.zeros((batch, length), np.int64)
    segments[:, length // 3 :] = 1
    segments[-1, length - 3 :] = 2
    return left, right, segments


LEFT, RIGHT, SEGMENTS = _masks(2, 13)
CASES = {
    "causal": (13, 13, dict(causal=True)),
    "bidirectional": (13, 13, dict(causal=False)),
    "causal Lq<Lk": (5, 13, dict(causal=True)),
    "bidirectional Lq<Lk": (5, 13, dict(causal=False)),
    "decode one token": (1, 13, dict(causal=True)),
    "causal offset": (6, 13, dict(causal=True, q_offset=2)),
    "negative offset": (6, 13, dict(causal=True, q_offset=-2)),
    "batched offset": (6, 13, dict(causal=True, q_offset=np.array([0, 5]))),
    "left padded": (13, 13, dict(causal=True, key_mask=LEFT)),
    "right padded": (13, 13, dict(causal=False, key_mask=RIGHT)),
    "packed": (13, 13, dict(causal=True, segment_ids=SEGMENTS)),
    "explicit positions": (
        13,
        13,
        dict(causal=True, q_pos=np.arange(13) * 2, k_pos=np.arange(13) * 2),
    ),
}
BIASES = ["alibi", "alibi_asymmetric", "t5", "kerple_log", "fire", None]


def _run(backend, q, k, v, bias, kwargs, **extra):
    mod = _module(backend)
    args = [t if LAYOUT[backend] == "bhld" else np.swapaxes(t, 1, 2) for t in (q, k, v)]
    args = [native(backend, t.astype(np.float32)) for t in args]
    kw = {
        key: native(backend, val) if isinstance(val, np.ndarray) else val
        for key, val in kwargs.items()
    }
    out = to_np(mod.attention(*args, bias, **kw, **extra))
    return out if LAYOUT[backend] == "bhld" else np.swapaxes(out, 1, 2)


def _error(x, ref):
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", BIASES, ids=str)
@pytest.mark.parametrize("block_size", [None, 4])
def test_blockwise_equals_reference(backend, case, bias, block_size):
    q_len, k_len, kwargs = CASES[case]
    if bias is None and "q_pos" in kwargs:
        pytest.skip("explicit positions set the bias only: bias=None rejects them")
    heads, kv = 4, 2  # grouped-query attention throughout
    q, k, v = _inputs(2, heads, kv, q_len, k_len, seed=len(case))
    q, k, v = (t.astype(np.float32).astype(np.float64) for t in (q, k, v))
    ref = pnp.attention(q, k, v, bias, implementation="reference", **kwargs)
    assert np.isfinite(ref).all()
    out = _run(backend, q, k, v, bias, kwargs, implementation="blockwise", block_size=block_size)
    assert np.isfinite(out).all()
    assert _error(out, ref) <= TOL, (case, bias)


def test_rows_without_keys_are_zero(backend):
    q, k, v = _inputs(1, 2, 2, 4, 4)
    out = _run(backend, q, k, v, "alibi", dict(causal=True, q_offset=-2), block_size=2)
    assert np.all(out[:, :, :2] == 0) and np.all(np.isfinite(out))


def test_unknown_implementation_is_a_clear_error(backend):
    q, k, v = _inputs(1, 2, 2, 3, 3)
    with pytest.raises(InvalidArgumentError, match="implementation must be one of"):
        _run(backend, q, k, v, "alibi", {}, implementation="fast")
    with pytest.raises(InvalidArgumentError, match="block_size"):
        _run(backend, q, k, v, "alibi", {}, block_size=0)


@pytest.mark.parametrize("name", ["flash_attn", "cudnn"])
def test_device_paths_say_why_they_cannot_run(backend, name):
    q, k, v = _inputs(1, 2, 2, 3, 3)
    with pytest.raises(InvalidArgumentError, match=name):
        _run(backend, q, k, v, "alibi", {}, implementation=name)


def test_auto_selection_table():
    import posbias.numpy

    xp = posbias.backends.load("numpy")()
    q = np.zeros((1, 2, 3, 4))
    p = _problem.prepare(xp, q, q, q, "alibi")
    assert _attention.select(p, "auto") == "reference"
    assert _attention.select(p, "blockwise") == "blockwise"


# --------------------------------------------------------------- PyTorch paths
torch_only = pytest.mark.skipif("torch" not in FRAMEWORKS, reason="torch not under test")


@torch_only
@pytest.mark.parametrize("bias", ["alibi", "t5", "sandwich", None], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_torch_toeplitz_biases_take_the_hankel_path(monkeypatch, bias, causal):
    import torch

    import posbias.torch
    from posbias.torch import _sdpa

    calls = []
    monkeypatch.setattr(_sdpa, "_masked_tile", lambda *a: calls.append(a))
    for q_len, k_len in ((70, 70), (40, 70), (1, 70)):  # K/V reversed, then mask copied
        q = torch.randn(1, 4, q_len, 16)
        k, v = torch.randn(2, 1, 4, k_len, 16)
        out = posbias.torch.attention(q, k, v, bias, causal=causal, block_size=16)
        monkeypatch.undo()
        ref = posbias.torch.attention(q, k, v, bias, causal=causal, implementation="reference")
        monkeypatch.setattr(_sdpa, "_masked_tile", lambda *a: calls.append(a))
        assert (out - ref).abs().max() / ref.abs().max() < 1e-5
    assert not calls


@torch_only
def test_torch_gradients_equal_the_reference():
    import torch

    import posbias.torch

    torch.manual_seed(0)
    leaves = [torch.randn(2, 4, 37, 16, dtype=torch.float64) for _ in range(3)]
    grads = {}
    for impl in ("reference", "blockwise"):
        qkv = [t.clone().float().requires_grad_() for t in leaves]
        out = posbias.torch.attention(*qkv, "alibi", causal=True, implementation=impl, block_size=8)
        (out * torch.linspace(-1, 1, 16)).square().sum().backward()
        grads[impl] = [t.grad for t in qkv]
    for a, b in zip(grads["blockwise"], grads["reference"], strict=True):
        assert (a - b).abs().max() / b.abs().max() < 1e-5


@torch_only
def test_torch_learnable_bias_trains_through_blockwise():
    import torch

    import posbias.torch

    module = posbias.torch.PositionalBias("t5", 4)
    q = torch.randn(1, 4, 20, 16)
    grads = {}
    for impl in ("reference", "blockwise"):
        module.zero_grad()
        out = posbias.torch.attention(
            q, q, q, module, causal=True, implementation=impl, block_size=8
        )
        out.square().sum().backward()
        grads[impl] = [p.grad.clone() for p in module.parameters()]
    assert grads["blockwise"]
    for a, b in zip(grads["blockwise"], grads["reference"], strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@torch_only
def test_torch_blockwise_compiles():
    import torch

    import posbias.torch

    spec = posbias.get("alibi", num_heads=2)
    fn = torch.compile(
        lambda q: posbias.torch.attention(q, q, q, spec, causal=True, block_size=8),
        fullgraph=True,
    )
    q = torch.randn(1, 2, 24, 16)
    ref = posbias.torch.attention(q, q, q, "alibi", causal=True, implementation="reference")
    assert (fn(q) - ref).abs().max() < 1e-5


@torch_only
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len", [1, 7])
def test_flash_attn_mapping_matches_its_documented_semantics(monkeypatch, request, causal, q_len):
    """flash_attn is CUDA-only: a stand-in implementing its documented formula
    checks the arguments posbias passes (slopes, sign, alignment, scale, layout)."""
    import sys
    import types

    import torch

    import posbias.torch
    from posbias.torch import _flash

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, alibi_slopes=None):
        assert alibi_slopes.dtype == torch.float32 and alibi_slopes.shape == (q.shape[2],)
        sq, sk = q.shape[1], k.shape[1]
        i = torch.arange(sq)[:, None] + sk - sq
        j = torch.arange(sk)[None, :]
        bias = -alibi_slopes[:, None, None] * (i - j).abs()
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * softmax_scale + bias
        if causal:
            s = s.masked_fill(j > i, float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double()).to(q.dtype)

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func)
    )
    monkeypatch.setattr(_flash, "_on_cuda", lambda t: True)
    _flash._load.cache_clear()  # the import result is cached: see the stand-in
    request.addfinalizer(_flash._load.cache_clear)
    q, k, v = (torch.randn(2, 6, n, 16, dtype=torch.bfloat16) for n in (q_len, 11, 11))
    spec = posbias.get("alibi", num_heads=6)
    p = _problem.prepare(posbias.backends.load("torch")(), q, k, v, spec, causal=causal)
    assert _attention.select(p, "auto") == "flash_attn"
    out = posbias.torch.attention(q, k, v, spec, causal=causal)
    ref = posbias.torch.attention(q, k, v, spec, causal=causal, implementation="reference")
    assert (out.float() - ref.float()).abs().max() < 2e-2
    # ALiBi with other slopes per side, or padding, is not FlashAttention's form
    asym = posbias.get("alibi_asymmetric", num_heads=6, future_max_bias=4.0)
    p = _problem.prepare(posbias.backends.load("torch")(), q, k, v, asym, causal=causal)
    assert _attention.select(p, "auto") == "blockwise"


# ------------------------------------------------------------- FlexAttention
@torch_only
@pytest.mark.parametrize("bias", ["alibi", "t5", "kerple_log", "alibi_asymmetric"])
@pytest.mark.parametrize(
    "case", ["causal", "bidirectional Lq<Lk", "causal offset", "decode one token"]
)
def test_flex_score_mod_and_mask_mod_equal_posbias(bias, case):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import posbias.torch

    q_len, k_len, kwargs = CASES[case]
    q, k, v = (torch.as_tensor(t, dtype=torch.float32) for t in _inputs(2, 4, 4, q_len, k_len))
    spec = posbias.get(bias, num_heads=4)
    ref = posbias.torch.attention(q, k, v, spec, implementation="reference", **kwargs)
    mask_mod = posbias.torch.mask_mod(q_len=q_len, k_len=k_len, **kwargs)
    block_mask = create_block_mask(mask_mod, 2, None, q_len, k_len, device="cpu")
    score_mod = spec.score_mod(q_len, k_len, q_offset=kwargs.get("q_offset"))
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


@torch_only
@pytest.mark.parametrize("padded", [False, True])
def test_flex_score_mod_on_a_longer_problem_gives_nan_not_a_wrong_number(padded):
    """A table-based score_mod built for 8 tokens, used on 12: no read outside its
    tables (a wrapped negative index was a silent wrong answer), NaN instead."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    spec = posbias.get("t5", num_heads=2)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    score_mod = spec.score_mod(8, 8, key_mask=mask if padded else None)
    q = torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    fits = flex_attention(q, q, q, score_mod=score_mod)
    ref = posbias.torch.attention(q, q, q, spec, key_mask=mask if padded else None)
    assert (fits - ref)[1].abs().max() < 1e-5  # the length it was built for: exact
    longer = torch.randn(2, 2, 12, 16)
    assert torch.isnan(flex_attention(longer, longer, longer, score_mod=score_mod)).any()


@torch_only
def test_flex_mask_mod_padding_and_segments():
    """Masks only (no bias): padding and packing rules equal posbias's."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import posbias.torch

    q, k, v = (torch.as_tensor(t, dtype=torch.float32) for t in _inputs(2, 4, 4, 13, 13))
    for kwargs in (
        dict(causal=True, key_mask=torch.as_tensor(RIGHT)),
        dict(causal=True, segment_ids=torch.as_tensor(SEGMENTS)),
    ):
        ref = posbias.torch.attention(q, k, v, None, implementation="reference", **kwargs)
        block_mask = create_block_mask(
            posbias.torch.mask_mod(q_len=13, k_len=13, **kwargs), 2, None, 13, 13, device="cpu"
        )
        out = flex_attention(q, k, v, block_mask=block_mask)
        assert (out - ref).abs().max() / ref.abs().max() < 1e-5


@torch_only
def test_flex_score_mod_compiled_forward():
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import posbias.torch

    q = torch.randn(1, 4, 128, 16)
    spec = posbias.get("alibi", num_heads=4)
    block_mask = create_block_mask(
        posbias.torch.mask_mod(causal=True, q_len=128, k_len=128), 1, None, 128, 128, "cpu"
    )
    compiled = torch.compile(flex_attention)
    out = compiled(q, q, q, score_mod=spec.score_mod(128, 128), block_mask=block_mask)
    ref = posbias.torch.attention(q, q, q, spec, causal=True, implementation="reference")
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


def test_score_mod_refuses_position_dependent_biases():
    pytest.importorskip("torch")
    with pytest.raises(InvalidArgumentError, match="both positions"):
        posbias.get("fire", num_heads=2).score_mod(4, 4)


@torch_only
def test_torch_decode_steps_share_a_cached_table():
    """Decoding asks for a new offset at every step; the cached diagonal table
    (built for the whole key length) must give every step's exact bias."""
    import torch

    import posbias.torch
    from posbias.torch import _sdpa

    _sdpa._TABLES.clear()
    k, v = torch.randn(2, 1, 4, 30, 16)
    for spec in (posbias.get("alibi", num_heads=4), posbias.get("t5", num_heads=4)):
        for offset in (29, 3, 17, 0, 29):
            q = torch.randn(1, 4, 1, 16)
            out = posbias.torch.attention(q, k, v, spec, causal=True, q_offset=offset)
            ref = posbias.torch.attention(
                q, k, v, spec, causal=True, q_offset=offset, implementation="reference"
            )
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert 1 <= len(_sdpa._TABLES) <= 2


@torch_only
def test_flash_attn_on_a_gpu_equals_the_reference():
    """The real FlashAttention, where a CUDA GPU and flash_attn are present."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("flash_attn")
    import posbias.torch

    q, k, v = (torch.randn(2, 8, n, 64, device="cuda", dtype=torch.bfloat16) for n in (7, 64, 64))
    spec = posbias.get("alibi", num_heads=8)
    for causal in (False, True):
        p = _problem.prepare(posbias.backends.load("torch")("cuda"), q, k, v, spec, causal=causal)
        assert _attention.select(p, "auto") == "flash_attn"
        out = posbias.torch.attention(q, k, v, spec, causal=causal)
        ref = posbias.torch.attention(q, k, v, spec, causal=causal, implementation="reference")
        assert (out.float() - ref.float()).abs().max() / ref.float().abs().max() < 2e-2


@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
def test_layers_take_implementation_and_block_size(framework, implementation):
    """MultiHeadAttention(implementation=, block_size=) gives the same outputs; Keras
    serialises both."""
    import importlib

    mod = importlib.import_module(f"posbias.{framework}")
    x = np.random.default_rng(0).standard_normal((2, 9, 32)).astype(np.float32)
    layer = mod.MultiHeadAttention(32, 4, causal=True, implementation=implementation, block_size=4)
    ref = pnp.MultiHeadAttention(32, 4, causal=True)
    ref.load_portable_weights(layer.portable_weights())
    out = to_np(layer(native(framework, x)))
    expected = ref(x.astype(np.float64))
    assert np.max(np.abs(out - expected)) <= 1e-5 * np.max(np.abs(expected))
    if framework == "tensorflow":
        config = layer.get_config()
        assert config["implementation"] == implementation and config["block_size"] == 4
    with pytest.raises(InvalidArgumentError, match="implementation must be one of"):
        mod.MultiHeadAttention(32, 4, implementation="fast")
