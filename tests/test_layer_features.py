"""MultiHeadAttention features: cross-attention and ``attn_mask`` on every framework's layer.

Each framework's layer, loaded with the NumPy reference layer's portable
weights, against that reference (float64); the call idioms (torch/NumPy
``(x, key, value)``, Flax ``(x, inputs_k, inputs_v)``, TensorFlow ``value=`` /
``key=``); the bias alignment of cross-attention (bottom-right); and the wrong
inputs the shared layer code rejects.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FRAMEWORKS
from posbias import numpy as pnp
from posbias.backends import load
from posbias.errors import InvalidArgumentError, InvalidTypeError
from posbias.testing import _layers as lp

pytestmark = pytest.mark.skipif(not FRAMEWORKS, reason="no framework under test")

E, H, KV = 24, 4, 2
KEY_NAME = {"torch": "key", "jax": "inputs_k", "tensorflow": "key"}
VALUE_NAME = {"torch": "value", "jax": "inputs_v", "tensorflow": "value"}


@pytest.fixture(params=FRAMEWORKS)
def fw(request):
    """(framework module, backend adapter) for each framework under test."""
    return lp.framework_module(request.param), load(request.param)()


def _pair(module, bias="t5", causal=True, **kwargs):
    ref = pnp.MultiHeadAttention(E, H, bias, causal=causal, num_kv_heads=KV, seed=1, **kwargs)
    layer = module.MultiHeadAttention(E, H, bias, causal=causal, num_kv_heads=KV, **kwargs)
    layer.load_portable_weights(ref.portable_weights())
    return layer, ref


def _x(batch=2, length=5, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, length, E)).astype(np.float32)


def _error(x, ref):
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.mark.parametrize("bias", ["alibi", "t5", "fire"])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_with_separate_key_and_value_equals_the_reference(fw, bias, causal):
    module, xp = fw
    layer, ref = _pair(module, bias, causal)
    x, key, value = _x(), _x(length=8, seed=1), _x(length=8, seed=2)
    names = {KEY_NAME[xp.name]: xp.from_numpy(key), VALUE_NAME[xp.name]: xp.from_numpy(value)}
    out = xp.to_numpy(layer(xp.from_numpy(x), **names))
    assert _error(out, ref(x, key, value)) <= 1e-5


def test_cross_attention_defaults_follow_each_framework(fw):
    """torch/Flax: a missing value is the key; TensorFlow (Keras): a missing key is the value."""
    module, xp = fw
    layer, ref = _pair(module)
    x, kv = _x(), _x(length=8, seed=1)
    one = {"tensorflow": "value"}.get(xp.name, KEY_NAME[xp.name])
    out = xp.to_numpy(layer(xp.from_numpy(x), **{one: xp.from_numpy(kv)}))
    np.testing.assert_allclose(out, ref(x, kv, kv), atol=1e-5)
    np.testing.assert_allclose(out, ref(x, kv), atol=1e-5)
    same = xp.to_numpy(layer(xp.from_numpy(x), **{one: xp.from_numpy(x)}))
    np.testing.assert_allclose(same, xp.to_numpy(layer(xp.from_numpy(x))), atol=1e-6)


def test_cross_attention_bias_is_aligned_bottom_right():
    """The last query sits at the last key: a query of length 1 equals the last row."""
    layer = pnp.MultiHeadAttention(E, H, "alibi", causal=True, seed=1)
    x = _x(length=8)
    np.testing.assert_allclose(layer(x[:, -1:], x)[:, 0], layer(x)[:, -1], atol=1e-12)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_layer_attn_mask_equals_the_reference(fw, kind):
    module, xp = fw
    layer, ref = _pair(module, causal=False)
    x, kv = _x(), _x(length=8, seed=1)
    rng = np.random.default_rng(3)
    mask = rng.random((2, 1, 5, 8)) > 0.3
    if kind == "additive":
        mask = np.where(mask, rng.normal(size=mask.shape), -np.inf).astype(np.float32)
    out = xp.to_numpy(lp.cross_attention(layer, xp.name, *map(xp.from_numpy, (x, kv, mask))))
    assert _error(out, ref(x, kv, attn_mask=mask)) <= 1e-5
    self_out = xp.to_numpy(layer(xp.from_numpy(x), attn_mask=xp.from_numpy(mask[..., :5])))
    assert _error(self_out, ref(x, attn_mask=mask[..., :5])) <= 1e-5


def test_numpy_layer_attn_mask_is_the_attention_mask():
    """Through the layer, a mask of the causal pattern equals causal=True."""
    layer = pnp.MultiHeadAttention(E, H, "alibi", causal=False, seed=1)
    causal = pnp.MultiHeadAttention(E, H, "alibi", causal=True, seed=1)
    x = _x()
    np.testing.assert_allclose(
        layer(x, attn_mask=np.tril(np.ones((5, 5), bool))), causal(x), atol=1e-12
    )


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (dict(key=_x(length=8)[..., :10]), InvalidArgumentError, r"key must have shape"),
        (dict(key=_x(batch=3, length=8)), InvalidArgumentError, "query input's batch size 2"),
        (dict(key=_x(length=8).astype(np.float64)), InvalidTypeError, "key must be a floating"),
        (dict(key=_x(length=8), value=_x(length=6)), InvalidArgumentError, "same length"),
        (
            dict(key=_x(length=8), value=_x(length=8).astype(np.int32)),
            InvalidTypeError,
            "value must be a float",
        ),
        (dict(attn_mask=np.ones((2, 1, 5, 6), bool)), InvalidArgumentError, "attn_mask must"),
        (dict(attn_mask=np.ones((5, 5), np.int64)), InvalidTypeError, "attn_mask must be boolean"),
        (dict(mask=np.ones((5, 5), bool)), InvalidTypeError, r"Did you mean .*attn_mask"),
    ],
    ids=["embed", "batch", "dtype", "lengths", "int value", "mask shape", "mask dtype", "mask="],
)
def test_wrong_layer_inputs_are_errors_that_name_them(fw, inputs, error, match):
    module, xp = fw
    if match.startswith("key must be a floating") and xp.name != "torch":
        pytest.skip("JAX (no x64) and Keras (autocast) make a float64 input float32 first")
    layer, _ = _pair(module)
    names = {"key": KEY_NAME[xp.name], "value": VALUE_NAME[xp.name]}
    kwargs = {names.get(n, n): xp.from_numpy(a) for n, a in inputs.items()}
    with pytest.raises(error, match=match):
        layer(xp.from_numpy(_x()), **kwargs)


def test_cross_attention_with_a_cache_is_an_error(fw):
    module, xp = fw
    layer, _ = _pair(module)
    cache = layer.init_cache(batch_size=2, capacity=8)
    kv = {"tensorflow": "value"}.get(xp.name, KEY_NAME[xp.name])
    with pytest.raises(InvalidArgumentError, match="KV-cache decoding is self-attention"):
        layer(xp.from_numpy(_x()), cache=cache, **{kv: xp.from_numpy(_x(length=8))})


# ------------------------------------------------------------- attention weights
WEIGHTS_NAME = {
    "torch": "need_weights",
    "jax": "sow_weights",
    "tensorflow": "return_attention_scores",
}


def _with_weights(layer, xp, *args, **kwargs):
    """``(out, weights, *cache)`` as NumPy/native, in each framework's idiom."""
    if xp.name != "jax":
        return layer(*args, **{WEIGHTS_NAME[xp.name]: True}, **kwargs)
    from flax import nnx

    result, sown = nnx.capture(layer, nnx.Intermediate)(*args, sow_weights=True, **kwargs)
    (weights,) = sown["attention_weights"]
    out, *cache = result if isinstance(result, tuple) else (result,)
    return (out, weights, *cache)


