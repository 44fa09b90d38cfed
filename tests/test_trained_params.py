"""Trained learnable biases move between frameworks: whole layers through
``portable_weights()``, bias modules through ``export_params()``; outputs are
compared with the NumPy float64 reference built from the same weights."""

import numpy as np
import pytest

import posbias
from conftest import BACKENDS
from posbias import numpy as pnp
from posbias.testing import _layers as lp

pytestmark = pytest.mark.skipif(
    not {"torch", "jax", "tensorflow"} <= set(BACKENDS),
    reason="moves weights between PyTorch, JAX and Keras: needs all three under test",
)

EMBED, HEADS, LENGTH = 16, 4, 6
LEARNABLE = [n for n in posbias.list_biases() if posbias.registered()[n].learnable]


def _spec(name):
    return posbias.registered()[name].parity_examples(HEADS)[0]


LAYER_CASES = LEARNABLE  # 2-D biases included: layers map token slots to (row, col)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, LENGTH, EMBED)).astype(np.float32)
    target = rng.normal(size=(2, LENGTH, EMBED)).astype(np.float32)
    return x, target


def _layer(module, name, seed):
    return module.MultiHeadAttention(EMBED, HEADS, _spec(name), causal=True, seed=seed)


def _train_torch(layer, steps, lr=1e-2):
    import torch

    x, target = (torch.as_tensor(a) for a in _data())
    optimiser = torch.optim.AdamW(layer.parameters(), lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.mean((layer(x) - target) ** 2).backward()
        optimiser.step()


def _train_jax(layer, steps, lr=1e-2):
    import jax.numpy as jnp
    import optax
    from flax import nnx

    x, target = (jnp.asarray(a) for a in _data())
    optimiser = nnx.Optimizer(layer, optax.adamw(lr), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimiser):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2))(layer)
        optimiser.update(layer, grads)

    for _ in range(steps):
        step(layer, optimiser)


def _outputs(layer, backend, x):
    xp = posbias.backends.load(backend)()
    return np.asarray(xp.to_numpy(layer(xp.from_numpy(x))), dtype=np.float64)


def _check_moved(weights, name, sources):
    """Every framework's layer loaded with ``weights`` vs the NumPy float64 reference."""
    x, _ = _data()
    reference = pnp.MultiHeadAttention(EMBED, HEADS, _spec(name), causal=True, seed=9)
    reference.load_portable_weights(weights)
    ref = reference(x)
    # the bias parameters matter: the trained projections with the initial bias differ
    initial = pnp.MultiHeadAttention(EMBED, HEADS, _spec(name), causal=True, seed=0)
    stale = dict(weights)
    stale.update({k: v for k, v in initial.portable_weights().items() if "positional_bias" in k})
    stale_layer = pnp.MultiHeadAttention(EMBED, HEADS, _spec(name), causal=True)
    stale_layer.load_portable_weights(stale)
    assert lp._normwise(stale_layer(x), ref) > 1e-4, "training did not move the bias enough"
    for backend, layer in sources.items():
        assert lp._normwise(_outputs(layer, backend, x), ref) <= 1e-5, backend
    for backend in ("torch", "jax", "tensorflow"):
        if backend in sources:
            continue
        layer = _layer(lp.framework_module(backend), name, seed=9)
        layer.load_portable_weights(weights)
        assert lp._normwise(_outputs(layer, backend, x), ref) <= 1e-5, backend
        exported = layer.portable_weights()
        assert set(exported) == set(weights)
        for key, value in weights.items():
            np.testing.assert_array_equal(exported[key], value, err_msg=f"{backend} {key}")


@pytest.mark.parametrize("name", LAYER_CASES)
def test_layer_trained_in_torch_moves_to_jax_keras_and_numpy(name):
    layer = _layer(lp.framework_module("torch"), name, seed=0)
    _train_torch(layer, steps=5)
    weights = layer.portable_weights()
    bias_keys = {f"positional_bias.{k}" for k in _spec(name).param_shapes()}
    assert bias_keys <= set(weights)
    for key in bias_keys:
        np.testing.assert_array_equal(
            weights[key], layer.positional_bias.export_params()[key.split(".", 1)[1]]
        )
        assert weights[key].dtype == np.float32
    _check_moved(weights, name, {"torch": layer})


