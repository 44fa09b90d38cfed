"""MultiHeadAttention(gate="forgetting" | "cable"): forget-gate layers (FoX, CABLE) on every
framework against a float64 reference written from the papers and against x-transformers."""

import numpy as np
import pytest

import posbias
from conftest import FRAMEWORKS
from posbias import numpy as pnp
from posbias.backends import load
from posbias.testing import _gates_reference as ref
from posbias.testing import _layers as lp

pytestmark = pytest.mark.skipif(not FRAMEWORKS, reason="no framework under test")

E, H = 24, 3
GATES = ["forgetting", "cable"]


def _setup(framework):
    return lp.framework_module(framework), load(framework)()


def _x(batch=2, length=9, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, length, E)).astype(np.float32)


def _weights(causal, seed=5, **kwargs):
    """Random portable weights with a strong, varied gate (gates between ~0 and ~-4)."""
    source = pnp.MultiHeadAttention(E, H, None, causal=causal, gate="cable", **kwargs)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in source.portable_shapes().items():
        scale = 0.5 if name.startswith("gate") else 0.3
        weights[name] = rng.normal(0, scale, size=shape).astype(np.float32)
    return weights


def _layer(module, gate="forgetting", causal=True, bias=None, weights=None, **kwargs):
    layer = module.MultiHeadAttention(E, H, bias, causal=causal, gate=gate, **kwargs)
    layer.load_portable_weights(_weights(causal, **kwargs) if weights is None else weights)
    return layer