@pytest.mark.parametrize("bias", ["alibi", "fire"])
def test_attention_weights_equal_the_reference_layers(fw, bias):
    module, xp = fw
    layer, ref = _pair(module, bias)
    x, kv = _x(), _x(length=8, seed=1)
    mask = np.random.default_rng(4).random((2, 1, 5, 8)) > 0.3
    mask[0, 0, 0] = False  # a fully hidden row: weights 0
    kv_name = {"tensorflow": "value"}.get(xp.name, KEY_NAME[xp.name])
    args = {kv_name: xp.from_numpy(kv), "attn_mask": xp.from_numpy(mask)}
    out, weights = _with_weights(layer, xp, xp.from_numpy(x), **args)
    ref_out, ref_weights = ref(x, kv, attn_mask=mask, need_weights=True)
    weights = xp.to_numpy(weights)
    assert weights.shape == (2, H, 5, 8)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6)
    np.testing.assert_allclose(xp.to_numpy(out), ref_out, atol=1e-5)
    np.testing.assert_allclose(
        xp.to_numpy(out), xp.to_numpy(layer(xp.from_numpy(x), **args)), atol=1e-6
    )
    sums = ref_weights.sum(-1)
    np.testing.assert_allclose(sums[1], 1.0, atol=1e-12)
    assert np.all(ref_weights[0, :, 0] == 0) and np.all(weights[0, :, 0] == 0)