@pytest.mark.parametrize("name", LAYER_CASES)
def test_layer_trained_in_jax_moves_to_torch_and_numpy(name):
    layer = _layer(lp.framework_module("jax"), name, seed=0)
    _train_jax(layer, steps=5)
    _check_moved(layer.portable_weights(), name, {"jax": layer})


def test_numpy_layer_is_seeded_like_the_frameworks():
    x, _ = _data()
    ref = pnp.MultiHeadAttention(EMBED, HEADS, "t5", causal=True, seed=4)
    other = pnp.MultiHeadAttention(EMBED, HEADS, "t5", causal=True, seed=5)
    assert lp._normwise(other(x), ref(x)) > 1e-3  # the seed reaches the bias table
    for backend in ("torch", "jax", "tensorflow"):
        layer = _layer(lp.framework_module(backend), "t5", seed=4)
        assert lp._normwise(_outputs(layer, backend, x), ref(x)) <= 1e-5, backend


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("positional_bias.table"), r"missing \['positional_bias.table', 'q.bias'"),
        (lambda w: w.update({"positional_bias.extra": np.ones(2)}), "unexpected"),
        (
            lambda w: w.update({"positional_bias.table": np.ones((31, HEADS))}),
            r"positional_bias.table has shape \(31, 4\), expected \(32, 4\)",
        ),
    ],
)
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax", "tensorflow"])
def test_bad_portable_bias_entries_are_listed_and_nothing_is_written(backend, change, message):
    layer = _layer(lp.framework_module(backend), "t5", seed=1)
    before = layer.portable_weights()
    weights = _layer(pnp, "t5", seed=2).portable_weights()
    weights.pop("q.bias")  # a second problem in the same error
    change(weights)
    with pytest.raises(posbias.InvalidArgumentError, match=message) as info:
        layer.load_portable_weights(weights)
    assert "'q.bias'" in str(info.value)  # both problems, one error
    bad_value = _layer(pnp, "t5", seed=2).portable_weights()
    bad_value["positional_bias.table"][0, 0] = np.nan
    with pytest.raises(posbias.InvalidArgumentError, match="NaN"):
        layer.load_portable_weights(bad_value)
    with pytest.raises(posbias.InvalidTypeError, match="dict"):
        layer.load_portable_weights([("q.kernel", 1.0)])
    after = layer.portable_weights()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


# ----------------------------------------------------------------- KERPLE
@pytest.mark.parametrize("name", ["kerple_log", "kerple_power"])
def test_trained_kerple_reloads_everywhere(name):
    """100 AdamW steps at lr 1e-2 drive parameters below the 0.01 clamp (below 0): that
    state exports, reloads in every framework and gives the same bias."""
    import torch

    module = lp.framework_module("torch").PositionalBias(name, 8, seed=0)
    optimiser = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for _ in range(100):
        optimiser.zero_grad()
        torch.mean(module(16, 16) ** 2).backward()  # towards a zero bias: r1, r2 -> 0
        optimiser.step()
    trained = module.export_params()
    assert min(v.min() for v in trained.values()) < 0, "the setup must reach raw values < 0"
    with torch.no_grad():
        expected = module(16, 16).numpy()
    ref = posbias.get(name, num_heads=8).bias(16, 16, params=trained, dtype="float64")
    np.testing.assert_allclose(expected, ref, rtol=1e-6, atol=1e-6)
    positions = np.arange(16)
    for backend in ("torch", "jax", "tensorflow", "numpy"):
        framework = lp.framework_module(backend)
        xp = posbias.backends.load(backend)()
        reloaded = framework.PositionalBias(name, 8, seed=3)
        reloaded.load_params(trained)
        for key, value in reloaded.export_params().items():
            np.testing.assert_array_equal(value, trained[key], err_msg=f"{backend} {key}")
        q, k = xp.from_numpy(positions), xp.from_numpy(positions)
        out = reloaded(q, k) if backend == "tensorflow" else reloaded(q_pos=q, k_pos=k)
        out = xp.to_numpy(out)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=backend)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6, err_msg=backend)
