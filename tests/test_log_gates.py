"""``log_gates=``: data-dependent forget-gate biases (FoX, CABLE, data-dependent ALiBi).

Forward against an independent float64 NumPy implementation of the papers'
formula (posbias.testing._gates_reference, checked against x-transformers'
DataDependentAlibi); gradients of q, k, v, the gates and a learnable bias
against the same framework's float64 autodiff through the textbook formula;
the float32 precision of the gate bias at L = 32768; padding and packing
equal the unpadded / separate sequences; wrong inputs get posbias errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import posbias
from conftest import BACKENDS, FRAMEWORKS, native, to_np
from posbias._core import problem as _problem
from posbias.backends import load
from posbias.errors import InvalidArgumentError, InvalidTypeError
from posbias.testing import _gates_reference as R
from posbias.testing._layers import framework_module

LAYOUT = {"numpy": "bhld", "torch": "bhld", "jax": "blhd", "tensorflow": "blhd"}
TOL = 1e-5


def _inputs(batch=2, heads=4, kv=2, q_len=13, k_len=13, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, q_len, 8))
    k, v = rng.standard_normal((2, batch, kv, k_len, 8))
    g, g_after = -rng.uniform(0.0, scale, (2, batch, heads, k_len))
    return q, k, v, g, g_after


def _args(backend, q, k, v, g, g_after, kwargs, dtype="float32"):
    """Native tensors in the backend's layout (gates ``(B, H, Lk)`` or ``(B, Lk, H)``)."""
    swap = LAYOUT[backend] == "blhd"
    qkv = [native(backend, (np.swapaxes(t, 1, 2) if swap else t).astype(dtype)) for t in (q, k, v)]
    gates = [
        None if t is None else native(backend, (np.swapaxes(t, 1, 2) if swap else t).astype(dtype))
        for t in (g, g_after)
    ]
    kw = {n: native(backend, x) if isinstance(x, np.ndarray) else x for n, x in kwargs.items()}
    return qkv, gates, kw


def _attention(backend, q, k, v, g, g_after=None, bias=None, dtype="float32", **kwargs):
    (q, k, v), (g, g_after), kw = _args(backend, q, k, v, g, g_after, kwargs, dtype)
    mod = framework_module(backend)
    out = to_np(mod.attention(q, k, v, bias, log_gates=g, log_gates_after=g_after, **kw))
    return np.swapaxes(out, 1, 2) if LAYOUT[backend] == "blhd" else out


