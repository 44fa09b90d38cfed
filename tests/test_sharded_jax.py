"""posbias.jax.sharded_attention on 4 virtual CPU devices equals single-device attention.

The root conftest starts JAX with 4 CPU devices. Every case compares the
sharded result (under ``jax.jit``) with :func:`posbias.jax.attention` on one
device: outputs, gradients of q/k/v and of a learnable bias's parameters.
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
from flax import nnx
from jax.sharding import Mesh

from posbias.jax import PositionalBias, attention, sharded_attention, unzigzag, zigzag

B, L, H, D = 2, 16, 4, 8
TOL = 2e-6


@pytest.fixture(scope="module")
def devices():
    devices = jax.devices()
    assert len(devices) >= 4, (
        "these tests need 4 JAX devices; the root conftest sets "
        "XLA_FLAGS=--xla_force_host_platform_device_count=4 before JAX starts"
    )
    return np.array(devices[:4])


@pytest.fixture(scope="module")
def meshes(devices):
    return {
        "seq4": (Mesh(devices, ("seq",)), "seq", None),
        "seq2xhead2": (Mesh(devices.reshape(2, 2), ("seq", "head")), "seq", "head"),
        "head4": (Mesh(devices, ("head",)), None, "head"),
    }


def qkv(kv_heads: int = H, length: int = L, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, length, H, D))
    k, v = rng.normal(size=(2, B, length, kv_heads, D))
    return tuple(jnp.asarray(t, jnp.float32) for t in (q, k, v))


def run(mesh_name, meshes, q, k, v, bias, **options):
    mesh, seq_axis, head_axis = meshes[mesh_name]

    @jax.jit
    def fn(q, k, v):
        return sharded_attention(
            q, k, v, bias, mesh=mesh, seq_axis=seq_axis, head_axis=head_axis, **options
        )

    return fn(q, k, v)


def err(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)))


@pytest.mark.parametrize("bias", ["alibi", "t5", "kerple_log", None])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["seq4", "zigzag4", "seq2xhead2", "head4", "positions"])
def test_forward_equals_single_device(meshes, bias, causal, layout):
    q, k, v = qkv(kv_heads=2)  # grouped-query attention throughout
    ref = attention(q, k, v, bias, causal=causal)
    if layout == "zigzag4":
        out = run("seq4", meshes, *(zigzag(t, 4) for t in (q, k, v)), bias,
                  causal=causal, order="zigzag")  # fmt: skip
        out = unzigzag(out, 4)
    elif layout == "positions":  # explicit bias positions: shuffled, the slots stay in order
        if bias is None:
            pytest.skip("positions set the bias only; bias=None takes none")
        perm = np.random.default_rng(1).permutation(L)
        ref = attention(q, k, v, bias, causal=causal, q_pos=perm, k_pos=perm)
        out = run("seq4", meshes, q, k, v, bias, causal=causal, q_pos=perm, k_pos=perm)
    else:
        out = run(layout, meshes, q, k, v, bias, causal=causal)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert err(out, ref) < TOL


def test_output_keeps_the_input_sharding(meshes):
    mesh, _, _ = meshes["seq2xhead2"]
    q, k, v = qkv()
    out = run("seq2xhead2", meshes, q, k, v, "alibi", causal=True)
    expected = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "seq", "head"))
    assert out.sharding.is_equivalent_to(expected, out.ndim)


def test_zigzag_balances_causal_work():
    """Tiles each device computes under causal masking: equal under zigzag."""
    from posbias._core import layouts as _ring

    def work(order):
        counts = []
        for me in range(4):
            pairs = [
                (a, b)
                for step in range(4)
                for a in _ring.chunk_ids(order, 4, me)
                for b in _ring.chunk_ids(order, 4, (me - step) % 4)
            ]
            counts.append(sum(_ring.relation(a, b) != _ring.HIDDEN for a, b in pairs))
        return counts

    assert work("contiguous") == [1, 2, 3, 4]  # tiles of L/4 rows
    assert work("zigzag") == [9, 9, 9, 9]  # tiles of L/8 rows: 9/4 of a contiguous tile


def test_gradients_equal_single_device(meshes):
    q, k, v = qkv(kv_heads=2)

    def loss_ref(q, k, v):
        return jnp.sum(attention(q, k, v, "alibi", causal=True) ** 2)

    mesh, seq_axis, head_axis = meshes["seq2xhead2"]

    def loss(q, k, v):
        out = sharded_attention(q, k, v, "alibi", mesh=mesh, seq_axis=seq_axis,
                                head_axis=head_axis, causal=True, order="zigzag")  # fmt: skip
        return jnp.sum(unzigzag(out, 2) ** 2)

    expected = jax.grad(loss_ref, argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(zigzag(t, 2) for t in (q, k, v)))
    for g, e in zip(got, expected, strict=True):
        assert err(unzigzag(g, 2), e) < 1e-5


@pytest.mark.parametrize("name", ["t5", "kerple_log"])
def test_learnable_bias_parameter_gradients(meshes, name):
    """A PositionalBias module's parameters get the single-device gradient (summed over devices)."""
    q, k, v = qkv()
    module = PositionalBias(name, num_heads=H, seed=3)
    mesh, seq_axis, head_axis = meshes["seq2xhead2"]

    def loss_ref(m):
        return jnp.sum(attention(q, k, v, m, causal=True) ** 2)

    def loss(m):
        out = sharded_attention(q, k, v, m, mesh=mesh, seq_axis=seq_axis,
                                head_axis=head_axis, causal=True)  # fmt: skip
        return jnp.sum(out**2)

    expected = jax.tree.leaves(nnx.grad(loss_ref)(module))
    got = jax.tree.leaves(nnx.jit(nnx.grad(loss))(module))
    assert expected and len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert float(jnp.max(jnp.abs(e))) > 0
        assert err(g, e) < 1e-5 * max(1.0, float(jnp.max(jnp.abs(e))))


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("bias", ["alibi", "t5"])
def test_decoding_against_a_sharded_kv_cache(meshes, q_len, bias):
    q, k, v = qkv(kv_heads=2)
    q = q[:, -q_len:]
    ref = attention(q, k, v, bias, causal=True)
    out = run("seq2xhead2", meshes, q, k, v, bias, causal=True)
    assert err(out, ref) < TOL