def test_attention_weights_with_a_cache_come_before_the_cache(fw):
    module, xp = fw
    layer, ref = _pair(module)
    x = _x()
    cache = layer.init_cache(batch_size=2, capacity=8)
    out, weights, cache = _with_weights(layer, xp, xp.from_numpy(x), cache=cache)
    assert xp.shape(out) == (2, 5, E)
    assert isinstance(cache, type(layer.init_cache(batch_size=2, capacity=8)))
    _, ref_weights = ref(x, need_weights=True)
    np.testing.assert_allclose(xp.to_numpy(weights)[..., :5], ref_weights, atol=1e-6)
    assert np.all(xp.to_numpy(weights)[..., 5:] == 0)  # empty cache slots


def test_numpy_layer_weights_reproduce_the_output():
    layer = pnp.MultiHeadAttention(E, H, "t5", causal=True, seed=2)
    x = _x()
    out, weights = layer(x, need_weights=True)
    assert weights.dtype == np.float64 and weights.shape == (2, H, 5, 5)
    np.testing.assert_allclose(out, layer(x), atol=1e-12)
    np.testing.assert_allclose(np.triu(weights, 1), 0.0)  # causal


def test_a_non_bool_weights_flag_is_an_error_that_names_it(fw):
    module, xp = fw
    layer, _ = _pair(module)
    name = WEIGHTS_NAME[xp.name]
    with pytest.raises(InvalidTypeError, match=name):
        layer(xp.from_numpy(_x()), **{name: 1})


# ------------------------------------------------------------- attention dropout
RATE_NAME = {"torch": "dropout", "jax": "dropout_rate", "tensorflow": "dropout"}


def _dropout_layer(module, xp, rate, seed=0, **kwargs):
    """A layer with attention dropout ``rate`` (Flax: its ``dropout`` stream from ``seed``)."""
    if xp.name == "jax":
        from flax import nnx

        kwargs["rngs"] = nnx.Rngs(dropout=seed)
    elif xp.name == "tensorflow":
        kwargs["seed"] = seed
    elif xp.name == "torch":  # PyTorch draws from its global generator: the tests' statistics
        import torch  # must not depend on what ran before in this process

        torch.manual_seed(seed)
    return module.MultiHeadAttention(E, H, "alibi", **{RATE_NAME[xp.name]: rate}, **kwargs)


def _train(layer, xp, x, **kwargs):
    """One call in training mode (dropout on), in each framework's idiom."""
    if xp.name == "tensorflow":
        return layer(x, training=True, **kwargs)
    if xp.name == "torch":
        layer.train()
    return layer(x, **kwargs)


def _eval(layer, xp, x):
    """One call in inference mode (dropout off), in each framework's idiom."""
    if xp.name == "tensorflow":
        return layer(x, training=False)
    if xp.name == "jax":
        return layer(x, deterministic=True)
    layer.eval()
    return layer(x)


def test_dropout_is_off_in_inference(fw):
    module, xp = fw
    layer = _dropout_layer(module, xp, 0.4)
    plain = module.MultiHeadAttention(E, H, "alibi")  # same seed: same weights
    x = xp.from_numpy(_x(length=6))
    np.testing.assert_array_equal(xp.to_numpy(_eval(layer, xp, x)), xp.to_numpy(plain(x)))
    if xp.name == "jax":  # nnx's mode switches
        layer.eval()
        np.testing.assert_array_equal(xp.to_numpy(layer(x)), xp.to_numpy(plain(x)))
        layer.train()
    assert not np.allclose(xp.to_numpy(_train(layer, xp, x)), xp.to_numpy(plain(x)))


def test_dropout_drops_the_rate_and_keeps_the_mean(fw):
    module, xp = fw
    rate, calls = 0.3, 200
    layer = _dropout_layer(module, xp, rate, seed=1)
    x = xp.from_numpy(_x(length=16))
    ref = pnp.MultiHeadAttention(E, H, "alibi")
    ref.load_portable_weights(layer.portable_weights())
    _, probs = ref(_x(length=16), need_weights=True)
    assert np.all(probs > 0)  # every weight can be dropped
    outs, weights = [], []
    for _ in range(calls):
        out, w = _with_weights_train(layer, xp, x)
        outs.append(xp.to_numpy(out).astype(np.float64))
        weights.append(xp.to_numpy(w).astype(np.float64))
    weights = np.stack(weights)
    dropped = float(np.mean(weights == 0))
    assert abs(dropped - rate) < 0.02, dropped  # 200 · 2048 draws: sigma 0.0007
    kept = weights[weights > 0] / np.broadcast_to(probs, weights.shape)[weights > 0]
    np.testing.assert_allclose(kept, 1 / (1 - rate), rtol=1e-4)  # scaled by 1/(1-p)
    mean_weights = weights.mean(0)
    assert np.mean(np.abs(mean_weights - probs)) / np.mean(probs) < 0.08
    reference = xp.to_numpy(_eval(layer, xp, x)).astype(np.float64)
    assert _error(np.mean(outs, 0), reference) < 0.1