def _error(x, ref):
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _repeat_kv(k, heads):
    return np.repeat(k, heads // k.shape[1], axis=1)


# ------------------------------------------------------------- forward, papers
@pytest.mark.parametrize("block_size", [None, 4])
def test_forward_equals_the_papers_formula(backend, block_size):
    q, k, v, g, g_after = _inputs()
    kr, vr = _repeat_kv(k, 4), _repeat_kv(v, 4)
    for causal in (True, False):
        extra = {} if causal else {"g_after": g_after}
        ref = R.attention_reference(q, kr, vr, g, causal=causal, **extra)
        out = _attention(
            backend, q, k, v, g, None if causal else g_after, causal=causal, block_size=block_size
        )
        assert _error(out, ref) <= TOL, (causal, _error(out, ref))


def test_gates_add_to_a_positional_bias(backend):
    """``bias=`` and ``log_gates=`` add: softmax(q·kᵀ·scale + ALiBi + gate bias)."""
    q, k, v, g, _ = _inputs()
    kr, vr = _repeat_kv(k, 4), _repeat_kv(v, 4)
    alibi = posbias.get("alibi", num_heads=4).bias(q_pos=np.arange(13), k_pos=np.arange(13))
    scores = np.einsum("bhqd,bhkd->bhqk", q, kr) / np.sqrt(8) + alibi + R.gate_bias(g)
    scores = np.where(np.tril(np.ones((13, 13), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bhkd->bhqd", probs / probs.sum(-1, keepdims=True), vr)
    out = _attention(backend, q, k, v, g, bias="alibi", causal=True, block_size=4)
    assert _error(out, ref) <= TOL


def test_padding_and_packing_equal_separate_sequences(backend):
    """Padded keys contribute 0; a packed segment sums only its own gates."""
    q, k, v, g, _ = _inputs(batch=1, k_len=10, q_len=10)
    # left padding: 3 pad slots, then the 10 real tokens
    pad = lambda t: np.concatenate([np.zeros_like(t[..., :3, :]), t], -2)  # noqa: E731
    gp = np.concatenate([np.full((1, 4, 3), -7.0), g], -1)  # padded gates: ignored
    mask = np.ones((1, 13), bool)
    mask[:, :3] = False
    alone = _attention(backend, q, k, v, g, bias="alibi", causal=True)
    padded = _attention(
        backend, pad(q), pad(k), pad(v), gp, bias="alibi", causal=True, key_mask=mask
    )
    assert _error(padded[..., 3:, :], alone) <= TOL
    # packing: [first 4 tokens | next 6 tokens] == two separate calls
    segments = np.array([[0] * 4 + [1] * 6])
    packed = _attention(backend, q, k, v, g, causal=True, segment_ids=segments, block_size=4)
    first = _attention(
        backend, q[..., :4, :], k[..., :4, :], v[..., :4, :], g[..., :4], causal=True
    )
    second = _attention(
        backend, q[..., 4:, :], k[..., 4:, :], v[..., 4:, :], g[..., 4:], causal=True
    )
    assert _error(packed[..., :4, :], first) <= TOL
    assert _error(packed[..., 4:, :], second) <= TOL


def test_decoding_equals_the_full_forward(backend):
    """A query at slot ``q_offset + r`` sums the gates between its own slot and each key."""
    q, k, v, g, _ = _inputs()
    full = _attention(backend, q, k, v, g, causal=True)
    for start, rows in ((12, 1), (5, 3)):
        part = _attention(
            backend, q[..., start : start + rows, :], k, v, g, causal=True, q_offset=start
        )
        assert _error(part, full[..., start : start + rows, :]) <= TOL
    offsets = np.array([2, 7])
    part = _attention(backend, q[..., :4, :], k, v, g, causal=True, q_offset=offsets)
    for b, o in enumerate(offsets):
        ref = _attention(
            backend,
            q[b : b + 1, :, :4],
            k[b : b + 1],
            v[b : b + 1],
            g[b : b + 1],
            causal=True,
            q_offset=int(o),
        )
        assert _error(part[b : b + 1], ref) <= TOL


# ------------------------------------------------------------------ precision
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gate_bias_keeps_float32_digits_at_32k(backend_name):
    """At L = 32768, g ≈ -0.05: every pair's bias within 1e-5 relative of float64 (the
    naive float32 ``G[i] - G[j]`` is off by far more: the test can fail)."""
    length = 32768
    rng = np.random.default_rng(1)
    g = -(0.05 + 0.01 * rng.standard_normal((1, 1, length))).clip(0.001, None)
    big_g = np.cumsum(g, -1)  # float64
    xp = load(backend_name)(compute_dtype="float32")
    z = np.zeros((1, 1, length, 1), np.float32)
    gates = g.astype(np.float32)
    p = _problem.prepare(
        xp, z, z, z, causal=True, log_gates=xp.from_numpy(gates), compute_dtype="float32"
    )
    worst = 0.0
    for r0 in (0, 64 * 7 + 5, length // 2 + 3, length - 256):
        r1 = r0 + 256
        tile = to_np(p.bias_tile(r0, r1, r1))[0, 0].astype(np.float64)
        ref = big_g[0, 0, r0:r1, None] - big_g[0, 0, None, :r1]
        lower = np.arange(r1)[None, :] <= np.arange(r0, r1)[:, None]
        rel = np.abs(tile - ref)[lower & (ref != 0)] / np.abs(ref)[lower & (ref != 0)]
        assert np.all(tile[lower & (ref == 0)] == 0)  # the diagonal: exactly 0
        worst = max(worst, float(rel.max()))
    assert worst <= 1e-5, worst
    naive = np.cumsum(g.astype(np.float32), -1, dtype=np.float32)[0, 0]
    rows = slice(length - 256, length)
    naive_tile = (naive[rows, None] - naive[None, :]).astype(np.float64)
    ref = big_g[0, 0, rows, None] - big_g[0, 0, None, :]
    lower = np.arange(length)[None, :] < np.arange(length - 256, length)[:, None]
    assert float((np.abs(naive_tile - ref)[lower] / np.abs(ref)[lower]).max()) > 1e-3


# ------------------------------------------------------------------ gradients
def _gradients(framework, q, k, v, g, g_after, kwargs, dtype, implementation, bias=None):
    """``(dq, dk, dv, dg[, dg_after], *bias parameter grads)`` of sum((out·w)²), float64
    NumPy in the ``(B, H, L, D)`` / ``(B, H, Lk)`` layout."""
    mod = framework_module(framework)
    block = {"implementation": implementation, "block_size": 4}
    w = np.linspace(-1.0, 1.0, q.shape[-1])
    if framework == "torch":
        import torch

        module = None if bias is None else mod.PositionalBias(posbias.get(bias, num_heads=4))
        (tq, tk, tv), tg, kw = _args(framework, q, k, v, g, g_after, kwargs, dtype)
        leaves = [tq, tk, tv, *(t for t in tg if t is not None)]
        for t in leaves:
            t.requires_grad_(True)
        out = mod.attention(
            tq, tk, tv, module, log_gates=tg[0], log_gates_after=tg[1], **kw, **block
        )
        (out.double() * torch.as_tensor(w)).square().sum().backward()
        grads = [t.grad.double().numpy() for t in leaves]
        if module is not None:
            grads += [p.grad.double().numpy() for p in module.params.values()]
        return grads
    if framework == "jax":
        import jax
        import jax.numpy as jnp
        from flax import nnx

        spec = posbias.get(bias or "alibi", num_heads=4)
        module = mod.PositionalBias(spec)
        with jax.enable_x64(dtype == "float64"):
            (tq, tk, tv), tg, kw = _args(framework, q, k, v, g, g_after, kwargs, dtype)
            leaves = [tq, tk, tv, *(t for t in tg if t is not None)]

            def loss(module, leaves):
                after = leaves[4] if len(leaves) > 4 else None
                out = mod.attention(
                    *leaves[:3],
                    None if bias is None else module,
                    log_gates=leaves[3],
                    log_gates_after=after,
                    **kw,
                    **block,
                )
                return jnp.sum(
                    (out.astype(jnp.float64 if dtype == "float64" else jnp.float32) * w) ** 2
                )

            dp, dl = nnx.grad(loss, argnums=(0, 1))(module, leaves)
        grads = [np.swapaxes(np.asarray(t, np.float64), 1, 2) for t in dl]
        if bias is not None:
            grads += [np.asarray(x, np.float64) for x in nnx.to_pure_dict(dp).values()]
        return grads
    import tensorflow as tf

    (tq, tk, tv), tg, kw = _args(framework, q, k, v, g, g_after, kwargs, dtype)
    module = None if bias is None else mod.PositionalBias(posbias.get(bias, num_heads=4))
    leaves = [tq, tk, tv, *(t for t in tg if t is not None)]
    weights = [] if module is None else [module.bias_params[n] for n in module.bias_params]
    with tf.GradientTape() as tape:
        tape.watch(leaves)
        out = mod.attention(
            tq, tk, tv, module, log_gates=tg[0], log_gates_after=tg[1], **kw, **block
        )
        loss = tf.reduce_sum((tf.cast(out, tf.float64) * w) ** 2)
    grads = tape.gradient(loss, leaves + weights)
    out = [np.swapaxes(np.asarray(t, np.float64), 1, 2) for t in grads[: len(leaves)]]
    return out + [np.asarray(t, np.float64) for t in grads[len(leaves) :]]


LEFT = np.ones((2, 13), bool)
LEFT[0, :3] = False
RIGHT = np.ones((2, 13), bool)
RIGHT[1, 9:] = False
GRADIENT_CASES = {
    "causal": (13, dict(causal=True)),
    "bidirectional": (13, dict(causal=False)),
    "causal Lq<Lk": (5, dict(causal=True)),
    "offset": (6, dict(causal=True, q_offset=2)),
    "batched offset": (6, dict(causal=True, q_offset=np.array([0, 5]))),
    "left padded": (13, dict(causal=True, key_mask=LEFT)),
    "right padded bidirectional": (13, dict(causal=False, key_mask=RIGHT)),
    "packed": (13, dict(causal=True, segment_ids=np.array([[0] * 5 + [1] * 8] * 2))),
}


@pytest.mark.parametrize("bias", [None, "t5"], ids=str)
def test_gradients_equal_a_float64_reference(framework, bias):
    """q, k, v, the gates (and a learnable bias's parameters) ≤ 1e-5 normwise."""
    for case, (q_len, kwargs) in GRADIENT_CASES.items():
        q, k, v, g, g_after = _inputs(q_len=q_len, seed=len(case))
        q, k, v, g, g_after = (
            t.astype(np.float32).astype(np.float64) for t in (q, k, v, g, g_after)
        )
        after = None if kwargs["causal"] else g_after
        got = _gradients(framework, q, k, v, g, after, kwargs, "float32", "blockwise", bias)
        ref = _gradients(framework, q, k, v, g, after, kwargs, "float64", "reference", bias)
        assert len(got) == len(ref) == 4 + (after is not None) + (bias is not None)
        for i, (a, r) in enumerate(zip(got, ref, strict=True)):
            assert np.isfinite(a).all(), (case, i)
            assert _error(a, r) <= TOL, (case, i, _error(a, r))


def test_gradients_are_bit_identical_run_to_run(framework):
    q, k, v, g, _ = _inputs()
    runs = [
        _gradients(
            framework, q, k, v, g, None, dict(causal=True, key_mask=LEFT), "float32", "blockwise"
        )
        for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert np.array_equal(a, b)


def test_fully_padded_sequence_gives_zero_gradients(framework):
    q, k, v, g, _ = _inputs()
    mask = np.ones((2, 13), bool)
    mask[1] = False
    grads = _gradients(
        framework, q, k, v, g, None, dict(causal=True, key_mask=mask), "float32", "blockwise"
    )
    assert all(np.isfinite(t).all() for t in grads)
    assert np.all(grads[0][1] == 0) and np.all(grads[3][1] == 0)


# ---------------------------------------------------------------- wrong inputs
def _call(backend, g, g_after=None, **kwargs):
    q, k, v, _, _ = _inputs()
    mod = framework_module(backend)
    (tq, tk, tv), _, kw = _args(backend, q, k, v, None, None, kwargs)
    conv = lambda t: t if t is None or not isinstance(t, np.ndarray) else native(backend, t)  # noqa: E731
    return mod.attention(tq, tk, tv, log_gates=conv(g), log_gates_after=conv(g_after), **kw)


def _gates(backend, g):
    return np.swapaxes(g, 1, 2) if LAYOUT[backend] == "blhd" else g


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "match"),
    [
        (lambda g: g * -1.0, dict(causal=True), InvalidArgumentError, "positive"),
        (
            lambda g: np.where(g < -0.1, -np.inf, g),
            dict(causal=True),
            InvalidArgumentError,
            "finite",
        ),
        (
            lambda g: np.where(g < -0.1, np.nan, g),
            dict(causal=True),
            InvalidArgumentError,
            "finite",
        ),
        (lambda g: g[:, :, :-1], dict(causal=True), InvalidArgumentError, "shape"),
        (lambda g: g[:, :2], dict(causal=True), InvalidArgumentError, "shape"),
        (lambda g: (g * 0).astype(np.int32), dict(causal=True), InvalidTypeError, "floating"),
        (lambda g: g < 0, dict(causal=True), InvalidTypeError, "floating"),
        (lambda g: "forgetting", dict(causal=True), InvalidTypeError, "log_gates"),
        (lambda g: g, dict(causal=False), InvalidArgumentError, "log_gates_after"),
        (lambda g: g, dict(causal=True, q_offset=-1), InvalidArgumentError, "q_offset"),
        (
            lambda g: g,
            dict(causal=True, segment_ids=np.array([[0, 1, 0] + [1] * 10] * 2)),
            InvalidArgumentError,
            "contiguous",
        ),
    ],
)
def test_wrong_gates_get_posbias_errors(backend, make, kwargs, error, match):
    _, _, _, g, _ = _inputs()
    with pytest.raises(error, match=match):
        _call(backend, make(_gates(backend, g.astype(np.float32))), **kwargs)


def test_after_gates_need_gates_and_bidirectional(backend):
    _, _, _, g, g_after = _inputs()
    g, g_after = (_gates(backend, t.astype(np.float32)) for t in (g, g_after))
    with pytest.raises(InvalidArgumentError, match="needs log_gates="):
        _call(backend, None, g_after, causal=False)
    with pytest.raises(InvalidArgumentError, match="causal=True hides"):
        _call(backend, g, g_after, causal=True)


@pytest.mark.skipif("jax" not in FRAMEWORKS, reason="JAX not under test")
def test_positive_gates_under_jit_give_nan_not_a_silent_answer():
    import jax

    q, k, v, g, _ = _inputs()
    (tq, tk, tv), (tg, _), _ = _args("jax", q, k, v, -g, None, {})
    mod = framework_module("jax")
    out = jax.jit(lambda q, k, v, g: mod.attention(q, k, v, causal=True, log_gates=g))(
        tq, tk, tv, tg
    )
    assert np.isnan(np.asarray(out)).any()


@pytest.mark.skipif("tensorflow" not in FRAMEWORKS, reason="TensorFlow not under test")
@pytest.mark.parametrize("causal", [True, False])
def test_tf_function_with_an_unknown_batch_size(causal):
    """Gates trace under tf.function, bidirectional ones too, with the batch size unknown
    (the one dimension that may be): the same outputs and gate gradients as eagerly."""
    import tensorflow as tf

    mod = framework_module("tensorflow")

    def run(q, g):
        with tf.GradientTape() as tape:
            tape.watch([q, g])
            after = None if causal else g
            out = mod.attention(
                q, q, q, causal=causal, log_gates=g, log_gates_after=after, block_size=16
            )
            loss = tf.reduce_sum(out**2)
        return out, tape.gradient(loss, g)

    traced = tf.function(
        run, input_signature=[tf.TensorSpec((None, 70, 2, 4)), tf.TensorSpec((None, 70, 2))]
    )
    q, _, _, g, _ = _inputs(batch=3, heads=2, kv=2, q_len=70, k_len=70)
    q = tf.constant(np.swapaxes(q[..., :4], 1, 2), tf.float32)
    g = tf.constant(np.swapaxes(g, 1, 2), tf.float32)
    for got, want in zip(traced(q, g), run(q, g), strict=True):
        assert _error(got.numpy(), want.numpy()) <= TOL


@pytest.mark.skipif("jax" not in FRAMEWORKS, reason="JAX not under test")
def test_traced_offsets_outside_the_keys_give_nan_not_a_silent_answer():
    import jax

    q, k, v, g, _ = _inputs()
    (tq, tk, tv), (tg, _), _ = _args("jax", q, k, v, g, None, {})
    mod = framework_module("jax")
    run = jax.jit(lambda q, o: mod.attention(q, tk, tv, causal=True, log_gates=tg, q_offset=o))
    out = np.asarray(run(tq[:, :4], np.array([9, 12])))  # 12 + 4 > 13: sequence 1 only
    assert not np.isnan(out[0]).any() and np.isnan(out[1]).all()