def test_packed_documents(meshes):
    """segment_ids with per-document positions, sequence split over 4 devices."""
    q, k, v = qkv()
    segment_ids = np.repeat([[0] * 5 + [1] * 7 + [2] * 4], B, axis=0)
    positions = np.concatenate([np.arange(5), np.arange(7), np.arange(4)])
    ref = attention(q, k, v, "alibi", causal=True, segment_ids=segment_ids,
                    q_pos=positions, k_pos=positions)  # fmt: skip
    out = run("seq4", meshes, q, k, v, "alibi", causal=True, segment_ids=segment_ids,
              q_pos=positions, k_pos=positions)  # fmt: skip
    assert err(out, ref) < TOL


def test_bfloat16_inputs(meshes):
    q, k, v = (t.astype(jnp.bfloat16) for t in qkv())
    ref = attention(q, k, v, "alibi", causal=True)
    out = run("seq2xhead2", meshes, q, k, v, "alibi", causal=True)
    assert out.dtype == jnp.bfloat16
    assert err(out.astype(jnp.float32), ref.astype(jnp.float32)) <= 1 / 64


# ------------------------------------------------------------------ bad input
def test_bad_input_errors(meshes):
    mesh, _, _ = meshes["seq2xhead2"]
    q, k, v = qkv()
    with pytest.raises(posbias.InvalidArgumentError, match="not an axis of the mesh"):
        sharded_attention(q, k, v, "alibi", mesh=mesh, seq_axis="sequence")
    with pytest.raises(posbias.InvalidArgumentError, match="does not split into 4 equal"):
        q6, k6, v6 = qkv(length=6)
        sharded_attention(q6, k6, v6, "alibi", mesh=mesh, seq_axis="seq", order="zigzag")
    with pytest.raises(posbias.InvalidArgumentError, match="do not split over the 4 devices"):
        mesh4, _, _ = meshes["head4"]
        q6 = jnp.ones((B, L, 6, D))
        sharded_attention(q6, q6, q6, "alibi", mesh=mesh4, head_axis="head")
    with pytest.raises(posbias.InvalidTypeError, match=r"jax\.sharding\.Mesh"):
        sharded_attention(q, k, v, "alibi", mesh="seq", seq_axis="seq")
    with pytest.raises(posbias.InvalidArgumentError, match="both"):
        sharded_attention(q, k, v, "alibi", mesh=mesh, seq_axis="seq", head_axis="seq")
    with pytest.raises(posbias.InvalidArgumentError, match="has 8 heads but the queries have 4"):
        sharded_attention(q, k, v, posbias.get("alibi", num_heads=8), mesh=mesh, seq_axis="seq")
    with pytest.raises(posbias.InvalidArgumentError, match="order must be one of"):
        sharded_attention(q, k, v, "alibi", mesh=mesh, seq_axis="seq", order="striped")
    with pytest.raises(posbias.InvalidArgumentError, match="2-D or callable"):
        sharded_attention(q, k, v, posbias.get("alibi_2d", num_heads=H, grid=(4, 4)),
                          mesh=mesh, seq_axis="seq")  # fmt: skip
    with pytest.raises(posbias.InvalidArgumentError, match="shape"):
        sharded_attention(q, k, v, "alibi", mesh=mesh, seq_axis="seq",
                          q_pos=np.arange(L - 1), k_pos=np.arange(L - 1))  # fmt: skip


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ring_sends_exactly_the_key_value_blocks(dtype):
    """Bytes in the compiled program's collective-permutes = (n-1) un-repeated K/V blocks."""
    from posbias import comm

    shapes = dict(batch=1, heads=4, kv_heads=2, dim=8, dtype=dtype)
    measured = comm.measure_jax_ring(64, 4, **shapes)
    expected = comm.closed_forms(64, 4, **shapes)
    assert measured == expected.ring == 3 * expected.ring_per_step
    assert expected.ratio > 5


