"""posbias.keras on the Keras backend of this process (``KERAS_BACKEND``).

Run once per backend, each in its own process (Keras reads ``KERAS_BACKEND``
at import)::

    KERAS_BACKEND=tensorflow pytest tests/test_keras.py
    KERAS_BACKEND=jax pytest tests/test_keras.py
    KERAS_BACKEND=torch pytest tests/test_keras.py

(the ``keras(backend=...)`` nox sessions). Every test compares with the NumPy
float64 reference layer, with ``keras.layers.MultiHeadAttention`` or with the
same layer on another path.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import BACKENDS

keras = pytest.importorskip("keras")
KERAS_BACKEND = keras.backend.backend()
if KERAS_BACKEND not in ("jax", "torch", "tensorflow") or KERAS_BACKEND not in BACKENDS:
    pytest.skip(f"Keras backend {KERAS_BACKEND!r} not under test", allow_module_level=True)

import posbias  # noqa: E402
from posbias import numpy as pnp  # noqa: E402
from posbias._core import dispatch  # noqa: E402
from posbias.keras import MultiHeadAttention, PositionalBias  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _x(batch=2, length=7, embed=24, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, length, embed)).astype("float32")


def _pair(heads=3, dim=8, name="alibi", seed=3, **kwargs):
    """A Keras layer and the NumPy reference layer with the same (portable) weights."""
    ref = pnp.MultiHeadAttention(heads * dim, heads, name, causal=True, seed=seed)
    layer = MultiHeadAttention(heads, dim, bias=name, seed=seed, **kwargs)
    layer.build((None, None, heads * dim))
    return layer, ref


def _bidirectional(ref):
    """The same weights in a bidirectional NumPy reference layer."""
    heads = ref.mha_config.num_heads
    name = None if ref.positional_bias is None else ref.positional_bias.spec
    other = pnp.MultiHeadAttention(ref.mha_config.embed_dim, heads, name, causal=False)
    other.load_portable_weights(ref.portable_weights())
    return other


# ----------------------------------------------------------- numbers
@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["alibi", "t5"])
def test_matches_the_numpy_reference(heads, causal, name):
    layer, ref = _pair(heads, 8, name)
    np.testing.assert_array_equal(  # the same seeded initialisation in every framework
        layer.portable_weights()["q.kernel"], ref.portable_weights()["q.kernel"]
    )
    x = _x(embed=heads * 8)
    out = _np(layer(x, x, use_causal_mask=causal))
    expected = (ref if causal else _bidirectional(ref))(x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6)


def test_portable_weights_move_to_and_from_the_reference():
    source = pnp.MultiHeadAttention(24, 3, "t5", causal=True, seed=11)
    layer, _ = _pair(3, 8, "t5", seed=0)
    layer.load_portable_weights(source.portable_weights())
    for name, value in source.portable_weights().items():
        np.testing.assert_array_equal(layer.portable_weights()[name], value)
    x = _x()
    np.testing.assert_allclose(_np(layer(x, use_causal_mask=True)), source(x), rtol=1e-5, atol=2e-6)
    assert layer.portable_shapes()["positional_bias.table"] == (32, 3)


def test_self_attention_shorthand_and_explicit_value_agree():
    layer, _ = _pair()
    x = _x()
    np.testing.assert_array_equal(_np(layer(x)), _np(layer(x, x)))
    np.testing.assert_array_equal(_np(layer(x, x)), _np(layer(query=x, value=x, key=x)))


def test_cross_attention_aligns_bottom_right():
    layer = MultiHeadAttention(2, 4, value_dim=6, output_shape=5, bias="alibi", seed=1)
    query, value, key = _x(2, 3, 8, seed=1), _x(2, 6, 10, seed=2), _x(2, 6, 12, seed=3)
    out = _np(layer(query, value, key))
    w = layer.portable_weights()
    assert w["q.kernel"].shape == (8, 8) and w["k.kernel"].shape == (12, 8)
    assert w["v.kernel"].shape == (10, 12) and w["o.kernel"].shape == (12, 5)

    def heads(t, dim):
        return t.reshape(*t.shape[:2], 2, dim).transpose(0, 2, 1, 3)

    q = heads(query @ w["q.kernel"] + w["q.bias"], 4)
    k = heads(key @ w["k.kernel"] + w["k.bias"], 4)
    v = heads(value @ w["v.kernel"] + w["v.bias"], 6)
    ref = pnp.attention(q, k, v, "alibi")  # queries in the last three key slots
    ref = ref.transpose(0, 2, 1, 3).reshape(2, 3, 12) @ w["o.kernel"] + w["o.bias"]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)


def test_equals_keras_multi_head_attention_without_a_bias():
    # (value_dim != key_dim fails inside Keras' own layer on the JAX backend, Keras 3.15)
    theirs = keras.layers.MultiHeadAttention(num_heads=3, key_dim=8, output_shape=16)
    ours = MultiHeadAttention(3, 8, output_shape=16, bias=None)
    x = _x()
    theirs(x, x)
    ours(x, x)
    ours.set_weights(theirs.get_weights())  # Keras' weight shapes and order
    for causal in (False, True):
        np.testing.assert_allclose(
            _np(ours(x, x, use_causal_mask=causal)),
            _np(theirs(x, x, use_causal_mask=causal)),
            rtol=1e-5,
            atol=2e-6,
        )


# ------------------------------------------------------------- masks
def _left_padded(layer, embed=24, pad=3, length=4):
    """(padded input, its Keras mask, the unpadded input)."""
    x = _x(1, length, embed, seed=4)
    padded = np.concatenate([np.full((1, pad, embed), 5.0, "float32"), x], 1)
    mask = np.array([[False] * pad + [True] * length])
    return padded, mask, x


def test_keras_masks_give_the_unpadded_outputs():
    layer, _ = _pair()
    padded, mask, x = _left_padded(layer)
    alone = _np(layer(x, use_causal_mask=True))
    by_masks = layer(padded, padded, query_mask=mask, value_mask=mask, use_causal_mask=True)
    np.testing.assert_allclose(_np(by_masks)[:, 3:], alone, rtol=1e-5, atol=2e-6)
    assert np.all(_np(by_masks)[:, :3] == _np(layer.projections["o"].bias))  # masked rows: 0


def test_embedding_mask_zero_is_used_and_propagated():
    """The issue's example: Embedding(mask_zero=True) feeding the layer (no warning)."""
    emb = keras.layers.Embedding(10, 24, mask_zero=True)
    layer, _ = _pair()
    ids = np.array([[0, 0, 3, 4, 5], [6, 2, 3, 4, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras warns when a layer destroys a mask
        hidden = emb(ids)
        out = layer(hidden, hidden, use_causal_mask=True)
    np.testing.assert_array_equal(_np(out._keras_mask), ids != 0)
    alone = _np(layer(emb(ids[:1, 2:]), use_causal_mask=True))
    np.testing.assert_allclose(_np(out)[:1, 2:], alone, rtol=1e-5, atol=2e-6)


def test_mask_propagates_through_a_functional_model():
    inputs = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(10, 24, mask_zero=True)(inputs)
    layer = MultiHeadAttention(3, 8, seed=2)
    hidden = layer(hidden, hidden, use_causal_mask=True)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)  # averages the unmasked steps only
    model = keras.Model(inputs, pooled)
    ids = np.array([[0, 0, 3, 4, 5], [6, 2, 3, 4, 5]])
    alone = model(ids[:1, 2:])
    np.testing.assert_allclose(_np(model(ids))[:1], _np(alone), rtol=1e-5, atol=2e-6)


def test_attention_mask_of_padding_equals_the_keras_masks():
    layer, _ = _pair()
    padded, mask, _ = _left_padded(layer)
    by_masks = _np(layer(padded, padded, query_mask=mask, value_mask=mask, use_causal_mask=True))
    grid = mask[:, :, None] & mask[:, None, :]
    for attention_mask in (grid, grid & np.tril(np.ones((7, 7), bool)), grid.astype("int32")):
        out = _np(layer(padded, padded, attention_mask=attention_mask, use_causal_mask=True))
        np.testing.assert_allclose(out, by_masks, rtol=1e-6, atol=1e-6)


def test_an_attention_mask_that_is_not_padding_raises():
    layer, _ = _pair()
    x = _x()
    band = np.abs(np.arange(7)[:, None] - np.arange(7)[None]) < 2
    with pytest.raises(posbias.InvalidArgumentError, match=r"sequences \[0, 1\] is not a padding"):
        layer(x, x, attention_mask=np.broadcast_to(band, (2, 7, 7)))
    causal = np.tril(np.ones((7, 7), bool))
    with pytest.raises(posbias.InvalidArgumentError, match="use_causal_mask=True instead"):
        layer(x, x, attention_mask=causal)


def test_an_attention_mask_that_is_not_padding_gives_nan_under_jit():
    layer, _ = _pair()
    x = _x()
    band = np.broadcast_to(np.abs(np.arange(7)[:, None] - np.arange(7)[None]) < 2, (2, 7, 7))
    good = np.ones((2, 7, 7), bool)
    inputs = keras.Input((7, 24))
    mask_in = keras.Input((7, 7), dtype="bool")
    model = keras.Model([inputs, mask_in], layer(inputs, inputs, attention_mask=mask_in))
    model.compile(jit_compile=True)
    out = model.predict([x, np.stack([band[0], good[1]])], verbose=0)
    assert np.isnan(out[0]).all()
    np.testing.assert_allclose(out[1], _np(layer(x))[1], rtol=1e-5, atol=2e-6)


def test_return_attention_scores():
    layer, _ = _pair()
    padded, mask, _ = _left_padded(layer)
    fast = _np(layer(padded, padded, query_mask=mask, value_mask=mask, use_causal_mask=True))
    out, scores = layer(
        padded,
        padded,
        query_mask=mask,
        value_mask=mask,
        use_causal_mask=True,
        return_attention_scores=True,
    )
    scores = _np(scores)
    np.testing.assert_allclose(_np(out), fast, rtol=1e-5, atol=2e-6)
    assert scores.shape == (1, 3, 7, 7)
    np.testing.assert_allclose(scores[0, :, 3:].sum(-1), 1.0, rtol=1e-6)
    assert np.all(scores[0, :, :3] == 0) and np.all(scores[0, :, :, :3] == 0)
    assert np.all(np.triu(scores[0], 1) == 0)  # causal


def test_dropout_is_off_in_inference_and_unbiased_in_training():
    layer, _ = _pair(dropout=0.3, seed=5)
    plain, _ = _pair(seed=5)  # the same weights, no dropout
    x = _x()
    eval_out = _np(layer(x, x))
    np.testing.assert_array_equal(eval_out, _np(plain(x, x)))
    np.testing.assert_array_equal(_np(layer(x, x, training=False)), eval_out)
    outs = [_np(layer(x, x, training=True)).astype(np.float64) for _ in range(200)]
    assert not np.allclose(outs[0], outs[1])  # a fresh mask each call
    err = np.abs(np.mean(outs, 0) - eval_out).max() / np.abs(eval_out).max()
    assert err < 0.1, err  # E[out] is the output without dropout (scaled by 1/(1-p))
    out, scores = layer(x, x, training=True, return_attention_scores=True)
    _, eval_scores = layer(x, x, return_attention_scores=True)
    assert not np.allclose(_np(out), eval_out)  # dropped ...
    np.testing.assert_allclose(_np(scores), _np(eval_scores), atol=1e-6)  # Keras: pre-dropout


def test_dropout_is_reproducible_with_the_seed():
    x = _x()
    first = [_np(_pair(dropout=0.5, seed=2)[0](x, x, training=True)) for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    other = _np(_pair(dropout=0.5, seed=4)[0](x, x, training=True))
    assert not np.allclose(first[0], other)


def test_dropout_survives_the_config_round_trip():
    layer, _ = _pair(dropout=0.25)
    assert MultiHeadAttention.from_config(layer.get_config()).dropout == 0.25


# ------------------------------------------------------ Keras idioms
def test_config_round_trip():
    spec = posbias.get("alibi", num_heads=4, max_bias=4.0)
    layer = MultiHeadAttention(4, 8, bias=spec, seed=5, output_shape=16, name="attn")
    x = _x(embed=32)
    out = _np(layer(x, use_causal_mask=True))
    config = layer.get_config()
    assert config["bias"] == spec.to_config() and config["output_shape"] == 16
    clone = MultiHeadAttention.from_config(config)
    np.testing.assert_array_equal(_np(clone(x, use_causal_mask=True)), out)
    assert PositionalBias.from_config(PositionalBias("t5", 4).get_config()).spec == posbias.get(
        "t5", num_heads=4
    )


def _model(name="t5", jit=False):
    inputs = keras.Input((6,), dtype="int32")
    hidden = keras.layers.Embedding(20, 16, mask_zero=True)(inputs)
    layer = MultiHeadAttention(2, 8, bias=name, name="attention")
    hidden = layer(hidden, hidden, use_causal_mask=True)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(hidden))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "mse", jit_compile=jit)
    return model, layer


def _ids():
    ids = np.random.default_rng(1).integers(1, 20, size=(8, 6))
    ids[:3, :2] = 0  # left padding
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_fit_trains_the_projections_and_the_bias_table(jit):
    model, layer = _model(jit=jit)
    table = _np(layer.positional_bias.bias_params["table"]).copy()
    history = model.fit(_ids(), np.ones((8, 1)), epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert np.abs(_np(layer.positional_bias.bias_params["table"]) - table).max() > 1e-4


def test_fit_with_a_partial_last_batch_and_variable_lengths():
    """A last batch of another size makes Keras trace with an unknown batch size
    (the TensorFlow backend raised inside the bias's chunking), and
    keras.Input((None,)) leaves the length to the data: one length per model on
    the TensorFlow backend (a clear error after, documented), any on JAX and PyTorch."""
    model, _ = _model()
    history = model.fit(_ids(), np.ones((8, 1)), epochs=2, batch_size=5, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    inputs = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(20, 16, mask_zero=True)(inputs)
    hidden = MultiHeadAttention(2, 8, bias="t5")(hidden, hidden, use_causal_mask=True)
    model = keras.Model(
        inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(hidden))
    )
    model.compile("adam", "mse")
    rng = np.random.default_rng(0)
    first = model.fit(rng.integers(1, 20, (7, 6)), np.ones((7, 1)), batch_size=4, verbose=0)
    assert np.isfinite(first.history["loss"]).all()
    longer = rng.integers(1, 20, (7, 9))
    if KERAS_BACKEND != "tensorflow":
        assert np.isfinite(model.fit(longer, np.ones((7, 1)), verbose=0).history["loss"]).all()
        return
    # a second length makes Keras retrace with an unknown length
    with pytest.raises(posbias.InvalidArgumentError, match="need known heads, lengths"):
        model.fit(longer, np.ones((7, 1)), verbose=0)


def test_jit_compiled_predict_matches_eager():
    model, _ = _model()
    ids = _ids()
    eager = _np(model(ids))
    model.compile(jit_compile=True)
    np.testing.assert_allclose(model.predict(ids, verbose=0), eager, rtol=1e-5, atol=2e-6)


def test_keras_file_round_trip(tmp_path):
    model, _ = _model()
    model.fit(_ids(), np.ones((8, 1)), epochs=1, batch_size=8, verbose=0)
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(_np(reloaded(_ids())), _np(model(_ids())))


_SAVE_UNDER_TENSORFLOW = """
import sys, numpy as np, keras
sys.path.insert(0, {tests!r})
from test_keras import _ids, _model
model, _ = _model()
model.fit(_ids(), np.ones((8, 1)), epochs=2, batch_size=8, verbose=0)
model.save({path!r})
np.save({expected!r}, keras.ops.convert_to_numpy(model(_ids())))
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs TensorFlow")
def test_a_keras_file_saved_under_tensorflow_loads_here(tmp_path):
    path, expected = str(tmp_path / "model.keras"), str(tmp_path / "expected.npy")
    script = _SAVE_UNDER_TENSORFLOW.format(tests=str(ROOT / "tests"), path=path, expected=expected)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": str(ROOT)}
    env["POSBIAS_TEST_BACKENDS"] = "numpy,tensorflow"
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT, timeout=300)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(_np(reloaded(_ids())), np.load(expected), rtol=1e-5, atol=2e-6)


_LOAD_UNDER_ANOTHER_BACKEND = """
import numpy as np, keras
import posbias.keras  # registers the layers with Keras
model = keras.models.load_model({path!r})
np.save({out!r}, keras.ops.convert_to_numpy(model(np.load({ids!r}))))
"""


@pytest.mark.skipif(KERAS_BACKEND != "tensorflow", reason="saves under TensorFlow")
@pytest.mark.parametrize("other", ["jax", "torch"])
def test_a_keras_file_saved_here_loads_under_another_backend(tmp_path, other):
    if other not in BACKENDS:
        pytest.skip(f"{other} not under test")
    model, _ = _model()
    model.fit(_ids(), np.ones((8, 1)), epochs=2, batch_size=8, verbose=0)
    path, ids, out = (str(tmp_path / n) for n in ("model.keras", "ids.npy", "out.npy"))
    model.save(path)
    np.save(ids, _ids())
    script = _LOAD_UNDER_ANOTHER_BACKEND.format(path=path, ids=ids, out=out)
    env = {**os.environ, "KERAS_BACKEND": other, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT, timeout=300)
    np.testing.assert_allclose(np.load(out), _np(model(_ids())), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision(policy):
    layer, ref = _pair(dtype=policy)
    out = layer(_x(), use_causal_mask=True)
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    assert layer.projections["q"].kernel.dtype == "float32"
    expected = ref(_x())
    err = np.abs(_np(out).astype(np.float64) - expected).max() / np.abs(expected).max()
    assert err < 0.05


def test_learnable_bias_parameters_stay_float32_under_mixed_precision():
    layer = MultiHeadAttention(2, 4, bias="t5", dtype="mixed_bfloat16")
    layer(_x(embed=8))
    assert layer.positional_bias.bias_params["table"].dtype == "float32"


def test_runs_the_blockwise_kernel_of_the_backend(monkeypatch):
    used = []
    real = dispatch.select

    def spy(p, implementation):
        name = real(p, implementation)
        used.append((p.xp.name, name))
        return name

    monkeypatch.setattr(dispatch, "select", spy)
    layer, _ = _pair()
    layer(_x(), use_causal_mask=True)
    assert used == [(KERAS_BACKEND, "blockwise")]
    if KERAS_BACKEND == "torch":  # posbias.torch's blockwise kernel (SDPA tiles, own backward)
        kernel = dispatch._KERNELS[("torch", "blockwise")]
        assert kernel.blocks.__module__.startswith("posbias.torch")


def test_positional_bias_layer_values():
    spec = posbias.get("t5", num_heads=2)
    layer = PositionalBias("t5", num_heads=2)
    expected = spec.bias(q_len=3, k_len=5, params=layer.export_params())
    np.testing.assert_array_equal(_np(layer(q_len=3, k_len=5)), expected)
    assert PositionalBias("alibi", 4, max_bias=4.0).spec == posbias.get(
        "alibi", num_heads=4, max_bias=4.0
    )


def test_a_shared_positional_bias_layer():
    shared = PositionalBias("t5", num_heads=3, name="shared")
    a = MultiHeadAttention(3, 8, bias=shared, seed=1)
    b = MultiHeadAttention(3, 8, bias=shared, seed=2)
    assert a.positional_bias is b.positional_bias is shared
    with pytest.raises(posbias.InvalidArgumentError, match="3 heads but the queries have 2"):
        MultiHeadAttention(2, 8, bias=shared)


# --------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_heads": 0}, posbias.InvalidArgumentError, "num_heads must be >= 1"),
        ({"num_heads": "2"}, posbias.InvalidTypeError, "num_heads must be an integer"),
        ({"key_dim": 2.0}, posbias.InvalidTypeError, "key_dim must be an integer"),
        ({"value_dim": 0}, posbias.InvalidArgumentError, "value_dim must be >= 1"),
        ({"dropout": 1.0}, posbias.InvalidArgumentError, r"dropout must be a probability"),
        ({"dropout": -0.1}, posbias.InvalidArgumentError, "dropout must be >= 0"),
        ({"dropout": "0"}, posbias.InvalidTypeError, "dropout must be a real number"),
        ({"use_bias": "yes"}, posbias.InvalidTypeError, "use_bias must be a bool"),
        ({"output_shape": (2, 3)}, posbias.InvalidArgumentError, "one feature axis"),
        ({"output_shape": 0}, posbias.InvalidArgumentError, "output_shape must be >= 1"),
        ({"attention_axes": (1, 2)}, posbias.InvalidArgumentError, "attention_axes"),
        ({"attention_axes": 2}, posbias.InvalidArgumentError, "sequence axis"),
        ({"bias": "alibbi"}, posbias.UnknownBiasError, "alibi"),
        ({"bias": 3}, posbias.InvalidTypeError, "bias must be"),
        ({"implementation": "fast"}, posbias.InvalidArgumentError, "implementation must be"),
        ({"block_size": 0}, posbias.InvalidArgumentError, "block_size must be"),
        ({"seed": -1}, posbias.InvalidArgumentError, "seed must be >= 0"),
        ({"seed": 1.5}, posbias.InvalidTypeError, "seed must be an integer"),
        ({"kernel_initializer": "nope"}, posbias.InvalidArgumentError, "kernel_initializer"),
        ({"bias_regularizer": 3}, posbias.InvalidArgumentError, "bias_regularizer"),
        ({"sliding_window": 4}, posbias.InvalidArgumentError, "sliding_window"),
        ({"flash_attention": True}, posbias.InvalidArgumentError, "implementation="),
        ({"use_bais": False}, posbias.InvalidTypeError, "Did you mean use_bias"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    arguments = {"num_heads": 2, "key_dim": 4, **kwargs}
    with pytest.raises(error, match=message):
        MultiHeadAttention(**arguments)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m, x: m(x, use_causal_mask="true"), posbias.InvalidTypeError, "use_causal_mask"),
        (
            lambda m, x: m(x, return_attention_scores=1),
            posbias.InvalidTypeError,
            "return_attention_scores",
        ),
        (lambda m, x: m(x, training="no"), posbias.InvalidTypeError, "training must be a bool"),
        (
            lambda m, x: m(x, attention_mask=np.zeros((2, 7, 7), "float32")),
            posbias.InvalidTypeError,
            "additive",
        ),
        (
            lambda m, x: m(x, attention_mask=np.ones((2, 7, 6), bool)),
            posbias.InvalidArgumentError,
            r"attention_mask must have shape \(2, 7, 7\)",
        ),
        (
            lambda m, x: m(x, x, value_mask=np.ones((2, 6), bool)),
            posbias.InvalidArgumentError,
            r"value_mask must have shape \(2, 7\)",
        ),
        (
            lambda m, x: m(x, x, query_mask=np.ones((2, 7), "float32")),
            posbias.InvalidTypeError,
            "query_mask must be boolean",
        ),
        (lambda m, x: m(x[0]), posbias.InvalidArgumentError, r"query must have shape \(B, L, 24\)"),
        (lambda m, x: m(x, x[:1]), posbias.InvalidArgumentError, "batch size"),
        (lambda m, x: m(x, x, x[:, :3]), posbias.InvalidArgumentError, "same length"),
        (lambda m, x: m(x, x[..., :8]), posbias.InvalidArgumentError, "value must have shape"),
        (
            lambda m, x: m(x[:, :3], x, use_causal_mask=True),
            posbias.InvalidArgumentError,
            "top-left",
        ),
        (lambda m, x: m(x, value="x"), posbias.InvalidTypeError, "value must be a"),
        (
            lambda m, x: m(x, key_padding_mask=np.ones((2, 7), bool)),
            posbias.InvalidTypeError,
            "key_mask",
        ),
        (
            lambda m, x: m.load_portable_weights({"q.kernel": np.ones(3)}),
            posbias.InvalidArgumentError,
            "missing",
        ),
    ],
)
def test_bad_call_arguments(call, error, message):
    layer, _ = _pair()
    with pytest.raises(error, match=message):
        call(layer, _x())


@pytest.mark.skipif(KERAS_BACKEND != "tensorflow", reason="posbias.tensorflow is TensorFlow's")
def test_the_tensorflow_layer_points_keras_idioms_here():
    from posbias.tensorflow import MultiHeadAttention as TFMultiHeadAttention

    x = _x()
    with pytest.raises(posbias.InvalidTypeError, match=r"posbias.keras.MultiHeadAttention"):
        TFMultiHeadAttention(24, 3)(x, x)


def test_portable_weights_need_a_built_layer():
    with pytest.raises(posbias.InvalidArgumentError, match="not built yet"):
        MultiHeadAttention(2, 4).portable_weights()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bias": "t5", "num_heads": 0}, posbias.InvalidArgumentError, "num_heads"),
        ({"bias": "t5", "num_heads": 2, "seed": -1}, posbias.InvalidArgumentError, "seed"),
        ({"bias": "t5", "num_heads": 2, "seed": "0"}, posbias.InvalidTypeError, "seed"),
        ({"bias": "t5"}, posbias.InvalidArgumentError, "num_heads"),
        ({"bias": "nope", "num_heads": 2}, posbias.UnknownBiasError, "nope"),
        ({"bias": "t5", "num_heads": 2, "num_buckets": 3}, posbias.InvalidArgumentError, "even"),
    ],
)
def test_bad_positional_bias_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        PositionalBias(**kwargs)
