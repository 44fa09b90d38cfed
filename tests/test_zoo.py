"""The bias zoo: published values, reference formulas, bad input, learnable parameters."""

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import posbias
from conftest import BACKENDS, FRAMEWORKS, to_np
from posbias.variants.t5 import bucket_thresholds

LEARNABLE_ALL = [n for n in posbias.list_biases() if posbias.registered()[n].learnable]


def _t5_reference_bucket(relative, bidirectional, num_buckets, max_distance):
    """Mesh TensorFlow / HF `_relative_position_bucket`, transcribed in float64 scalars."""
    ret = 0
    n = -relative
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0) * num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(large, num_buckets - 1)


def _buckets(spec, relative):
    """Bucket of each j - i via a table holding the bucket number."""
    table = np.repeat(np.arange(spec.num_buckets, dtype=np.float64)[:, None], spec.num_heads, 1)
    values = spec.bias(q_pos=[0], k_pos=relative, params={"table": table}, dtype="float64")
    return values[0, 0].astype(int)


def test_t5_published_buckets():
    bi = posbias.get("t5", num_heads=1)
    rel = [-8, -16, -32, -64, -91, 1, 16, 64, 91]
    assert _buckets(bi, rel).tolist() == [8, 10, 12, 14, 15, 17, 26, 30, 31]
    causal = posbias.get("t5", num_heads=1, bidirectional=False)
    distances = [16, 32, 64, 112, 113, 1000]
    assert _buckets(causal, [-d for d in distances]).tolist() == [16, 21, 26, 30, 31, 31]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("buckets", "distance"), [(32, 128), (8, 20), (64, 1000), (4, 3)])
def test_t5_matches_reference_formula(bidirectional, buckets, distance):
    spec = posbias.get(
        "t5", num_heads=1, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
    )
    rel = np.arange(-3000, 3001)
    expected = [_t5_reference_bucket(int(r), bidirectional, buckets, distance) for r in rel]
    assert _buckets(spec, rel).tolist() == expected


def test_t5_buckets_agree_on_every_backend_at_exact_log_points(backend):
    spec = posbias.get("t5", num_heads=2)
    table = np.arange(64.0).reshape(32, 2)
    rel = np.array([-64, -63, -32, -31, -16, -15, 15, 16, 31, 32, 63, 64])
    out = to_np(spec.bias(q_pos=[0], k_pos=rel, params={"table": table}, backend=backend))
    ref = spec.bias(q_pos=[0], k_pos=rel, params={"table": table})
    np.testing.assert_array_equal(out, ref)


def test_t5_matches_hf_transformers():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    torch = pytest.importorskip("torch")
    rel = torch.arange(-10_000, 10_001)
    for bidirectional in (True, False):
        hf = t5.T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=32, max_distance=128
        )
        spec = posbias.get("t5", num_heads=1, bidirectional=bidirectional)
        np.testing.assert_array_equal(_buckets(spec, rel.numpy()), hf.numpy())


def test_t5_thresholds_are_integers_computed_once():
    assert bucket_thresholds(16, 128) == (12, 16, 23, 32, 46, 64, 91)


def test_sandwich_published_values():
    spec = posbias.get("sandwich", num_heads=4, head_dim=64)
    values = spec.bias(q_pos=[5], k_pos=np.arange(5, -1, -1), dtype="float64")
    np.testing.assert_allclose(
        values[0, 0], [0, -0.3117, -1.1400, -2.2115, -3.2060, -3.8898], atol=5e-5
    )
    for h in range(4):  # later heads divide by 8(h+1)/H
        np.testing.assert_allclose(values[h, 0], values[0, 0] * 2 / (8 * (h + 1) / 4))


def test_sandwich_causal_zeroes_future():
    spec = posbias.get("sandwich", num_heads=2, head_dim=8, causal=True)
    values = spec.bias(q_pos=[2], k_pos=[0, 1, 2, 3, 4])
    assert (values[:, 0, 3:] == 0).all() and (values[:, 0, :2] < 0).all()


