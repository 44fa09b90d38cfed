"""``attention(..., dropout_p=, dropout_rng=)``: attention dropout on every framework.

With ``q = k = 0`` every probability is ``1/Lk`` and with ``v`` the identity
each output row *is* its row of dropped probabilities, so the fraction
dropped and the ``1 / (1 - p)`` scale are read off the output; the mean
over many seeds is the output without dropout; a seed reproduces the mask;
``dropout_p = 0`` is the deterministic path; wrong rates and generators are
errors naming them.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_fast_attention import LAYOUT, _module

from conftest import FRAMEWORKS, native, to_np
from posbias.errors import InvalidArgumentError, InvalidTypeError

B, H, L = 2, 4, 32


def _seed(backend, seed):
    """An RNG of ``backend``'s idiom (JAX: a key)."""
    if backend == "jax":
        import jax

        return jax.random.key(seed)
    return seed


def _run(backend, q, k, v, **kwargs):
    args = [t if LAYOUT[backend] == "bhld" else np.swapaxes(t, 1, 2) for t in (q, k, v)]
    args = [native(backend, t.astype(np.float32)) for t in args]
    out = to_np(_module(backend).attention(*args, "alibi", **kwargs)).astype(np.float64)
    return out if LAYOUT[backend] == "bhld" else np.swapaxes(out, 1, 2)


def _probes():
    q = k = np.zeros((B, H, L, L))
    v = np.broadcast_to(np.eye(L), (B, H, L, L)).copy()
    return q, k, v


def test_dropout_drops_the_rate_and_scales_the_rest(backend):
    rate = 0.25
    q, k, v = _probes()
    probs = _run(backend, q, k, v)  # softmax of the bias alone: out = probabilities
    out = _run(backend, q, k, v, dropout_p=rate, dropout_rng=_seed(backend, 0))
    dropped = float(np.mean(out == 0))
    assert abs(dropped - rate) < 0.03, dropped  # 8192 draws: sigma 0.005
    kept = out != 0
    np.testing.assert_allclose(out[kept], probs[kept] / (1 - rate), rtol=2e-6)


def test_dropout_keeps_the_mean(backend):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 2, 8, 8)) for _ in range(3))
    plain = _run(backend, q, k, v)
    outs = [
        _run(backend, q, k, v, dropout_p=0.3, dropout_rng=_seed(backend, s)) for s in range(300)
    ]
    err = np.abs(np.mean(outs, 0) - plain).max() / np.abs(plain).max()
    assert err < 0.1, err


def test_dropout_is_reproducible_and_off_at_zero(backend):
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(1, 2, 8, 8)) for _ in range(3))
    a, b, c = (
        _run(backend, q, k, v, dropout_p=0.5, dropout_rng=_seed(backend, s)) for s in (7, 7, 8)
    )
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(_run(backend, q, k, v, dropout_p=0.0), _run(backend, q, k, v))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dropout_p=1.0), InvalidArgumentError, r"dropout_p must be a probability in \[0, 1\)"),
        (dict(dropout_p=-0.1), InvalidArgumentError, "dropout_p must be >= 0"),
        (dict(dropout_p="0.1"), InvalidTypeError, "dropout_p must be a real number"),
        (dict(dropout_p=True), InvalidTypeError, "dropout_p must be a real number"),
        (dict(dropout_p=0.1, dropout_rng="seed"), InvalidTypeError, "dropout_rng must be"),
        (dict(dropout_p=0.1, dropout_rng=-1), InvalidArgumentError, r"in \[0, 2\*\*32\)"),
        (dict(dropout_p=0.1, dropout_rng=2**70), InvalidArgumentError, r"in \[0, 2\*\*32\)"),
        (dict(dropout_p=0.0, dropout_rng="seed"), InvalidTypeError, "dropout_rng must be"),
        (dict(dropout_p=0.1, implementation="blockwise"), InvalidArgumentError, "materialised"),
    ],
    ids=[
        "one",
        "negative",
        "string",
        "bool",
        "rng string",
        "rng negative",
        "rng too large",
        "rng checked unused",
        "implementation",
    ],
)
def test_bad_dropout_arguments_are_errors_that_name_them(backend, kwargs, error, match):
    q, k, v = _probes()
    if "dropout_rng" not in kwargs and backend == "jax":
        kwargs = {**kwargs, "dropout_rng": _seed(backend, 0)}
    with pytest.raises(error, match=match):
        _run(backend, q, k, v, **kwargs)


def test_jax_dropout_needs_a_key_and_works_under_jit_and_grad():
    jax = pytest.importorskip("jax")
    from conftest import FRAMEWORKS

    if "jax" not in FRAMEWORKS:
        pytest.skip("jax not under test")
    import jax.numpy as jnp

    pbj = _module("jax")
    x = jnp.ones((1, 6, 2, 8))
    with pytest.raises(InvalidTypeError, match=r"jax\.random\.key"):
        pbj.attention(x, x, x, dropout_p=0.1)

    def loss(q, key):
        return (pbj.attention(q, x, x, "alibi", dropout_p=0.2, dropout_rng=key) ** 2).sum()

    key = jax.random.key(0)
    grad = jax.jit(jax.grad(loss))(x, key)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_allclose(jax.jit(loss)(x, key), loss(x, key), rtol=1e-6)


def test_layer_dropout_configuration_errors():
    """numpy's reference layer has no dropout; Flax rngs need a dropout stream."""
    import posbias.numpy as pnp

    with pytest.raises(InvalidTypeError, match="has no dropout"):
        pnp.MultiHeadAttention(16, 2, dropout=0.1)
    if "jax" not in FRAMEWORKS:
        return
    from flax import nnx

    import posbias.jax as pj

    with pytest.raises(InvalidArgumentError, match="no 'dropout'"):
        pj.MultiHeadAttention(16, 2, dropout_rate=0.3, rngs=nnx.Rngs(params=1))
    layer = pj.MultiHeadAttention(16, 2, dropout_rate=0.3)
    with pytest.raises(InvalidTypeError, match=r"rngs must be an nnx\.Rngs"):
        layer(np.ones((1, 4, 16), np.float32), rngs=0)