def _with_weights_train(layer, xp, x):
    if xp.name == "tensorflow":
        return layer(x, training=True, return_attention_scores=True)
    out, weights, *_ = _with_weights(layer, xp, x)
    return out, weights


def test_dropout_is_reproducible_with_a_seed(fw):
    module, xp = fw
    x = xp.from_numpy(_x(length=6))

    def run(seed):
        if xp.name == "torch":
            import torch

            torch.manual_seed(seed)
        layer = _dropout_layer(module, xp, 0.5, seed=seed)
        return [xp.to_numpy(_train(layer, xp, x)) for _ in range(2)]

    first, again, other = run(3), run(3), run(4)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.allclose(first[0], first[1])  # a fresh mask each call
    assert not np.allclose(first[0], other[0])


def test_dropout_trains(fw):
    """Gradients flow through the dropped weights (the framework's autodiff)."""
    module, xp = fw
    layer = _dropout_layer(module, xp, 0.2)
    x = _x(length=6)
    if xp.name == "torch":
        import torch

        inp = torch.tensor(x, requires_grad=True)
        _train(layer, xp, inp).square().sum().backward()
        grad = inp.grad.numpy()
    elif xp.name == "jax":
        import jax.numpy as jnp
        from flax import nnx

        grads = nnx.grad(lambda m, v: (m(v) ** 2).sum(), argnums=1)(layer, jnp.asarray(x))
        grad = np.asarray(grads)
    else:
        import tensorflow as tf

        inp = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(inp)
            loss = tf.reduce_sum(_train(layer, xp, inp) ** 2)
        grad = tape.gradient(loss, inp).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


@pytest.mark.parametrize(
    "rate, error",
    [
        (1.0, InvalidArgumentError),
        (-0.1, InvalidArgumentError),
        (float("nan"), InvalidArgumentError),
        ("0.1", InvalidTypeError),
        (True, InvalidTypeError),
    ],
)
def test_a_bad_dropout_rate_is_an_error_that_names_it(fw, rate, error):
    module, xp = fw
    name = RATE_NAME[xp.name]
    with pytest.raises(error, match=name):
        module.MultiHeadAttention(E, H, **{name: rate})


def test_flax_dropout_needs_rngs_and_reads_its_flags_strictly():
    if "jax" not in FRAMEWORKS:
        pytest.skip("jax not under test")
    import jax.numpy as jnp
    from flax import nnx

    module = lp.framework_module("jax")
    x = jnp.asarray(_x(length=6))
    layer = module.MultiHeadAttention(E, H, dropout_rate=0.1)
    with pytest.raises(InvalidArgumentError, match=r"rngs=nnx.Rngs\(dropout=...\)"):
        layer(x)
    layer(x, deterministic=True)  # off: no keys needed
    layer(x, rngs=nnx.Rngs(dropout=0))  # keys at the call
    with pytest.raises(InvalidTypeError, match="deterministic"):
        layer(x, deterministic="no")
    with pytest.raises(InvalidTypeError, match=r"rngs must be an nnx\.Rngs"):
        module.MultiHeadAttention(E, H, dropout_rate=0.1, rngs=0)
    with pytest.raises(InvalidTypeError, match="deterministic"):
        module.MultiHeadAttention(E, H, deterministic=1)


def test_tensorflow_dropout_round_trips_its_config_and_reads_training_strictly():
    if "tensorflow" not in FRAMEWORKS:
        pytest.skip("tensorflow not under test")
    module = lp.framework_module("tensorflow")
    layer = module.MultiHeadAttention(E, H, dropout=0.25, seed=2)
    again = module.MultiHeadAttention.from_config(layer.get_config())
    assert again.mha_config.dropout == 0.25
    with pytest.raises(InvalidTypeError, match="training"):
        layer(_x(), training="yes")


@pytest.mark.skipif("jax" not in FRAMEWORKS, reason="jax not under test")
def test_flax_inputs_v_without_inputs_k_is_an_error_as_in_flax():
    import jax.numpy as jnp

    import posbias.jax as pj

    mha = pj.MultiHeadAttention(16, 2, bias="t5")
    x, y = jnp.ones((1, 5, 16)), jnp.zeros((1, 5, 16))
    with pytest.raises(InvalidArgumentError, match="inputs_v without inputs_k"):
        mha(x, inputs_v=y)
    np.testing.assert_array_equal(np.asarray(mha(x, y)), np.asarray(mha(x, y, y)))