def test_kerple_formulas_init_and_clamp():
    log_spec = posbias.get("kerple_log", num_heads=3)
    params = log_spec.init_params(seed=1)
    assert (params["r1"] >= 0).all() and (params["r1"] <= 2).all() and (params["r2"] <= 1).all()
    d = np.arange(6.0)
    values = log_spec.bias(q_pos=[0], k_pos=np.arange(6), params=params, dtype="float64")
    np.testing.assert_allclose(
        values[:, 0], -params["r1"][:, None] * np.log1p(params["r2"][:, None] * d)
    )
    power = posbias.get("kerple_power", num_heads=2)
    p = {"r1": np.array([1.0, 0.5]), "r2": np.array([0.5, 5.0])}  # exponent clamped to 2
    values = power.bias(q_pos=[0], k_pos=np.arange(4), params=p, dtype="float64")
    np.testing.assert_allclose(values[0, 0], -np.sqrt(d[:4]))
    np.testing.assert_allclose(values[1, 0], -0.5 * d[:4] ** 2)
    tiny = {"r1": np.array([1.0, 1.0]), "r2": np.array([1e-9, 1e-9])}  # clamped up to 0.01
    np.testing.assert_allclose(
        power.bias(q_len=1, k_len=3, params=tiny, dtype="float64")[0, 0],
        -(np.array([2.0, 1.0, 0.0]) ** 0.01) * (np.array([2.0, 1.0, 0.0]) > 0),
    )


@pytest.mark.parametrize("name", ["kerple_log", "kerple_power"])
def test_kerple_parameters_are_raw_and_clamped_in_compute(name):
    """Any finite state (what training can reach) is valid: compute clamps it."""
    spec = posbias.get(name, num_heads=2)
    raw = {"r1": np.array([1.0, -1.0]), "r2": np.array([-3.0, 0.5])}
    clamped = {"r1": np.array([1.0, 0.01]), "r2": np.array([0.01, 0.5])}
    kw = dict(q_len=3, k_len=5, dtype="float64")
    np.testing.assert_array_equal(spec.bias(**kw, params=raw), spec.bias(**kw, params=clamped))
    with pytest.raises(posbias.InvalidArgumentError, match="NaN, infinite or beyond-float32"):
        spec.bias(q_len=2, k_len=2, params={"r1": np.array([1.0, np.inf]), "r2": np.ones(2)})


