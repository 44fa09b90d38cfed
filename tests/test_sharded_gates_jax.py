"""``log_gates=`` in posbias.jax.sharded_attention on 4 virtual CPU devices.

Forget gates (FoX, CABLE) sharded like the keys equal single-device
:func:`posbias.jax.attention`: forward and gradients of q, k, v and the gates,
contiguous and zigzag layouts, causal and bidirectional, the layout ring and
the masked ring (padding, packing), head- and sequence-sharded meshes.
"""

from __future__ import annotations

import numpy as np
import pytest

import posbias
from posbias import testing as pt

if "jax" not in pt.backends_under_test():
    pytest.skip("JAX is not under test", allow_module_level=True)

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from posbias.jax import attention, sharded_attention, unzigzag, zigzag

B, L, H, D = 2, 64, 4, 8
TOL = 2e-6
MESHES = {
    "seq4": ("seq", None, (4,)),
    "seq2xhead2": ("seq", "head", (2, 2)),
    "head4": (None, "head", (4,)),
}


@pytest.fixture(scope="module")
def devices():
    devices = jax.devices()
    assert len(devices) >= 4, "the root conftest starts JAX with 4 CPU devices"
    return np.array(devices[:4])


def mesh_of(devices, name):
    seq_axis, head_axis, shape = MESHES[name]
    axes = tuple(a for a in (seq_axis, head_axis) if a is not None)
    return Mesh(devices.reshape(shape), axes), seq_axis, head_axis


def inputs(seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, L, H, D))
    k, v = rng.normal(size=(2, B, L, 2, D))  # grouped-query attention
    g, g_after = -rng.uniform(0.0, scale, (2, B, L, H))
    return tuple(jnp.asarray(t, jnp.float32) for t in (q, k, v, g, g_after))


def gate_kwargs(causal, g, g_after):
    return {"log_gates": g} if causal else {"log_gates": g, "log_gates_after": g_after}


def err(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)))


def sharded(mesh, seq_axis, head_axis, order, bias, causal, **options):
    """jit(sharded_attention) on arrays in natural order (zigzag applied and undone here)."""
    shards = mesh.shape[seq_axis] if seq_axis else 1
    per_token = ("log_gates", "log_gates_after", "key_mask", "segment_ids")

    @jax.jit
    def fn(q, k, v, tokens):
        return sharded_attention(q, k, v, bias, mesh=mesh, seq_axis=seq_axis,
                                 head_axis=head_axis, causal=causal, order=order,
                                 **tokens)  # fmt: skip

    def call(q, k, v, **tokens):
        if order == "zigzag":
            q, k, v = (zigzag(t, shards) for t in (q, k, v))
            tokens = {n: zigzag(t, shards) if n in per_token else t for n, t in tokens.items()}
        out = fn(q, k, v, tokens)
        return unzigzag(out, shards) if order == "zigzag" else out

    return call


@pytest.mark.parametrize("bias", [None, "alibi"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "mesh_name, order",
    [("seq4", "contiguous"), ("seq4", "zigzag"), ("seq2xhead2", "zigzag"), ("head4", "contiguous")],
)
def test_forward_equals_single_device(devices, bias, causal, mesh_name, order):
    q, k, v, g, g_after = inputs()
    kw = gate_kwargs(causal, g, g_after)
    ref = attention(q, k, v, bias, causal=causal, **kw)
    out = sharded(*mesh_of(devices, mesh_name), order, bias, causal)(q, k, v, **kw)
    assert out.shape == ref.shape and err(out, ref) < TOL


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("order", ["contiguous", "zigzag"])
def test_gradients_equal_single_device(devices, causal, order):
    """Gradients of q, k, v, log_gates (and log_gates_after) on 4 sequence shards."""
    q, k, v, g, g_after = inputs(seed=1)
    names = ["log_gates"] if causal else ["log_gates", "log_gates_after"]
    mesh, seq_axis, head_axis = mesh_of(devices, "seq4")
    call = sharded(mesh, seq_axis, head_axis, order, "alibi", causal)

    def loss_ref(q, k, v, gates):
        out = attention(q, k, v, "alibi", causal=causal, **dict(zip(names, gates, strict=True)))
        return jnp.sum(out * jnp.cos(out))

    def loss(q, k, v, gates):
        out = call(q, k, v, **dict(zip(names, gates, strict=True)))
        return jnp.sum(out * jnp.cos(out))

    gates = [g, g_after][: len(names)]
    expected = jax.grad(loss_ref, argnums=(0, 1, 2, 3))(q, k, v, gates)
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, gates)
    for e, x in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        assert float(jnp.max(jnp.abs(e))) > 0
        assert err(x, e) < TOL * max(1.0, float(jnp.max(jnp.abs(e))))


@pytest.mark.parametrize("order", ["contiguous", "zigzag"])
def test_padding_and_packing(devices, order):
    """The masked ring: padded keys contribute no gate, packed documents do not mix."""
    q, k, v, g, g_after = inputs(seed=2)
    mask = np.ones((B, L), bool)
    mask[0, -9:] = False
    mask[1, :5] = False
    segments = np.repeat([[0] * 20 + [1] * 30 + [2] * 14], B, axis=0)
    mesh, seq_axis, head_axis = mesh_of(devices, "seq4")
    for causal, extra in (
        (True, {"key_mask": jnp.asarray(mask)}),
        (False, {"key_mask": jnp.asarray(mask)}),
        (True, {"segment_ids": jnp.asarray(segments)}),
    ):
        kw = {**gate_kwargs(causal, g, g_after), **extra}
        ref = attention(q, k, v, "alibi", causal=causal, **kw)
        out = sharded(mesh, seq_axis, head_axis, order, "alibi", causal)(q, k, v, **kw)
        assert err(out, ref) < TOL, (causal, list(extra))