def _reference(weights, x, gate, causal, positional=None):
    """The layer in float64 from the papers' formulas (no posbias engine): projections,
    ``g`` = logsigmoid / -softplus, ``bias = G_i - G_j`` (and ``g'`` after the query)."""
    x = x.astype(np.float64)
    batch, length, _ = x.shape

    def project(name):
        out = x @ weights[f"{name}.kernel"].astype(np.float64)
        return out + weights.get(f"{name}.bias", 0.0)

    q, k, v = (
        project(n).reshape(batch, length, H, -1).transpose(0, 2, 1, 3) for n in ("q", "k", "v")
    )
    make = ref.fox_log_gates if gate == "forgetting" else ref.cable_log_gates
    g = make(x, weights["gate.kernel"], weights["gate.bias"])  # (B, H or 2H, L)
    scores = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(q.shape[-1])
    scores = scores + ref.gate_bias(g[:, :H], None if causal else g[:, H:])
    if positional is not None:
        scores = scores + positional
    if causal:
        scores = np.where(np.tri(length, dtype=bool), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhij,bhjd->bhid", probs, v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    return out @ weights["o.kernel"] + weights.get("o.bias", 0.0)


def _bhl(xp, g):
    """Log-gates of ``layer.log_gates`` as NumPy ``(B, H, L)``."""
    g = xp.to_numpy(g)
    return g if lp.LAYOUT[xp.name] == "bhld" else np.swapaxes(g, 1, 2)


# ------------------------------------------------------------------ the formulas
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [None, "alibi"])
def test_layer_matches_the_float64_reference(framework, gate, causal, bias):
    module, xp = _setup(framework)
    weights = _weights(causal)
    layer = _layer(module, gate, causal, bias, weights)
    x = _x()
    positional = None if bias is None else pnp.PositionalBias(bias, H)(9, 9)
    want = _reference(weights, x, gate, causal, positional)
    np.testing.assert_allclose(xp.to_numpy(layer(xp.from_numpy(x))), want, rtol=1e-5, atol=1e-5)
    numpy_layer = _layer(pnp, gate, causal, bias, weights)  # the float64 twin
    np.testing.assert_allclose(numpy_layer(x), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gate", GATES)
def test_log_gates_are_the_papers_formulas(framework, gate):
    module, xp = _setup(framework)
    weights = _weights(causal=False)
    layer = _layer(module, gate, causal=False, weights=weights)
    x = _x()
    make = ref.fox_log_gates if gate == "forgetting" else ref.cable_log_gates
    want = make(x, weights["gate.kernel"], weights["gate.bias"])
    before, after = layer.log_gates(xp.from_numpy(x))
    assert xp.dtype_name(before.dtype) == "float32"
    np.testing.assert_allclose(_bhl(xp, before), want[:, :H], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_bhl(xp, after), want[:, H:], rtol=1e-5, atol=1e-6)
    causal = _layer(module, gate, causal=True)
    assert tuple(xp.shape(causal.log_gates(xp.from_numpy(x)))) == tuple(
        (2, H, 9) if lp.LAYOUT[framework] == "bhld" else (2, 9, H)
    )


# ------------------------------------------------------------ weights, initialisation
@pytest.mark.parametrize("causal", [True, False])
def test_gate_projection_shapes_and_initialisation(framework, causal):
    module, _xp = _setup(framework)
    layer = module.MultiHeadAttention(E, H, causal=causal, gate="forgetting", use_bias=False)
    width = H if causal else 2 * H
    shapes = layer.portable_shapes()
    assert shapes["gate.kernel"] == (E, width) and shapes["gate.bias"] == (width,)
    weights = layer.portable_weights()
    assert not weights["gate.bias"].any()  # bias 0, kernel N(0, 0.02²) (FoX's, CABLE's code)
    assert 0.01 < weights["gate.kernel"].std() < 0.03
    # every framework starts from the same seeded values; the other projections are unchanged
    twin = pnp.MultiHeadAttention(E, H, causal=causal, gate="cable", use_bias=False)
    plain = pnp.MultiHeadAttention(E, H, causal=causal, use_bias=False)
    for name, value in twin.portable_weights().items():
        np.testing.assert_array_equal(weights[name], value)
        if not name.startswith("gate"):
            np.testing.assert_array_equal(value, plain.portable_weights()[name])


@pytest.mark.skipif("torch" not in FRAMEWORKS, reason="needs torch")
@pytest.mark.parametrize("causal", [True, False])
def test_torch_weights_give_the_same_outputs_everywhere(framework, causal):
    import posbias.torch

    module, xp = _setup(framework)
    source = posbias.torch.MultiHeadAttention(E, H, "alibi", causal=causal, gate="cable", seed=4)
    source.load_portable_weights(_weights(causal, seed=9))
    x = _x(seed=3)
    want = source(posbias.torch.TorchBackend().from_numpy(x)).detach().numpy()
    for target in (module, pnp):  # the framework's layer, and the NumPy twin (round trip)
        layer = target.MultiHeadAttention(E, H, "alibi", causal=causal, gate="cable", seed=0)
        layer.load_portable_weights(source.portable_weights())
        out = layer(x) if target is pnp else xp.to_numpy(layer(xp.from_numpy(x)))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        exported = layer.portable_weights()
        for name, value in source.portable_weights().items():
            np.testing.assert_array_equal(exported[name], value)


def test_loading_weights_without_the_gate_is_an_error(framework):
    module, _xp = _setup(framework)
    layer = module.MultiHeadAttention(E, H, causal=True, gate="forgetting")
    plain = pnp.MultiHeadAttention(E, H, causal=True).portable_weights()
    with pytest.raises(posbias.InvalidArgumentError, match=r"missing \['gate.bias', 'gate.kernel'"):
        layer.load_portable_weights(plain)
    with pytest.raises(posbias.InvalidArgumentError, match=r"unexpected \['gate.bias'"):
        module.MultiHeadAttention(E, H, causal=True).load_portable_weights(layer.portable_weights())


# ------------------------------------------------------------- padding, packing, cache
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_unpadded_outputs(framework, side):
    module, xp = _setup(framework)
    layer = _layer(module, "forgetting", causal=True, bias="alibi")
    x = _x(batch=1, length=5)
    pad = np.zeros((1, 3, E), np.float32) + 5.0  # garbage in padded slots (gates included)
    padded = np.concatenate([pad, x], 1) if side == "left" else np.concatenate([x, pad], 1)
    mask = np.ones((1, 8), bool)
    mask[0, :3] = side != "left"
    mask[0, 5:] = side == "left"
    real = slice(3, 8) if side == "left" else slice(0, 5)
    out = xp.to_numpy(layer(xp.from_numpy(padded), key_mask=xp.from_numpy(mask)))
    alone = xp.to_numpy(layer(xp.from_numpy(x)))
    np.testing.assert_allclose(out[:, real], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_packing_gives_the_separate_outputs(framework, causal):
    module, xp = _setup(framework)
    layer = _layer(module, "cable", causal=causal, bias="alibi")
    a, b = _x(1, 3, seed=1), _x(1, 5, seed=2)
    segments = np.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    packed = xp.from_numpy(np.concatenate([a, b], 1))
    out = xp.to_numpy(layer(packed, segment_ids=xp.from_numpy(segments)))
    np.testing.assert_allclose(out[:, :3], xp.to_numpy(layer(xp.from_numpy(a))), atol=1e-5)
    np.testing.assert_allclose(out[:, 3:], xp.to_numpy(layer(xp.from_numpy(b))), atol=1e-5)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("steps", [[1] * 9, [4, 1, 1, 3], [5, 2, 2]])
def test_decoding_step_by_step_equals_full_forward(framework, gate, steps):
    module, xp = _setup(framework)
    layer = _layer(module, gate, causal=True, bias="alibi", num_kv_heads=1)
    x = _x(batch=2, length=9)
    mask = np.ones((2, 9), bool)
    mask[1, :2] = False  # left-padded second sequence: per-sequence cache lengths differ
    full = xp.to_numpy(layer(xp.from_numpy(x), key_mask=xp.from_numpy(mask)))
    cache = layer.init_cache(batch_size=2, capacity=11)
    assert tuple(xp.shape(cache.log_gates)) == (2, H, 11)  # g per slot, not cumsum G
    outs, start = [], 0
    for size in steps:  # a prefill of 4 or 5 tokens, then single steps or a few at a time
        y, cache = layer(
            xp.from_numpy(x[:, start : start + size]),
            key_mask=xp.from_numpy(mask[:, start : start + size]),
            cache=cache,
        )
        outs.append(xp.to_numpy(y))
        start += size
    steps_out = np.concatenate(outs, 1)
    np.testing.assert_allclose(steps_out[0], full[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(steps_out[1, 2:], full[1, 2:], rtol=1e-5, atol=1e-5)
    assert xp.dtype_name(cache.log_gates.dtype) == "float32"
    want = _bhl(xp, layer.log_gates(xp.from_numpy(x))) * mask[:, None, :]
    np.testing.assert_allclose(xp.to_numpy(cache.log_gates)[..., :9], want, rtol=1e-6, atol=1e-7)


def test_numpy_layer_decodes_too():
    layer = _layer(pnp, "forgetting", causal=True, bias="alibi")
    x = _x(batch=1, length=6)
    cache = layer.init_cache(batch_size=1, capacity=6)
    y1, cache = layer(x[:, :4], cache=cache)
    y2, cache = layer(x[:, 4:], cache=cache)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), layer(x), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif("jax" not in FRAMEWORKS, reason="needs jax")
def test_jax_decoding_under_nnx_jit():
    from flax import nnx

    import posbias.jax

    layer = _layer(posbias.jax, "forgetting", causal=True)
    x = _x(batch=1, length=5)
    step = nnx.jit(lambda m, t, c: m(t, cache=c))
    cache = layer.init_cache(batch_size=1, capacity=8)
    outs = []
    for t in range(5):
        y, cache = step(layer, x[:, t : t + 1], cache)
        outs.append(np.asarray(y))
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(layer(x)), atol=1e-5)


# ------------------------------------------------------------------ gradients, dtypes
@pytest.mark.skipif("torch" not in FRAMEWORKS, reason="needs torch")
@pytest.mark.parametrize("causal", [True, False])
def test_torch_gradients_reach_the_gate_projection(causal):
    import torch

    import posbias.torch

    layer = _layer(posbias.torch, "forgetting", causal=causal)
    x = torch.from_numpy(_x(batch=1, length=7))
    layer(x).square().sum().backward()
    got = layer.gate_proj.weight.grad.clone()

    # the same layer materialised in torch: SDPA with the (B, H, L, L) gate bias
    w = {n: torch.from_numpy(a) for n, a in layer.portable_weights().items()}
    g = torch.nn.functional.logsigmoid(x @ w["gate.kernel"].requires_grad_() + w["gate.bias"])
    cum = g.transpose(1, 2).cumsum(-1)  # (B, n, L)
    bias = (cum[:, :H, :, None] - cum[:, :H, None, :]).tril()
    if causal:
        bias = bias.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    else:
        bias = bias + (cum[:, H:, None, :] - cum[:, H:, :, None]).triu(1)
    q, k, v = (
        (x @ w[f"{n}.kernel"] + w[f"{n}.bias"]).reshape(1, 7, H, -1).transpose(1, 2) for n in "qkv"
    )
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.transpose(1, 2).reshape(1, 7, E) @ w["o.kernel"] + w["o.bias"]
    out.square().sum().backward()
    torch.testing.assert_close(got, w["gate.kernel"].grad.T, rtol=1e-4, atol=1e-5)


def test_a_low_precision_layer_computes_its_gate_in_float32(framework):
    module, xp = _setup(framework)
    x = xp.cast(xp.from_numpy(_x(batch=1, length=4)), "bfloat16")
    if framework == "torch":
        import torch

        layer = module.MultiHeadAttention(E, H, None, causal=True, gate="cable").to(torch.bfloat16)
    elif framework == "jax":
        import jax.numpy as jnp

        layer = module.MultiHeadAttention(
            E, H, None, causal=True, gate="cable", param_dtype=jnp.bfloat16
        )
    else:
        layer = module.MultiHeadAttention(
            E, H, None, causal=True, gate="cable", dtype="mixed_bfloat16"
        )
    out = layer(x)
    assert xp.dtype_name(out.dtype) == "bfloat16" and np.isfinite(xp.to_numpy(out)).all()
    assert xp.dtype_name(layer.log_gates(x).dtype) == "float32"


@pytest.mark.skipif("tensorflow" not in FRAMEWORKS, reason="needs tensorflow")
def test_keras_config_round_trip_keeps_the_gate():
    import posbias.tensorflow

    layer = posbias.tensorflow.MultiHeadAttention(E, H, None, causal=False, gate="cable")
    assert layer.get_config()["gate"] == "cable"
    twin = posbias.tensorflow.MultiHeadAttention.from_config(layer.get_config())
    assert twin.mha_config.gate == "cable" and twin.portable_shapes()["gate.kernel"] == (E, 6)
    with pytest.raises(posbias.InvalidArgumentError, match="gate must be one of"):
        posbias.tensorflow.MultiHeadAttention.from_config({**layer.get_config(), "gate": "fox"})


# ------------------------------------------------------------------ x-transformers
@pytest.mark.skipif("torch" not in FRAMEWORKS, reason="needs torch")
@pytest.mark.parametrize("causal", [True, False])
def test_x_transformers_data_dependent_alibi_agrees(causal):
    """Same projection weights as ``DataDependentAlibi`` → the same bias and attention."""
    torch = pytest.importorskip("torch")
    xt = pytest.importorskip("x_transformers.x_transformers")
    import posbias.torch

    torch.manual_seed(0)
    length = 11
    dda = xt.DataDependentAlibi(E, H, causal=causal, bias_init=0.5)
    with torch.no_grad():
        dda.to_forget_gates[0].bias.uniform_(-2, 3)
    layer = posbias.torch.MultiHeadAttention(E, H, None, causal=causal, gate="forgetting")
    linear = dda.to_forget_gates[0]
    with torch.no_grad():
        layer.gate_proj.weight.copy_(linear.weight)
        layer.gate_proj.bias.copy_(linear.bias)
    x = torch.randn(2, length, E)
    with torch.no_grad():
        theirs = dda(x).double()  # (B, H, L, L)
        gates = layer.log_gates(x)
        ours = ref.gate_bias(*(g.double().numpy() for g in (gates if not causal else [gates])))
        lower = np.tri(length, dtype=bool)
        keep = lower if causal else np.ones_like(lower)  # causal: x-transformers' upper is masked
        np.testing.assert_allclose(ours[..., keep], theirs.numpy()[..., keep], atol=1e-5)

        # the attention with those gates: posbias's layer vs SDPA with x-transformers' bias
        q, k, v = (
            getattr(layer, f"{n}_proj")(x).reshape(2, length, H, -1).transpose(1, 2) for n in "qkv"
        )
        mask = theirs.float()
        if causal:
            mask = mask.masked_fill(~torch.from_numpy(lower), float("-inf"))
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        want = layer.o_proj(want.transpose(1, 2).reshape(2, length, E))
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ wrong inputs
@pytest.mark.parametrize("gate", ["fox", "Forgetting", 1, True, ""])
def test_a_wrong_gate_is_an_error(backend, gate):
    module = lp.framework_module(backend)
    with pytest.raises(posbias.InvalidArgumentError) as info:
        module.MultiHeadAttention(E, H, causal=True, gate=gate)
    message = str(info.value)
    assert "gate must be one of ['forgetting', 'cable'] or None" in message
    assert f"got {gate!r}" in message


def test_cross_attention_with_a_gate_is_an_error(framework):
    module, xp = _setup(framework)
    layer = _layer(module, "forgetting", causal=False)
    x, memory = xp.from_numpy(_x(1, 4)), xp.from_numpy(_x(1, 6, seed=1))
    cross = {"torch": {"key": memory}, "jax": {"inputs_k": memory}}.get(
        framework, {"value": memory}
    )
    with pytest.raises(posbias.InvalidArgumentError, match="gate='forgetting' is self-attention"):
        layer(x, **cross)


def test_caches_of_another_layer_are_errors(framework):
    module, xp = _setup(framework)
    gated = _layer(module, "forgetting", causal=True)
    plain = module.MultiHeadAttention(E, H, causal=True)
    x = xp.from_numpy(_x(1, 2))
    with pytest.raises(posbias.InvalidArgumentError, match="cache holds no log-gates"):
        gated(x, cache=plain.init_cache(batch_size=1, capacity=4))
    with pytest.raises(posbias.InvalidArgumentError, match="layer has gate=None"):
        plain(x, cache=gated.init_cache(batch_size=1, capacity=4))
    wide = module.MultiHeadAttention(E, 2 * H, causal=True, gate="forgetting")
    with pytest.raises(posbias.InvalidArgumentError, match="log-gates of 6 heads"):
        gated(x, cache=wide.init_cache(batch_size=1, capacity=4))


def test_log_gates_of_a_layer_without_gate_is_an_error(backend):
    module = lp.framework_module(backend)
    layer = module.MultiHeadAttention(E, H, causal=True)
    with pytest.raises(posbias.InvalidArgumentError, match="gate='forgetting' or 'cable'"):
        layer.log_gates(load(backend)().from_numpy(_x(1, 3)))


def test_torch_compiled_gated_layer_prefills_and_decodes_with_grad_enabled():
    """torch.compile of a gated layer with a KV cache (grad mode on, the default) equals
    the eager full forward (a reused in-place mask buffer broke functionalization)."""
    torch = pytest.importorskip("torch")
    import posbias.torch as pt

    torch.manual_seed(0)
    layer = pt.MultiHeadAttention(16, 2, "alibi", causal=True, gate="forgetting")
    x = torch.randn(2, 10, 16)
    full = layer(x)
    compiled = torch.compile(layer)
    cache = layer.init_cache(batch_size=2, capacity=12)
    first, cache = compiled(x[:, :9], cache=cache)
    last, cache = compiled(x[:, 9:], cache=cache)
    assert float((torch.cat([first, last], 1) - full).abs().max()) <= 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_keras_model_with_a_gated_layer_fits(causal):
    """model.fit traces with an unknown batch size (and bidirectional gates under
    tf.function): the loss is finite and the gate projection trains."""
    if "tensorflow" not in FRAMEWORKS:
        pytest.skip("needs tensorflow")
    import keras

    ptf = lp.framework_module("tensorflow")
    layer = ptf.MultiHeadAttention(32, 4, "alibi", causal=causal, gate="cable")
    inputs = keras.Input((9, 32))
    model = keras.Model(inputs, layer(inputs))
    model.compile("adam", "mse")
    before = np.array(layer.portable_weights()["gate.kernel"])
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((4, 9, 32)).astype(np.float32) for _ in range(2))
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.allclose(layer.portable_weights()["gate.kernel"], before)