def _documented_arguments(cls):
    doc = cls.__doc__ or ""
    if "Args:" not in doc:
        return []
    block = doc.split("Args:", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^ {8}(\w+):", block, flags=re.MULTILINE)


@pytest.mark.parametrize("name", posbias.list_biases())
def test_documented_arguments_are_the_fields(name):
    """A docstring's Args name constructor keywords (``custom_slopes``, not ``slopes``)."""
    cls = posbias.registered()[name]
    documented = _documented_arguments(cls)
    assert set(documented) <= set(cls.parameter_names()), documented
    if cls is posbias.Alibi:
        assert set(documented) == set(cls.parameter_names())


@pytest.mark.parametrize("name", posbias.list_biases())
def test_param_shapes_are_declared_not_derived(name, monkeypatch):
    """param_shapes() comes from the hyper-parameters (no initialiser, no random numbers)
    and equals the shapes init_params() returns."""
    for spec in posbias.registered()[name].parity_examples(3):
        initial = spec.init_params(seed=2)
        assert spec.learnable == bool(initial)
        with monkeypatch.context() as patch:
            patch.setattr(type(spec), "init_params", _forbidden)
            patch.setattr(np.random, "default_rng", _forbidden)
            shapes = spec.param_shapes()
        assert shapes == {k: np.shape(v) for k, v in initial.items()}
        assert list(shapes) == list(initial)


def _forbidden(*args, **kwargs):
    raise AssertionError("param_shapes() must not run the initialiser")


@pytest.mark.parametrize("name", LEARNABLE_ALL)
def test_non_finite_parameters_are_rejected(name):
    spec = posbias.registered()[name].parity_examples(2)[0]
    params = spec.init_params()
    key = next(iter(params))
    params[key] = np.full(np.shape(params[key]), np.nan)
    with pytest.raises(posbias.InvalidArgumentError, match=f"{key}.*NaN, infinite"):
        spec.check_params(params)
    params[key] = np.full(np.shape(params[key]), "x")
    with pytest.raises(posbias.InvalidTypeError, match=f"{key}.*real numbers"):
        spec.check_params(params)
    with pytest.raises(posbias.InvalidTypeError, match="dict"):
        spec.check_params([1.0])


def _fire_reference(params, q, k, init_L=512.0, eps=1e-6):
    """The FIRE paper's PyTorch reference, transcribed in float64 NumPy."""
    i = np.asarray(q, float)[:, None]
    rel = i - np.asarray(k, float)[None, :]
    threshold = abs(params["L_multiplier"] * init_L)
    normaliser = np.log(np.abs(params["c"] * np.maximum(i, threshold)) + 1) + eps
    x = np.log(np.abs(params["c"] * rel) + 1) / normaliser
    hidden = np.maximum(x[..., None] * params["w1"] + params["b1"], 0)
    return np.moveaxis(hidden @ params["w2"] + params["b2"], -1, 0)


def test_fire_matches_reference_and_is_not_toeplitz():
    spec = posbias.get("fire", num_heads=3, mlp_width=8, init_L=4.0)
    params = spec.init_params(seed=2)
    q, k = np.arange(10), np.arange(10)
    values = spec.bias(q_pos=q, k_pos=k, params=params, dtype="float64")
    np.testing.assert_allclose(values, _fire_reference(params, q, k, init_L=4.0), rtol=1e-12)
    assert not np.allclose(values[:, 9, 8], values[:, 5, 4])  # same i - j, different i
    assert not spec.toeplitz


def test_alibi_learned_starts_as_alibi_and_scaled_rules():
    learned = posbias.get("alibi_learned", num_heads=12)
    np.testing.assert_allclose(
        learned.bias(q_len=4, k_len=9, dtype="float64"),
        posbias.get("alibi", num_heads=12).bias(q_len=4, k_len=9, dtype="float64"),
    )
    static = posbias.get("alibi_scaled", num_heads=8, scale=0.25)
    np.testing.assert_array_equal(static.slopes, posbias.alibi_slopes(8) * 0.25)
    dynamic = posbias.get("alibi_scaled", num_heads=1, custom_slopes=[1.0], train_length=4)
    values = dynamic.bias(q_pos=[1, 3, 7, 15], k_pos=[0], dtype="float64")[0, :, 0]
    np.testing.assert_allclose(values, [-1.0, -3.0, -7.0 * 4 / 8, -15.0 * 4 / 16])


def _swin_index(wh, ww):
    """Swin V1's `relative_position_index`, transcribed."""
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def test_swin_matches_its_relative_position_index():
    spec = posbias.get("swin", num_heads=2, window=(3, 4))
    table = np.arange(35 * 2, dtype=np.float64).reshape(35, 2)
    values = spec.bias(q_len=12, k_len=12, params={"table": table}, dtype="float64")
    np.testing.assert_array_equal(values, np.moveaxis(table[_swin_index(3, 4)], -1, 0))
    points = np.array([[r, c] for r in range(3) for c in range(4)])
    np.testing.assert_array_equal(
        spec.bias(q_pos=points, k_pos=points, params={"table": table}, dtype="float64"), values
    )


def test_swin_v2_cpb_and_alibi_2d():
    cpb = posbias.get("swin_v2_cpb", num_heads=3, window=(4, 4), hidden=16)
    values = cpb.bias(q_len=16, k_len=16)
    assert values.shape == (3, 16, 16) and ((values > 0) & (values < 16)).all()
    a2 = posbias.get("alibi_2d", num_heads=2)
    out = a2.bias(q_pos=[[1, 1]], k_pos=[[1, 1], [4, 5], [1, 0]], dtype="float64")
    np.testing.assert_allclose(out[:, 0], -a2.slopes[:, None] * np.array([0.0, 5.0, 1.0]))


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("t5", dict(num_buckets=1), ">= 2"),
        ("t5", dict(num_buckets=2), ">= 4"),
        ("t5", dict(num_buckets=31), "even"),
        ("t5", dict(num_buckets=32, max_distance=16), "exceed"),
        ("t5", dict(num_buckets=32, bidirectional=False, max_distance=16), "exceed"),
        ("fire", dict(mlp_width=0), ">= 1"),
        ("sandwich", dict(head_dim=7), "even"),
        ("swin", dict(window=(0, 3)), ">= 1"),
        ("swin", dict(window=(1, 2, 3)), "rows, cols"),
        ("alibi_scaled", dict(train_length=0), ">= 1"),
    ],
)
def test_bad_hyper_parameters(name, kwargs, message):
    with pytest.raises(posbias.PosBiasError, match=message):
        posbias.get(name, num_heads=2, **kwargs)


