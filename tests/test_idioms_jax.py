"""JAX / Flax NNX idioms: nnx.jit, jax.jit with split/merge, grad, vmap; jax.nn truth."""

import numpy as np
import pytest

import posbias
from conftest import BACKENDS

if "jax" not in BACKENDS:
    pytest.skip("jax not under test", allow_module_level=True)

import jax
import jax.numpy as jnp
from flax import nnx

from posbias.jax import MultiHeadAttention, attention


@pytest.fixture(scope="module")
def mha():
    return MultiHeadAttention(32, 4, causal=True, num_kv_heads=2, seed=1)


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(0), (2, 6, 32))


def test_nnx_jit_and_decoding_under_jit(mha, x):
    full = mha(x)
    np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(mha, x), full, rtol=1e-5, atol=1e-6)
    step = nnx.jit(lambda m, t, c: m(t, cache=c))
    cache = mha.init_cache(2, 8)
    y1, cache = step(mha, x[:, :4], cache)
    y2, cache = step(mha, x[:, 4:5], cache)
    y3, cache = step(mha, x[:, 5:], cache)
    np.testing.assert_allclose(jnp.concatenate([y1, y2, y3], 1), full, rtol=1e-5, atol=1e-6)


def test_split_merge_and_jax_jit(mha, x):
    graphdef, state = nnx.split(mha)

    @jax.jit
    def forward(state, t):
        return nnx.merge(graphdef, state)(t)

    np.testing.assert_allclose(forward(state, x), mha(x), rtol=1e-5, atol=1e-6)


def test_grad_over_parameters_and_inputs(mha, x):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(mha)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
    gx = jax.grad(lambda t: jnp.sum(mha(t) ** 2))(x)
    assert gx.shape == x.shape and bool(jnp.abs(gx).sum() > 0)


def test_vmap(mha, x):
    out = jax.vmap(lambda row: mha(row[None])[0])(x)
    np.testing.assert_allclose(out, mha(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_jax_nn_dot_product_attention(causal):
    """External truth: jax.nn.dot_product_attention with the same bias= agrees."""
    key = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(key[0], (2, 7, 12, 16))
    k = jax.random.normal(key[1], (2, 7, 4, 16))
    v = jax.random.normal(key[2], (2, 7, 4, 16))
    spec = posbias.get("alibi", num_heads=12)
    bias = spec.bias(q_len=7, k_len=7, backend="jax")[None]
    with jax.default_matmul_precision("highest"):  # JAX's GPU default is TF32
        expected = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal)
    out = attention(q, k, v, spec, causal=causal)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
