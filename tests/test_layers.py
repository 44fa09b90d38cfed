"""Attention functions and MultiHeadAttention layers on every framework vs the NumPy reference."""

import numpy as np
import pytest

import posbias
from conftest import FRAMEWORKS
from posbias import numpy as pnp
from posbias.backends import load
from posbias.testing import _layers as lp

pytestmark = pytest.mark.skipif(not FRAMEWORKS, reason="no framework under test")


@pytest.fixture(params=FRAMEWORKS)
def fw(request):
    """(framework module, backend adapter) for each framework under test."""
    return lp.framework_module(request.param), load(request.param)()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_functional_attention_parity(fw, dtype):
    _module, xp = fw
    cell = lp.check_functional(xp.name, dtype)
    assert cell.passed, cell.failures
    assert cell.checks == 2 * len(lp.functional_cases())  # default blocks and blocks of 4


def test_layer_parity_with_shared_weights(fw):
    _module, xp = fw
    cell = lp.check_layers(xp.name)
    assert cell.passed, cell.failures


def _layer(module, **kwargs):
    return module.MultiHeadAttention(24, 3, causal=True, seed=3, **kwargs)


def _x(batch=2, length=7, embed=24, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, length, embed)).astype(np.float32)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_unpadded_outputs(fw, side):
    module, xp = fw
    layer = _layer(module)
    x = _x(batch=1, length=4)
    pad = np.zeros((1, 3, 24), np.float32) + 5.0  # garbage in padded slots
    padded = np.concatenate([pad, x], 1) if side == "left" else np.concatenate([x, pad], 1)
    mask = np.ones((1, 7), bool)
    mask[0, :3] = side != "left"
    mask[0, 4:] = side == "left"
    real = slice(3, 7) if side == "left" else slice(0, 4)
    out = xp.to_numpy(layer(xp.from_numpy(padded), key_mask=xp.from_numpy(mask)))
    alone = xp.to_numpy(layer(xp.from_numpy(x)))
    np.testing.assert_allclose(out[:, real], alone, rtol=1e-5, atol=1e-6)


def test_packing_gives_the_separate_outputs(fw):
    module, xp = fw
    layer = _layer(module)
    a, b = _x(1, 3, seed=1), _x(1, 4, seed=2)
    packed = np.concatenate([a, b], 1)
    segments = np.array([[0, 0, 0, 1, 1, 1, 1]])
    out = xp.to_numpy(layer(xp.from_numpy(packed), segment_ids=xp.from_numpy(segments)))
    np.testing.assert_allclose(out[:, :3], xp.to_numpy(layer(xp.from_numpy(a))), atol=1e-6)
    np.testing.assert_allclose(out[:, 3:], xp.to_numpy(layer(xp.from_numpy(b))), atol=1e-6)


