"""``attn_mask=``: an extra bool or additive mask, on every framework's ``attention``.

Checked against a float64 textbook computation written here (the bias
materialised, the mask added by hand), bool against the equivalent additive
``0 / -inf`` mask, every kernel path (reference, blockwise tiles of any size,
the blockwise backward of PyTorch, JAX and TensorFlow) against the reference,
gradients of q, k, v and the bias parameters against autodiff through the
materialised computation, and the wrong inputs the engine rejects.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_fast_attention import LAYOUT, _module

import posbias
from conftest import FRAMEWORKS, native, to_np
from posbias.errors import InvalidArgumentError, InvalidTypeError
from posbias.testing import _gradients as G

B, H, KV, LQ, LK, D = 2, 4, 2, 5, 9, 16


def _qkv(q_len=LQ, k_len=LK, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((B, H, q_len, D), (B, KV, k_len, D), (B, KV, k_len, D))
    return [rng.standard_normal(s).astype(np.float32).astype(np.float64) for s in shapes]


def _bool_mask(shape=(B, 1, LQ, LK), seed=1):
    mask = np.random.default_rng(seed).random(shape) > 0.35
    mask[..., 0, :] = False  # a row the mask hides completely: zeros, never NaN
    return mask


def _additive(mask):
    return np.where(mask, 0.0, -np.inf)


def _run(backend, q, k, v, bias=None, **kwargs):
    """``attention`` of ``backend`` on NumPy inputs; ``(B, H, Lq, D)`` float64 NumPy."""
    args = [t if LAYOUT[backend] == "bhld" else np.swapaxes(t, 1, 2) for t in (q, k, v)]
    args = [native(backend, t.astype(np.float32)) for t in args]
    kw = {n: native(backend, x) if isinstance(x, np.ndarray) else x for n, x in kwargs.items()}
    out = to_np(_module(backend).attention(*args, bias, **kw)).astype(np.float64)
    return out if LAYOUT[backend] == "bhld" else np.swapaxes(out, 1, 2)


def _textbook(q, k, v, bias, mask, causal=False):
    """softmax(q·kᵀ/√D + bias + mask)·v in float64, bottom-right aligned, hidden rows 0."""
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, 1), np.repeat(v, g, 1)
    q_len, k_len = q.shape[2], k.shape[2]
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        spec = posbias.get(bias, num_heads=q.shape[1])
        scores = scores + np.asarray(spec.bias(q_len, k_len, dtype="float64"))
    if mask.dtype == bool:
        mask = _additive(mask)
    scores = scores + mask
    if causal:
        i = np.arange(q_len)[:, None] + (k_len - q_len)
        scores = np.where(np.arange(k_len)[None] <= i, scores, -np.inf)
    top = np.max(scores, -1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
    total = weights.sum(-1, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bhqk,bhkd->bhqd", weights, v)


def _error(x, ref):
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


MASKS = {
    "bool (B, 1, Lq, Lk)": lambda: _bool_mask(),
    "bool (Lq, Lk)": lambda: _bool_mask((LQ, LK)),
    "additive (B, H, Lq, Lk)": lambda: np.random.default_rng(2).normal(size=(B, H, LQ, LK)),
    "additive -inf (1, H, 1, Lk)": lambda: (
        _additive(np.arange(LK) % 3 > 0) + np.random.default_rng(3).normal(size=(1, H, 1, LK))
    ),
    "additive 0/-inf (B, 1, Lq, Lk)": lambda: _additive(_bool_mask()),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("bias", ["alibi", "t5", "fire", None], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_attn_mask_equals_the_textbook_formula(backend, mask, bias, causal):
    q, k, v = _qkv()
    m = MASKS[mask]()
    ref = _textbook(q, k, v, bias, m, causal)
    for kwargs in ({}, {"block_size": 2}, {"implementation": "reference"}):
        out = _run(backend, q, k, v, bias, attn_mask=m, causal=causal, **kwargs)
        assert np.isfinite(out).all(), kwargs
        tol = 1e-12 if backend == "numpy" else 2e-6
        assert _error(out, ref) <= tol, (kwargs, _error(out, ref))


def test_bool_and_additive_masks_agree_and_hidden_rows_are_zero(backend):
    q, k, v = _qkv()
    mask = _bool_mask()
    a = _run(backend, q, k, v, "alibi", attn_mask=mask, causal=True, block_size=2)
    b = _run(backend, q, k, v, "alibi", attn_mask=_additive(mask), causal=True, block_size=2)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert np.all(a[:, :, 0] == 0)  # the row the mask hides completely


def test_attn_mask_combines_with_key_mask_and_keeps_its_positions(backend):
    """key_mask moves bias positions; attn_mask does not: the same hiding, other biases."""
    q, k, v = _qkv(LK, LK)
    key_mask = np.ones((B, LK), bool)
    key_mask[0, :3] = False
    as_pairs = np.broadcast_to(key_mask[:, None, None, :], (B, 1, LK, LK))
    both = _run(backend, q, k, v, "alibi", key_mask=key_mask, attn_mask=as_pairs, causal=True)
    alone = _run(backend, q, k, v, "alibi", key_mask=key_mask, causal=True)
    np.testing.assert_allclose(both, alone, atol=1e-6)
    ref = _textbook(q, k, v, "alibi", as_pairs, causal=True)  # slot positions
    pairs_only = _run(backend, q, k, v, "alibi", attn_mask=as_pairs, causal=True)
    assert _error(pairs_only, ref) <= 2e-6


def test_attn_mask_under_jit():
    if "jax" not in FRAMEWORKS:
        pytest.skip("jax not under test")
    import jax
    import jax.numpy as jnp

    pbj = _module("jax")
    q, k, v = (jnp.asarray(np.swapaxes(t, 1, 2), jnp.float32) for t in _qkv())
    mask = jnp.asarray(_additive(_bool_mask()))  # -inf entries: read while tracing
    fn = jax.jit(lambda q, k, v, m: pbj.attention(q, k, v, "alibi", attn_mask=m))
    out = np.asarray(fn(q, k, v, mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(
        out, np.asarray(pbj.attention(q, k, v, "alibi", attn_mask=mask)), atol=1e-6
    )


# ------------------------------------------------------------------ gradients
GRAD_MASKS = {
    "bool": lambda q_len, k_len: _bool_mask((B, 1, q_len, k_len)),
    "additive": lambda q_len, k_len: (
        np.random.default_rng(5).normal(size=(1, H, q_len, k_len))
        + _additive(_bool_mask((B, 1, q_len, k_len)))
    ),
}


@pytest.mark.parametrize("name", ["alibi_learned", "t5", "fire"])
@pytest.mark.parametrize("mask", list(GRAD_MASKS))
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_with_attn_mask_equal_autodiff_through_the_reference(
    framework, name, mask, causal
):
    spec = G.spec_for(name, H)
    q_len = k_len = 9
    q, k, v = _qkv(q_len, k_len, seed=7)
    kwargs = {"attn_mask": GRAD_MASKS[mask](q_len, k_len), "causal": causal}
    grads, params, _ = G.gradients(framework, spec, q, k, v, kwargs, "float32", "blockwise", 4)
    ref, ref_params, _ = G.gradients(framework, spec, q, k, v, kwargs, "float64", "reference")
    for g, r, label in zip(grads, ref, "qkv", strict=True):
        assert np.isfinite(g).all(), label
        assert G.normwise(g, r) <= 1e-5, (label, G.normwise(g, r))
    assert G.params_error(params, ref_params) <= 1e-5


def test_torch_attn_mask_has_no_gradient_and_the_inputs_do():
    if "torch" not in FRAMEWORKS:
        pytest.skip("torch not under test")
    import torch

    q, k, v = (torch.tensor(t, dtype=torch.float32, requires_grad=True) for t in _qkv())
    mask = torch.tensor(np.random.default_rng(0).normal(size=(LQ, LK)), dtype=torch.float32)
    out = _module("torch").attention(q, k, v, "alibi", attn_mask=mask, block_size=2)
    out.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("implementation", ["auto", "reference"])
def test_a_float_attn_mask_is_a_constant_on_every_path(implementation):
    """No path returns a mask gradient (JAX's blockwise path returned zeros, its
    reference path values, PyTorch values, TensorFlow None: a silent difference)."""
    mask = np.random.default_rng(0).normal(size=(LQ, LK)).astype(np.float32)
    q, k, v = (t.astype(np.float32) for t in _qkv())
    if "torch" in FRAMEWORKS:
        import torch

        m = torch.tensor(mask, requires_grad=True)
        tq = torch.tensor(q, requires_grad=True)
        out = _module("torch").attention(tq, torch.tensor(k), torch.tensor(v), "alibi",
                                         attn_mask=m, implementation=implementation)  # fmt: skip
        out.square().sum().backward()
        assert m.grad is None and tq.grad is not None
    if "jax" in FRAMEWORKS:
        import jax

        def loss(m):
            out = _module("jax").attention(*(np.swapaxes(t, 1, 2) for t in (q, k, v)), "alibi",
                                           attn_mask=m, implementation=implementation)  # fmt: skip
            return (out**2).sum()

        assert not np.asarray(jax.grad(loss)(mask)).any()
    if "tensorflow" in FRAMEWORKS:
        import tensorflow as tf

        m = tf.Variable(mask)
        with tf.GradientTape() as tape:
            out = _module("tensorflow").attention(
                *(tf.constant(np.swapaxes(t, 1, 2)) for t in (q, k, v)), "alibi",
                attn_mask=m, implementation=implementation)  # fmt: skip
            loss = tf.reduce_sum(out**2)
        assert tape.gradient(loss, m) is None


# ------------------------------------------------------------------ wrong inputs
@pytest.mark.parametrize(
    "mask, error, match",
    [
        (np.ones((B, 1, LQ, LK), np.int32), InvalidTypeError, "attn_mask must be boolean"),
        (np.ones((LQ, LK + 1), bool), InvalidArgumentError, r"attn_mask must be broadcastable"),
        (np.ones((B, 3, LQ, LK), bool), InvalidArgumentError, r"\(2, 4, 5, 9\).*\(2, 3, 5, 9\)"),
        (np.ones((1, B, 1, LQ, LK), bool), InvalidArgumentError, "at most 4 dimensions"),
        (np.full((LQ, LK), np.nan), InvalidArgumentError, "attn_mask must not hold NaN"),
        (np.full((LQ, LK), np.inf), InvalidArgumentError, r"\+inf"),
        (["a"], InvalidTypeError, "attn_mask must be a numeric array"),
    ],
    ids=["int", "keys", "heads", "5-D", "nan", "+inf", "strings"],
)
def test_a_wrong_attn_mask_is_an_error_that_names_it(backend, mask, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        _run(backend, q, k, v, "alibi", attn_mask=mask)