def test_explicit_sharding_mesh_and_zigzag_helpers(devices):
    """jax.make_mesh gives explicit-sharding axes: inputs are resharded, helpers still work."""
    mesh = jax.make_mesh((2, 2), ("seq", "head"), devices=list(devices))
    q, k, v = qkv()
    ref = attention(q, k, v, "t5", causal=True)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "seq", "head"))
    placed = [jax.device_put(zigzag(t, 2), spec) for t in (q, k, v)]

    @jax.jit
    def fn(q, k, v):
        return sharded_attention(q, k, v, "t5", mesh=mesh, seq_axis="seq", head_axis="head",
                                 causal=True, order="zigzag")  # fmt: skip

    out = fn(*placed)
    assert out.sharding.is_equivalent_to(spec, 4)
    assert err(unzigzag(out, 2), ref) < TOL


def test_checkpointed_tiles_need_less_backward_memory(meshes):
    """checkpoint_tiles recomputes scores in the backward pass: less XLA temp memory."""
    from posbias.comm import backward_temp_bytes

    mesh, _, _ = meshes["seq4"]
    temp = {
        flag: backward_temp_bytes(mesh, 512, heads=4, dim=32, checkpoint_tiles=flag)
        for flag in (True, False)
    }
    assert temp[True] < 0.75 * temp[False], temp


@pytest.mark.parametrize("layout", ["seq4", "zigzag4", "seq2xhead2"])
def test_key_mask(meshes, layout):
    """Right-padded batch (bidirectional): padded keys hidden, positions from the layout."""
    q, k, v = qkv(kv_heads=2)
    mask = np.ones((B, L), bool)
    mask[0, -5:] = False
    pos = np.arange(L)
    ref = attention(q, k, v, "alibi", key_mask=mask, q_pos=pos, k_pos=pos)
    if layout == "zigzag4":
        out = run("seq4", meshes, *(zigzag(t, 4) for t in (q, k, v)), "alibi",
                  key_mask=zigzag(jnp.asarray(mask), 4), order="zigzag")  # fmt: skip
        out = unzigzag(out, 4)
    else:
        out = run(layout, meshes, q, k, v, "alibi", key_mask=mask)
    assert err(out, ref) < TOL


