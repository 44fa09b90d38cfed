"""Keras 3 idioms: get_config/from_config, .keras files, tf.function(jit_compile), model.fit."""

import numpy as np
import pytest

from conftest import BACKENDS

if "tensorflow" not in BACKENDS:
    pytest.skip("tensorflow not under test", allow_module_level=True)

import keras
import tensorflow as tf

import posbias
from posbias.tensorflow import MultiHeadAttention, PositionalBias


def _x(batch=4, length=6, embed=32):
    return np.random.default_rng(0).normal(size=(batch, length, embed)).astype("float32")


def test_config_round_trip():
    layer = MultiHeadAttention(
        32,
        4,
        bias=posbias.get("alibi", num_heads=4, max_bias=4.0),
        causal=True,
        num_kv_heads=2,
        seed=5,
        name="attn",
    )
    config = layer.get_config()
    assert config["bias"] == {
        "name": "alibi",
        "num_heads": 4,
        "max_bias": 4.0,
        "schedule": "paper",
        "scale": 1.0,
        "custom_slopes": None,
    }
    clone = MultiHeadAttention.from_config(config)
    x = _x()
    np.testing.assert_array_equal(clone(x), layer(x))
    pb = PositionalBias.from_config(PositionalBias("alibi", 4).get_config())
    assert pb.spec == posbias.get("alibi", num_heads=4)


def test_keras_file_save_and_reload(tmp_path):
    inputs = keras.Input((6, 32))
    outputs = MultiHeadAttention(32, 4, causal=True, num_kv_heads=1)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "mse")
    x = _x()
    model.fit(x, x, epochs=2, batch_size=2, verbose=0)  # weights change from the init
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(reloaded(x), model(x))


def test_fit_reduces_the_loss():
    inputs = keras.Input((6, 32))
    hidden = MultiHeadAttention(32, 4, causal=True)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(32)(hidden))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    x = _x(batch=8)
    history = model.fit(x, x, epochs=5, batch_size=4, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_tf_function_jit_compile():
    layer = MultiHeadAttention(32, 4, causal=True)
    x = _x()
    mask = np.ones((4, 6), bool)
    mask[0, :2] = False

    @tf.function(jit_compile=True)
    def forward(t, m):
        return layer(t, key_mask=m)

    np.testing.assert_allclose(forward(x, mask), layer(x, key_mask=mask), rtol=1e-5, atol=1e-6)


def test_mixed_precision_policy():
    layer = MultiHeadAttention(32, 4, causal=True, dtype="mixed_bfloat16")
    out = layer(_x())
    assert out.dtype == tf.bfloat16
    assert layer.q_proj.kernel.dtype == "float32"