def test_precision_of_near_pairs_far_from_the_start(devices):
    """Gates of about -0.5 over 1024 tokens: the cumulative sum reaches -512, where float32
    steps are 6e-5, so a bias taken as the difference of two cumulative sums would be off
    by ~1e-5 for the near pairs that carry the softmax. Sharded, every pair's bias is a
    sum of one-signed local sums: the output is as close to float64 as one device's
    (1.5e-6; the difference of cumulative sums: 1.6e-5)."""
    length = 1024
    rng = np.random.default_rng(4)
    g = -rng.uniform(0.4, 0.6, (1, length, 1))
    q = np.zeros((1, length, 1, 8))  # scores = the gate bias alone
    v = rng.normal(size=(1, length, 1, 8))
    with jax.enable_x64():
        ref = np.asarray(attention(*(jnp.asarray(t) for t in (q, q, v)), causal=True,
                                   log_gates=jnp.asarray(g)))  # fmt: skip
    q32, v32, g32 = (jnp.asarray(t, jnp.float32) for t in (q, v, g))
    mesh, seq_axis, head_axis = mesh_of(devices, "seq4")
    for order in ("contiguous", "zigzag"):
        out = sharded(mesh, seq_axis, head_axis, order, None, True)(q32, q32, v32, log_gates=g32)
        assert float(np.max(np.abs(np.asarray(out) - ref))) < 4e-6, order


def test_gate_errors(devices):
    q, k, v, g, g_after = inputs()
    mesh, _, _ = mesh_of(devices, "seq4")
    run = lambda **kw: sharded_attention(q, k, v, mesh=mesh, seq_axis="seq", **kw)  # noqa: E731
    with pytest.raises(posbias.InvalidArgumentError, match=r"must be log-gates <= 0"):
        run(causal=True, log_gates=-g)
    with pytest.raises(posbias.InvalidArgumentError, match=r"shape \(B, Lk, H\)"):
        run(causal=True, log_gates=g[:, :, :2])
    with pytest.raises(posbias.InvalidArgumentError, match="needs log_gates_after"):
        run(causal=False, log_gates=g)
    with pytest.raises(posbias.InvalidArgumentError, match="causal=True hides"):
        run(causal=True, log_gates=g, log_gates_after=g_after)
    with pytest.raises(posbias.InvalidArgumentError, match="decoding against a sequence-sharded"):
        sharded_attention(q[:, -2:], k, v, mesh=mesh, seq_axis="seq", causal=True, log_gates=g)
    segments = np.repeat([[0] * 16 + [1] * 16 + [0] * 32], B, axis=0)
    with pytest.raises(posbias.InvalidArgumentError, match="contiguous run"):
        run(causal=True, log_gates=g, segment_ids=segments)
    # contiguous in sequence order, not in zigzag array order: accepted
    natural = np.repeat([[0] * 40 + [1] * 24], B, axis=0)
    out = sharded_attention(*(zigzag(t, 4) for t in (q, k, v)), mesh=mesh, seq_axis="seq",
                            causal=True, order="zigzag", log_gates=zigzag(g, 4),
                            segment_ids=zigzag(natural, 4))  # fmt: skip
    ref = attention(q, k, v, causal=True, log_gates=g, segment_ids=natural)
    assert err(unzigzag(out, 4), ref) < TOL


@pytest.mark.parametrize("order", ["contiguous", "zigzag"])
@pytest.mark.parametrize("argnums", [(1, 2), (0, 1, 2)], ids=["g_ga", "q_g_ga"])
def test_bidirectional_packed_gradients_of_both_gate_sets(devices, order, argnums):
    """causal=False with segment_ids, differentiating log_gates and log_gates_after together
    (and q): once NaN in the gradient of log_gates_after at a few slots under jit, because
    the softmax shift max(scores) was differentiated (reduce_max's rule compares a recomputed
    copy of the scores with the max and divides by the count of equal entries)."""
    batch, heads = 2, 2  # the failing case: B > 1 and H > 1, plain multi-head attention
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, L, heads, D)), jnp.float32) for _ in "qkv")
    g, g_after = (jnp.asarray(-rng.uniform(0.0, 0.5, (batch, L, heads)), jnp.float32) for _ in "gG")
    segments = np.zeros((batch, L), np.int32)
    segments[1, 20:] = 1
    segments[1, 50:] = 2
    seg = jnp.asarray(segments)
    mesh, seq_axis, head_axis = mesh_of(devices, "seq4")
    call = sharded(mesh, seq_axis, head_axis, order, None, False)

    def loss_ref(q, g, g_after):
        out = attention(q, k, v, causal=False, log_gates=g, log_gates_after=g_after,
                        segment_ids=seg)  # fmt: skip
        return jnp.sum(out**2)

    def loss(q, g, g_after):
        return jnp.sum(call(q, k, v, log_gates=g, log_gates_after=g_after, segment_ids=seg) ** 2)

    expected = jax.grad(loss_ref, argnums)(q, g, g_after)
    got = jax.jit(jax.grad(loss, argnums))(q, g, g_after)
    for e, x in zip(expected, got, strict=True):
        assert bool(jnp.all(jnp.isfinite(x)))
        assert err(x, e) < TOL * max(1.0, float(jnp.max(jnp.abs(e))))