def test_decoding_with_empty_cache_slots(meshes):
    """A sharded KV cache whose last slots are not filled yet (valid mask), explicit positions."""
    q, k, v = qkv()
    valid = np.ones((B, L), bool)
    valid[:, 11:] = False  # 11 tokens cached; the new token sits at position 11
    q_new, q_pos, k_pos = q[:, :1], np.array([11]), np.arange(L)
    ref = attention(q_new, k, v, "t5", causal=True, key_mask=valid, q_pos=q_pos,
                    k_pos=k_pos, q_offset=11)  # fmt: skip
    out = run("seq2xhead2", meshes, q_new, k, v, "t5", causal=True, key_mask=valid,
              q_pos=q_pos, k_pos=k_pos)  # fmt: skip
    assert err(out, ref) < TOL


@pytest.mark.parametrize("layout", ["seq4", "zigzag4", "seq2xhead2"])
def test_key_mask_means_the_same_as_on_one_device(meshes, layout):
    """Left padding, a bias that is not shift-invariant (alibi_scaled), causal: the bias
    positions are the global cumsum(key_mask) - 1 on every device, as on one device."""
    q, k, v = qkv(kv_heads=2)
    mask = np.ones((B, L), bool)
    mask[0, :5] = False
    mask[1, :2] = False
    scaled = posbias.get("alibi_scaled", num_heads=H, train_length=4)
    ref = attention(q, k, v, scaled, causal=True, key_mask=mask)
    if layout == "zigzag4":
        out = run("seq4", meshes, *(zigzag(t, 4) for t in (q, k, v)), scaled, causal=True,
                  key_mask=zigzag(jnp.asarray(mask), 4), order="zigzag")  # fmt: skip
        out = unzigzag(out, 4)
    else:
        out = run(layout, meshes, q, k, v, scaled, causal=True, key_mask=mask)
    assert err(out, ref) < TOL


@pytest.mark.parametrize("order", ["contiguous", "zigzag"])
def test_decoding_with_cache_holes_takes_positions_from_the_mask(meshes, order):
    q, k, v = qkv()
    hole = np.ones((B, L), bool)
    hole[0, 3:6] = False
    hole[1, 9] = False
    scaled = posbias.get("alibi_scaled", num_heads=H, train_length=4)
    ref = attention(q[:, -2:], k, v, scaled, causal=True, key_mask=hole)
    if order == "zigzag":
        k, v = (zigzag(t, 4) for t in (k, v))
        hole = zigzag(jnp.asarray(hole), 4)
    out = run("seq4", meshes, q[:, -2:], k, v, scaled, causal=True, key_mask=hole, order=order)
    assert err(out, ref) < TOL


def test_key_padding_mask_is_an_error_naming_key_mask(meshes):
    q, k, v = qkv()
    mesh, _, _ = meshes["seq4"]
    with pytest.raises(posbias.InvalidTypeError, match="key_mask=~key_padding_mask"):
        sharded_attention(q, k, v, "alibi", mesh=mesh, seq_axis="seq",
                          key_padding_mask=np.ones((B, L), bool))  # fmt: skip


def test_segments_with_a_non_toeplitz_bias_need_positions(meshes):
    q, k, v = qkv()
    mesh, _, _ = meshes["seq4"]
    segments = np.repeat(np.arange(2), L // 2)[None].repeat(B, 0)
    with pytest.raises(posbias.InvalidArgumentError, match="per-document"):
        sharded_attention(q, k, v, "alibi_scaled", mesh=mesh, seq_axis="seq",
                          segment_ids=segments)  # fmt: skip


def test_zigzag_inside_jit_on_a_sequence_sharded_array(devices):
    """An explicitly sharded array raised a raw ShardingTypeError inside jax.jit."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("seq",), devices=list(devices))
    x = jax.device_put(jnp.arange(2 * 16.0).reshape(2, 16), NamedSharding(mesh, P(None, "seq")))
    there = jax.jit(lambda x: zigzag(x, 4))(x)
    np.testing.assert_array_equal(np.asarray(there), np.asarray(zigzag(np.asarray(x), 4)))
    back = jax.jit(lambda x: unzigzag(zigzag(x, 4), 4))(x)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
    assert back.sharding.is_equivalent_to(x.sharding, 2)