def test_2d_positions_must_be_points():
    spec = posbias.get("alibi_2d", num_heads=2)
    with pytest.raises(posbias.InvalidArgumentError, match=r"\(L, 2\)"):
        spec.bias(q_pos=np.zeros((3, 3), int), k_pos=np.zeros((3, 2), int))
    with pytest.raises(posbias.InvalidArgumentError, match="grid"):
        spec.bias(q_len=3, k_len=3)
    with pytest.raises(posbias.InvalidArgumentError, match="batch size"):
        spec.bias(q_pos=np.zeros((2, 3, 2), int), k_pos=np.zeros((3, 4, 2), int))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, r"missing \['table'\]"),
        ({"table": np.zeros((32, 2)), "extra": np.zeros(1)}, r"unexpected \['extra'\]"),
        ({"table": np.zeros((31, 2))}, r"'table' has shape \(31, 2\), expected \(32, 2\)"),
    ],
)
def test_bad_parameter_dicts(params, message):
    with pytest.raises(posbias.InvalidArgumentError, match=message):
        posbias.get("t5", num_heads=2).bias(q_len=2, k_len=2, params=params)


@given(st.integers(2, 64).map(lambda n: 2 * n), st.integers(1, 500))
def test_t5_bucket_property(num_buckets, max_distance):
    if max_distance <= num_buckets // 2:
        return
    spec = posbias.get("t5", num_heads=1, num_buckets=num_buckets, max_distance=max_distance)
    rel = np.arange(-600, 601)
    buckets = _buckets(spec, rel)
    assert buckets.min() >= 0 and buckets.max() < num_buckets
    past = buckets[rel <= 0][::-1]  # distances 0, 1, 2, ...
    assert (np.diff(past) >= 0).all()
    expected = [_t5_reference_bucket(int(r), True, num_buckets, max_distance) for r in rel]
    assert buckets.tolist() == expected


# ------------------------------------------------------------- learnable modules
LEARNABLE = ["t5", "kerple_log", "kerple_power", "fire", "alibi_learned", "swin", "swin_v2_cpb"]


def _module_bias(module, backend):
    if module.spec.position_dims == 2:
        qp = kp = np.array([[r, c] for r in range(2) for c in range(3)])
    else:
        qp, kp = np.arange(3, 8), np.arange(9)
    from posbias.backends import load

    xp = load(backend)()
    return (
        module(q_pos=xp.from_numpy(qp), k_pos=xp.from_numpy(kp))
        if backend != "tensorflow"
        else module(xp.from_numpy(qp), xp.from_numpy(kp))
    )


def _framework_module(backend):
    from posbias.testing import _layers as _layer_parity

    return _layer_parity.framework_module(backend)


@pytest.mark.parametrize("name", LEARNABLE)
def test_learnable_parameters_are_framework_parameters_and_portable(name):
    spec = posbias.get(name, num_heads=3)
    shared = {k: v + 0.01 for k, v in spec.init_params(seed=5).items()}
    outputs = {}
    for backend in BACKENDS:
        module = _framework_module(backend).PositionalBias(name, 3, seed=1)
        exported = module.export_params()
        assert set(exported) == set(spec.param_shapes())
        module.load_params(shared)
        for k, v in module.export_params().items():
            np.testing.assert_allclose(v, shared[k].astype(np.float32))
        outputs[backend] = to_np(_module_bias(module, backend))
        if backend == "torch":
            assert {n for n, _ in module.named_parameters()} == {f"params.{k}" for k in shared}
        elif backend == "jax":
            from flax import nnx

            assert len(nnx.state(module, nnx.Param)) == len(shared)
        elif backend == "numpy":  # float64 arrays holding the float32 values
            for k, v in module.params.items():
                assert v.dtype == np.float64
                np.testing.assert_array_equal(v, shared[k].astype(np.float32))
        else:
            assert len(module.trainable_weights) == len(shared)
    reference = outputs[BACKENDS[0]]
    for backend, out in outputs.items():
        np.testing.assert_allclose(out, reference, rtol=2e-5, atol=2e-5, err_msg=backend)