@pytest.mark.parametrize("steps", [[7], [1] * 7, [4, 1, 2], [2, 3, 2]])
def test_decoding_step_by_step_equals_full_forward(fw, steps):
    module, xp = fw
    layer = _layer(module, num_kv_heads=1)
    x = _x(batch=2, length=7)
    mask = np.ones((2, 7), bool)
    mask[1, :2] = False  # left-padded second sequence: per-sequence cache lengths differ
    full = xp.to_numpy(layer(xp.from_numpy(x), key_mask=xp.from_numpy(mask)))
    cache = layer.init_cache(batch_size=2, capacity=9)
    outs, start = [], 0
    for size in steps:
        y, cache = layer(
            xp.from_numpy(x[:, start : start + size]),
            key_mask=xp.from_numpy(mask[:, start : start + size]),
            cache=cache,
        )
        outs.append(xp.to_numpy(y))
        start += size
    steps_out = np.concatenate(outs, 1)
    np.testing.assert_allclose(steps_out[0], full[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(steps_out[1, 2:], full[1, 2:], rtol=1e-5, atol=1e-6)
    assert xp.to_numpy(cache.length).tolist() == [7, 7]


def test_fully_masked_rows_are_zero_not_nan(fw):
    module, xp = fw
    q = xp.from_numpy(np.ones((1, 3, 3, 4), np.float32))  # L = H = 3 in either layout
    mask = xp.from_numpy(np.array([[False, False, False]]))
    out = module.attention(q, q, q, "alibi", key_mask=mask, causal=True)
    assert np.all(xp.to_numpy(out) == 0)
    q16 = xp.cast(q, "float16")
    out = module.attention(q16, q16, q16, "alibi", key_mask=mask)
    assert np.all(xp.to_numpy(out) == 0)


def test_gqa_bias_is_per_query_head(fw):
    module, xp = fw
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 12, 5, 8))
    k = rng.normal(size=(1, 4, 5, 8))
    v = rng.normal(size=(1, 4, 5, 8))
    expanded = pnp.attention(q, np.repeat(k, 3, 1), np.repeat(v, 3, 1), "alibi", causal=True)
    layout = lp._to_layout
    out = module.attention(
        *(xp.from_numpy(layout(t.astype(np.float32), xp.name)) for t in (q, k, v)),
        "alibi",
        causal=True,
    )
    np.testing.assert_allclose(layout(xp.to_numpy(out), xp.name), expanded, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_output_dtype(fw, dtype):
    module, xp = fw
    x = _x()
    layer = _layer(module)
    if xp.name == "torch":
        layer = layer.to(xp.native_dtype(dtype))
        out = layer(xp.cast(xp.from_numpy(x), dtype))
    elif xp.name == "jax":
        layer = module.MultiHeadAttention(
            24, 3, causal=True, seed=3, param_dtype=xp.native_dtype(dtype)
        )
        out = layer(xp.cast(xp.from_numpy(x), dtype))
    else:
        layer = module.MultiHeadAttention(24, 3, causal=True, seed=3, dtype=f"mixed_{dtype}")
        out = layer(xp.from_numpy(x))
    assert xp.dtype_name(out.dtype) == dtype
    ref = pnp.MultiHeadAttention(24, 3, causal=True, seed=3)(x)
    err = np.abs(xp.to_numpy(out).astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err < 0.05


def test_positional_bias_module(fw):
    module, xp = fw
    pb = module.PositionalBias("alibi", num_heads=12)
    spec = posbias.get("alibi", num_heads=12)
    if xp.name == "tensorflow":  # Keras layers take tensors: positions
        out, expected = pb(xp.arange(3), xp.arange(5)), spec.bias(q_pos=[0, 1, 2], k_pos=range(5))
    else:
        out, expected = pb(3, 5), spec.bias(q_len=3, k_len=5)
    assert xp.dtype_name(out.dtype) == "float32"
    np.testing.assert_array_equal(xp.to_numpy(out), expected)


@pytest.mark.parametrize("backend", ["numpy", *FRAMEWORKS])
def test_the_layer_bias_is_positional_bias_everywhere(backend):
    module = lp.framework_module(backend)
    layer = module.MultiHeadAttention(8, 2, "t5", causal=True, seed=2)
    assert isinstance(layer.positional_bias, module.PositionalBias)
    assert layer.positional_bias.spec == posbias.get("t5", num_heads=2)
    expected = module.PositionalBias("t5", 2, seed=2).export_params()
    for key, value in layer.positional_bias.export_params().items():
        np.testing.assert_array_equal(value, expected[key])
    assert module.MultiHeadAttention(8, 2, None).positional_bias is None
    if backend == "torch":  # PyTorch's `bias` is the projections' (use_bias=)
        assert not hasattr(layer, "bias")
        assert "positional_bias.params.table" in layer.state_dict()


@pytest.mark.parametrize("backend", ["numpy", *FRAMEWORKS])
@pytest.mark.parametrize("name", ["t5", "fire", "kerple_power"])
def test_forward_runs_no_numpy_initialiser(backend, name, monkeypatch):
    module, xp = lp.framework_module(backend), load(backend)()
    layer = module.MultiHeadAttention(8, 2, name, causal=True, seed=1)
    x = xp.from_numpy(_x(1, 5, 8))
    expected = xp.to_numpy(layer(x))

    def forbidden(*args, **kwargs):
        raise AssertionError("NumPy random code on the forward path")

    monkeypatch.setattr(np.random, "default_rng", forbidden)
    monkeypatch.setattr(type(layer.positional_bias.spec), "init_params", forbidden)
    np.testing.assert_array_equal(xp.to_numpy(layer(x)), expected)
    y, _ = layer(x, cache=layer.init_cache(1, 6))
    np.testing.assert_allclose(xp.to_numpy(y), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", *FRAMEWORKS])
@pytest.mark.parametrize(
    ("seed", "error", "message"),
    [
        (1.5, posbias.InvalidTypeError, "seed must be an integer"),
        (True, posbias.InvalidTypeError, "seed must be an integer"),
        (None, posbias.InvalidTypeError, "seed must be an integer"),
        (-1, posbias.InvalidArgumentError, "seed must be >= 0"),
    ],
)
def test_bad_seeds(backend, seed, error, message):
    module = lp.framework_module(backend)
    with pytest.raises(error, match=message):
        module.PositionalBias("t5", 2, seed=seed)
    with pytest.raises(error, match=message):
        module.MultiHeadAttention(8, 2, None, seed=seed)


@pytest.mark.parametrize("backend", ["numpy", *FRAMEWORKS])
def test_bad_bias_parameter_dicts(backend):
    pb = lp.framework_module(backend).PositionalBias("t5", 2)
    before = pb.export_params()
    with pytest.raises(posbias.InvalidTypeError, match="dict"):
        pb.load_params(np.zeros((32, 2)))
    with pytest.raises(posbias.InvalidArgumentError, match=r"missing \['table'\]"):
        pb.load_params({"tabel": np.zeros((32, 2))})
    with pytest.raises(posbias.InvalidTypeError, match="real numbers"):
        pb.load_params({"table": np.full((32, 2), "x")})
    with pytest.raises(posbias.InvalidArgumentError, match="NaN"):
        pb.load_params({"table": np.full((32, 2), np.nan)})
    np.testing.assert_array_equal(pb.export_params()["table"], before["table"])


def test_portable_weights_move_between_frameworks(fw):
    module, _xp = fw
    source = pnp.MultiHeadAttention(24, 3, causal=True, num_kv_heads=1, seed=11)
    layer = module.MultiHeadAttention(24, 3, causal=True, num_kv_heads=1, seed=0)
    layer.load_portable_weights(source.portable_weights())
    exported = layer.portable_weights()
    for name, value in source.portable_weights().items():
        np.testing.assert_array_equal(exported[name], value)


def _bhld(xp, shape):
    """Ones of a (B, H, L, D) shape, in the framework's own layout."""
    return xp.from_numpy(lp._to_layout(np.ones(shape, np.float32), xp.name))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda m, xp: m.attention(
                *(_bhld(xp, s) for s in [(1, 4, 3, 8), (1, 4, 3, 8), (1, 4, 5, 8)])
            ),
            posbias.InvalidArgumentError,
            "same batch, heads and length",
        ),
        (
            lambda m, xp: m.attention(
                *(_bhld(xp, s) for s in [(2, 4, 3, 8), (1, 4, 3, 8), (1, 4, 3, 8)])
            ),
            posbias.InvalidArgumentError,
            "batch size",
        ),
        (
            lambda m, xp: m.attention(
                *(_bhld(xp, s) for s in [(1, 6, 3, 8), (1, 4, 3, 8), (1, 4, 3, 8)])
            ),
            posbias.InvalidArgumentError,
            "multiple",
        ),
        (
            lambda m, xp: m.attention(
                *(_bhld(xp, s) for s in [(1, 4, 3, 8), (1, 4, 3, 4), (1, 4, 3, 4)])
            ),
            posbias.InvalidArgumentError,
            "head dims",
        ),
        (
            lambda m, xp: m.attention(
                *(_bhld(xp, (1, 4, 3, 8)),) * 3,
                key_mask=xp.from_numpy(np.ones((1, 4), bool)),
            ),
            posbias.InvalidArgumentError,
            "shape",
        ),
        (
            lambda m, xp: m.attention(
                *(_bhld(xp, (1, 4, 3, 8)),) * 3,
                key_mask=xp.from_numpy(np.ones((1, 3), np.int64)),
            ),
            posbias.InvalidTypeError,
            "boolean",
        ),
        (
            lambda m, xp: m.attention(
                _bhld(xp, (1, 4, 5, 8)), *(_bhld(xp, (1, 4, 3, 8)),) * 2, causal=True
            ),
            posbias.InvalidArgumentError,
            "longer than the keys",
        ),
        (
            lambda m, xp: m.attention(
                *(_bhld(xp, (1, 4, 3, 8)),) * 3, posbias.get("alibi", num_heads=2)
            ),
            posbias.InvalidArgumentError,
            "per query head",
        ),
        (lambda m, xp: m.MultiHeadAttention(30, 4), posbias.InvalidArgumentError, "not divisible"),
        (
            lambda m, xp: m.MultiHeadAttention(32, 4, num_kv_heads=3),
            posbias.InvalidArgumentError,
            "multiple of num_kv_heads",
        ),
        (lambda m, xp: m.MultiHeadAttention(32, 0), posbias.InvalidArgumentError, ">= 1"),
        (
            lambda m, xp: m.MultiHeadAttention(32, 4)(
                xp.from_numpy(np.ones((1, 3, 16), np.float32))
            ),
            posbias.InvalidArgumentError,
            "embed_dim=32",
        ),
        (
            lambda m, xp: m.MultiHeadAttention(32, 4).load_portable_weights(
                {"q.kernel": np.ones(3)}
            ),
            posbias.InvalidArgumentError,
            "missing",
        ),
    ],
)
def test_bad_input(fw, call, error, message):
    module, xp = fw
    with pytest.raises(error, match=message):
        call(module, xp)


def test_cache_errors(fw):
    module, xp = fw
    layer = _layer(module)
    cache = layer.init_cache(batch_size=2, capacity=4)
    with pytest.raises(posbias.InvalidArgumentError, match="capacity"):
        layer(xp.from_numpy(_x(2, 5)), cache=cache)
    with pytest.raises(posbias.InvalidArgumentError, match="batch size 2"):
        layer(xp.from_numpy(_x(3, 1)), cache=cache)
    _, cache = layer(xp.from_numpy(_x(2, 3)), cache=cache)
    with pytest.raises(posbias.InvalidArgumentError, match="3 slots used"):
        layer(xp.from_numpy(_x(2, 2)), cache=cache)
    bidirectional = module.MultiHeadAttention(24, 3, causal=False)
    with pytest.raises(posbias.InvalidArgumentError, match="causal"):
        bidirectional(xp.from_numpy(_x(2, 1)), cache=bidirectional.init_cache(2, 4))