def _gradients(backend, name, params, weights):
    """d/dparams of sum(bias * weights) on one framework."""
    spec = posbias.get(name, num_heads=3)
    kw = dict(q_pos=np.arange(3, 8), k_pos=np.arange(9))
    if spec.position_dims == 2:
        pts = np.array([[r, c] for r in range(2) for c in range(3)])
        kw = dict(q_pos=pts, k_pos=pts)
    if backend == "torch":
        import torch

        tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        out = spec.bias(**kw, params=tensors, backend="torch")
        (out * torch.as_tensor(weights)).sum().backward()
        return {k: t.grad.numpy() for k, t in tensors.items()}
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def loss(p):
            return jnp.sum(spec.bias(**kw, params=p, backend="jax") * weights)

        grads = jax.grad(loss)({k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
        return {k: np.asarray(v) for k, v in grads.items()}
    import tensorflow as tf

    variables = {k: tf.Variable(v.astype(np.float32)) for k, v in params.items()}
    with tf.GradientTape() as tape:
        out = spec.bias(**kw, params=variables, backend="tensorflow")
        loss = tf.reduce_sum(out * weights.astype(np.float32))
    grads = tape.gradient(loss, variables)
    return {k: tf.convert_to_tensor(grads[k]).numpy() for k in variables}


@pytest.mark.skipif(len(FRAMEWORKS) < 2, reason="needs two frameworks")
@pytest.mark.parametrize("name", LEARNABLE)
def test_gradients_agree_across_frameworks(name):
    spec = posbias.get(name, num_heads=3)
    params = {k: (v + 0.05).astype(np.float32) for k, v in spec.init_params(seed=3).items()}
    shape = (3, 5, 9) if spec.position_dims == 1 else (3, 6, 6)
    weights = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    grads = {b: _gradients(b, name, params, weights) for b in FRAMEWORKS}
    first = FRAMEWORKS[0]
    for backend in FRAMEWORKS[1:]:
        for key in params:
            scale = max(np.abs(grads[first][key]).max(), 1e-3)
            np.testing.assert_allclose(
                grads[backend][key],
                grads[first][key],
                rtol=1e-4,
                atol=1e-4 * scale,
                err_msg=f"{backend} {key}",
            )


def test_params_file_round_trip(tmp_path):
    from posbias.params_io import load_params, save_params

    params = posbias.get("fire", num_heads=2).init_params(seed=4)
    for suffix in (".npz", ".safetensors"):
        path = tmp_path / f"p{suffix}"
        if suffix == ".safetensors":
            pytest.importorskip("safetensors")
        save_params(params, path)
        loaded = load_params(path)
        assert set(loaded) == set(params)
        for k in params:
            np.testing.assert_array_equal(loaded[k], params[k])


def test_backends_list_is_consistent():
    assert set(FRAMEWORKS) <= set(BACKENDS)


@pytest.mark.parametrize("causal", [False, True])
def test_t5_matches_x_transformers_relative_position_bias(causal):
    """x-transformers' RelativePositionBias returns table[bucket] * scale (its convention:
    the module multiplies by the `scale` it is built with, dim_head ** 0.5 in its
    Attention); posbias returns table[bucket]. Buckets and alignment agree."""
    xt = pytest.importorskip("x_transformers.x_transformers")
    torch = pytest.importorskip("torch")
    module = xt.RelativePositionBias(scale=8.0, causal=causal, heads=4)
    spec = posbias.get("t5", num_heads=4, bidirectional=not causal)
    table = module.relative_attention_bias.weight.detach().numpy()
    with torch.no_grad():
        theirs = module(7, 300).numpy()  # 7 queries, 300 keys, bottom-right aligned
    ours = spec.bias(q_len=7, k_len=300, params={"table": table})
    np.testing.assert_array_equal(ours * 8.0, theirs)
    rel = torch.arange(-5000, 5001)
    buckets = xt.RelativePositionBias._relative_position_bucket(rel, causal=causal)
    np.testing.assert_array_equal(_buckets(spec, rel.numpy()), buckets.numpy())
