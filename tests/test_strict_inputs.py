"""Never a silent wrong answer: named regression tests for bad and edge-case inputs.

Each test is an example from the strict-validation issue: before, it returned a
wrong answer, NaN, or a framework's own exception; now it gives the right answer
or a posbias error naming the argument.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import posbias
from conftest import BACKENDS, FRAMEWORKS, native, to_np
from posbias.params_io import load_params, save_params
from posbias.testing import _layers as lp


def _needs(backend: str) -> None:
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not under test")


# ------------------------------------------------------------------ types, dtypes
def test_bias_dtype_none_is_an_error_not_float64(backend):
    with pytest.raises(posbias.InvalidTypeError, match="dtype must be a float dtype, got None"):
        posbias.get("alibi", num_heads=1).bias(2, 2, dtype=None, backend=backend)


def test_a_variant_must_return_one_value_per_head():
    class Headless(posbias.BiasSpec):  # forgets the heads axis: was broadcast over heads
        def compute(self, xp, q_pos, k_pos, heads, params):
            return xp.float(-xp.abs(k_pos - q_pos))

    with pytest.raises(posbias.InvalidArgumentError, match=r"compute\(\) returned shape"):
        Headless(num_heads=2).bias(2, 3)


def test_a_variant_without_compute_is_a_posbias_error(isolated_registry):
    class Empty(posbias.BiasSpec):
        pass

    with pytest.raises(posbias.InvalidTypeError, match="does not implement compute"):
        Empty(num_heads=1).bias(2, 2)
    with pytest.raises(posbias.RegistryError, match="does not implement compute"):
        posbias.register("test/empty")(Empty)


def test_unknown_names_suggest_case_insensitively():
    with pytest.raises(posbias.UnknownBiasError, match="Did you mean 'alibi'"):
        posbias.get("ALIBI", num_heads=1)


# ------------------------------------------------------------------------ ranges
def test_jax_without_x64_refuses_positions_beyond_int32():
    _needs("jax")
    spec = posbias.get("alibi", num_heads=1)
    with pytest.raises(posbias.InvalidArgumentError, match="jax_enable_x64"):
        spec.bias(q_pos=np.array([2**32 + 3]), k_pos=np.array([0]), backend="jax")
    with pytest.raises(posbias.InvalidArgumentError, match="jax_enable_x64"):
        spec.bias(1, 1, q_offset=2**31, backend="jax")
    t5 = posbias.get("t5", num_heads=1)
    with pytest.raises(posbias.InvalidArgumentError, match="jax_enable_x64"):
        t5.bias(q_pos=np.array([2**31 + 5]), k_pos=np.array([0]), backend="jax")


def test_alibi_2d_rows_beyond_the_encoding_are_exact_or_refused(backend):
    spec = posbias.get("alibi_2d", num_heads=1)
    kwargs = dict(q_pos=np.array([[3000, 5]]), k_pos=np.array([[0, 0]]))
    expected = -np.hypot(3000, 5) * posbias.alibi_slopes(1)[0]
    if backend == "jax":
        with pytest.raises(posbias.InvalidArgumentError, match="row <"):
            spec.bias(**kwargs, backend=backend)
    else:
        got = to_np(spec.bias(**kwargs, backend=backend))
        np.testing.assert_allclose(got[0, 0, 0], expected, rtol=1e-6)


def test_two_d_points_as_native_tensors_are_range_checked(framework):
    spec = posbias.get("swin", num_heads=1, window=(2, 2))
    bad = native(framework, np.array([[0, -1]]))
    with pytest.raises(posbias.InvalidArgumentError, match=r"\(row, col\) points"):
        spec.bias(q_pos=bad, k_pos=native(framework, np.array([[0, 0]])))


# ------------------------------------------------------------------ empty shapes
def test_no_queries_give_an_empty_output_and_no_keys_zeros(backend):
    module = lp.framework_module(backend)
    q0 = native(backend, lp._to_layout(np.ones((1, 2, 0, 4), np.float32), backend))
    q3 = native(backend, lp._to_layout(np.ones((1, 2, 3, 4), np.float32), backend))
    out = to_np(module.attention(q0, q3, q3, "alibi"))
    assert lp._to_layout(out, backend).shape == (1, 2, 0, 4)
    out = to_np(module.attention(q3, q0, q0, "alibi"))
    assert lp._to_layout(out, backend).shape == (1, 2, 3, 4) and not out.any()
    empty = native(backend, np.ones((1, 3, 2, 0), np.float32))
    with pytest.raises(posbias.InvalidArgumentError, match="head dim D must be >= 1"):
        module.attention(empty, empty, empty, "alibi")


@pytest.mark.skipif("torch" not in BACKENDS, reason="PyTorch not under test")
def test_empty_inputs_still_have_a_gradient_graph():
    """No rows or no keys with requires_grad: zero gradients, not PyTorch's "element 0
    of tensors does not require grad" from an output without a graph."""
    import torch

    import posbias.torch as pt

    module = pt.PositionalBias("t5", num_heads=4)
    q = torch.randn(1, 4, 5, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 7, 8, requires_grad=True) for _ in "kv")
    pt.attention(q[:, :, :0], k, v, module).sum().backward()
    out = pt.attention(q, k[:, :, :0], v[:, :, :0], module, causal=False)
    out.sum().backward()
    assert out.shape == (1, 4, 5, 8) and not out.any()
    assert not q.grad.any() and not v.grad.any()


# ------------------------------------------------------------- TensorFlow float64
def test_tensorflow_float64_with_masks():
    """finfo(float64).min went through a float32 constant: a raw ValueError before."""
    _needs("tensorflow")
    import tensorflow as tf

    import posbias.tensorflow as ptf

    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 2, 4))
    mask = np.ones((2, 5), bool)
    mask[0, :2] = False
    for kwargs in (
        dict(causal=True),
        dict(key_mask=mask),
        dict(segment_ids=np.eye(2, 5, dtype=int)),
    ):
        got = ptf.attention(tf.constant(q), tf.constant(q), tf.constant(q), "alibi", **kwargs)
        ref = posbias.numpy.attention(*(np.swapaxes(q, 1, 2),) * 3, "alibi", **kwargs)
        np.testing.assert_allclose(np.swapaxes(got.numpy(), 1, 2), ref, atol=1e-12)
    layer = ptf.MultiHeadAttention(16, 2, causal=True, dtype="float64")
    assert layer(np.ones((1, 3, 16))).dtype == tf.float64


# ------------------------------------------------------------------------ devices
def test_a_mask_on_another_device_is_a_posbias_error():
    _needs("torch")
    import torch

    import posbias.torch as pt

    q = torch.ones(1, 2, 3, 4, device="meta")
    with pytest.raises(posbias.BackendError, match="key_mask is on cpu"):
        pt.attention(q, q, q, "alibi", key_mask=torch.ones(1, 3, dtype=torch.bool))


# ----------------------------------------------------------------- FlexAttention
def test_flex_hooks_read_their_arguments_strictly():
    _needs("torch")
    import torch

    import posbias.torch as pt

    spec = posbias.get("alibi", num_heads=1)
    with pytest.raises(posbias.InvalidTypeError, match="q_offset must be an integer"):
        spec.score_mod(2, 2, q_offset=1.5)
    with pytest.raises(posbias.InvalidArgumentError, match="q_len must be >= 1"):
        posbias.get("t5", num_heads=1).score_mod(-3, 2)
    with pytest.raises(posbias.InvalidTypeError, match="key_mask must be bool"):
        pt.mask_mod(causal=True, q_len=2, k_len=2, key_mask=torch.ones(1, 2))
    with pytest.raises(posbias.InvalidTypeError, match="causal must be a bool"):
        pt.mask_mod(causal="no", q_len=2, k_len=2)


# ------------------------------------------------------------------------ memory
def test_the_torch_diagonal_cache_does_not_grow_with_the_offset():
    _needs("torch")
    import torch

    import posbias.torch as pt
    from posbias.torch import _sdpa

    _sdpa._TABLES.clear()
    q = torch.randn(1, 2, 8, 16)
    for offset in (0, 10**4, 10**7, 2**40):  # 10**7 cached an 80M-entry table before
        out = pt.attention(q, q, q, "alibi", q_offset=offset)
        ref = pt.attention(q, q, q, "alibi", q_offset=offset, implementation="reference")
        assert torch.isfinite(out).all()
        if offset <= 10**4:  # beyond, float32 scores lose digits next to a -6e5 bias
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert _sdpa._TABLES and all(v[2].numel() < 1000 for v in _sdpa._TABLES.values())


# ------------------------------------------------------------------------- files
def test_save_params_keeps_zero_d_arrays(tmp_path):
    """FIRE's scalar parameters came back as (1,) and could never be loaded again."""
    params = posbias.get("fire", num_heads=2).init_params()
    for suffix in (".npz", ".safetensors"):
        if suffix == ".safetensors":
            pytest.importorskip("safetensors")
        path = tmp_path / f"fire{suffix}"
        save_params(params, path)
        loaded = load_params(path)
        assert {k: v.shape for k, v in loaded.items()} == {
            k: np.shape(v) for k, v in params.items()
        }


@pytest.mark.parametrize(
    "make",
    [
        lambda d: d / "missing.npz",
        lambda d: (d / "dir.npz").mkdir() or d / "dir.npz",
        lambda d: _write(d / "empty.npz", b""),
        lambda d: _write(d / "text.npz", b"hello"),
        lambda d: _write(d / "junk.safetensors", b"\x07junk"),
        lambda d: _truncated(d),
        lambda d: d / "params.txt",
    ],
    ids=["missing", "directory", "empty", "text", "junk-safetensors", "truncated", "suffix"],
)
def test_unreadable_parameter_files_are_posbias_errors(tmp_path, make):
    path = make(tmp_path)
    if str(path).endswith(".safetensors"):
        pytest.importorskip("safetensors")
    with pytest.raises(posbias.InvalidArgumentError):
        load_params(path)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _truncated(d):
    full = d / "full.npz"
    save_params({"w": np.arange(1000.0)}, full)
    cut = d / "cut.npz"
    cut.write_bytes(full.read_bytes()[:300])
    return cut


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({1: np.ones(2)}, posbias.InvalidTypeError),
        ({"a": [[1.0, 2.0], [3.0]]}, posbias.InvalidArgumentError),
        ({"a": {"b": 1}}, posbias.InvalidTypeError),
        ({"a": np.array(["x"])}, posbias.InvalidTypeError),
    ],
    ids=["non-string key", "ragged", "object", "strings"],
)
def test_unwritable_parameter_dicts_are_posbias_errors(tmp_path, params, error):
    with pytest.raises(error):
        save_params(params, tmp_path / "p.npz")


def test_pickled_object_arrays_are_not_loaded(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, a=np.array([{"b": 1}], dtype=object))
    with pytest.raises(posbias.InvalidArgumentError, match="not a readable"):
        load_params(path)


# ----------------------------------------------------------------------- threads
def test_first_lookups_from_several_threads_all_find_the_plugin():
    """The loaded flag was set before loading finished: three of four threads failed."""
    from posbias import registry

    if "example/linear_window" not in {e.name for e in registry.metadata.entry_points(
        group=registry.ENTRY_POINT_GROUP
    )}:  # fmt: skip
        pytest.skip("the example plugin is not installed")
    with registry.isolated():
        registry._registry.pop("example/linear_window", None)
        registry._plugins_loaded = False
        errors, barrier = [], threading.Barrier(4)

        def lookup():
            barrier.wait()
            try:
                posbias.get("example/linear_window", num_heads=2, window=4)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=lookup) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


# ------------------------------------------------------------------- NaN and inf
@pytest.mark.parametrize("bias", ["alibi", "t5", "fire", None])
def test_no_nan_or_inf_anywhere_with_fully_masked_rows_and_large_scores(bias):
    """jax_debug_nans / jax_debug_infs and torch.autograd.detect_anomaly stay quiet:
    1/max(sum, tiny)² overflowed in the backward pass of rows that see no key."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 6, 4, 8)).astype(np.float32) * 30
    mask = np.ones((2, 6), bool)
    mask[0, :3] = False
    mask[1, :] = False  # a sequence with no real key at all
    if "jax" in BACKENDS:
        import jax
        import jax.numpy as jnp

        import posbias.jax as pj

        def loss(x):
            return pj.attention(x, x, x, bias, causal=True, key_mask=mask).sum()

        with jax.debug_nans(True), jax.debug_infs(True):
            grads = [jax.grad(loss)(jnp.asarray(q)), jax.jit(jax.grad(loss))(jnp.asarray(q))]
        assert all(bool(jnp.isfinite(g).all()) for g in grads)
    if "torch" in BACKENDS:
        import torch

        import posbias.torch as pt

        x = torch.tensor(np.swapaxes(q, 1, 2), requires_grad=True)
        with torch.autograd.detect_anomaly(check_nan=True):
            out = pt.attention(x, x, x, bias, causal=True, key_mask=torch.tensor(mask))
            out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        assert not out[1].any()  # rows that see no key output zeros


# ----------------------------------------------------------------------- KV cache
def test_a_cache_with_a_negative_length_is_an_error(backend):
    module = lp.framework_module(backend)
    layer = module.MultiHeadAttention(16, 2, causal=True)
    cache = layer.init_cache(batch_size=1, capacity=4)
    bad = cache._replace(length=cache.length - 2)
    x = native(backend, np.ones((1, 1, 16), np.float32))
    with pytest.raises(posbias.InvalidArgumentError, match="negative length"):
        layer(x, cache=bad)


def test_decoding_past_the_capacity_under_compilation_sets_overflow(framework):
    """Eagerly an error; compiled, the returned cache says which sequences overflowed."""
    module = lp.framework_module(framework)
    layer = module.MultiHeadAttention(16, 2, causal=True)
    cache = layer.init_cache(batch_size=2, capacity=3)
    x = native(framework, np.ones((2, 2, 16), np.float32))
    if framework == "jax":
        from flax import nnx

        step = nnx.jit(lambda m, x, c: m(x, cache=c))
        _, cache = step(layer, x, cache)
        _, cache = step(layer, x, cache)  # 4 tokens > capacity 3
    elif framework == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda x, c: layer(x, cache=c))
        _, cache = step(x, cache)
        _, cache = step(x, cache)
    else:
        import torch

        step = torch.compile(lambda x, c: layer(x, cache=c), fullgraph=True, backend="eager")
        _, cache = step(x, cache)
        _, cache = step(x, cache)
    assert to_np(cache.overflow).tolist() == [True, True]
    with pytest.raises(posbias.InvalidArgumentError, match="past the cache capacity"):
        layer(x, cache=cache)


def test_bias_temporaries_are_bounded_by_computing_blocks_of_rows():
    """FIRE with mlp_width=256 at L=512 held ~0.55 GB of MLP activations at once (2-4 GiB
    at the issue's sizes); blocks of query rows keep them under the chunk budget, and the
    blocks concatenate to the same values."""
    import tracemalloc

    from posbias import _evaluate

    spec = posbias.get("fire", num_heads=1, mlp_width=256)
    tracemalloc.start()
    try:
        values = spec.bias(512, 512)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = 512 * 512 * spec.temporaries_per_pair() * 4
    assert full > 2 * _evaluate.CHUNK_BYTES
    assert peak < _evaluate.CHUNK_BYTES + (64 << 20), peak / 2**20
    rows = posbias.get("fire", num_heads=1, mlp_width=256).bias(q_pos=np.arange(500, 512),
                                                                k_pos=np.arange(512))  # fmt: skip
    np.testing.assert_array_equal(values[:, 500:], rows)


def test_replace_with_an_unknown_hyper_parameter_is_a_posbias_error():
    with pytest.raises(posbias.InvalidTypeError, match=r"no hyper-parameters \['bogus'\]"):
        posbias.get("alibi", num_heads=1).replace(bogus=1)


def test_positions_without_a_bias_are_an_error(backend):
    """They set the bias positions only (visibility follows the slots on every path)."""
    q = native(backend, np.ones((1, 2, 3, 4), np.float32))
    with pytest.raises(posbias.InvalidArgumentError, match="but bias=None"):
        lp.framework_module(backend).attention(
            q, q, q, None, q_pos=np.arange(2), k_pos=np.arange(2)
        )


@pytest.mark.parametrize("scale", [1e40, float("inf")])
def test_a_scale_beyond_float32_is_an_error_not_nan(backend, scale):
    q = native(backend, np.ones((1, 2, 3, 4), np.float32))
    with pytest.raises(posbias.InvalidArgumentError, match="scale must be finite"):
        lp.framework_module(backend).attention(q, q, q, "alibi", scale=scale)


# ---------------------------------------------- findings of a fresh-eyes review
def test_concrete_jax_int32_positions_near_the_limit_are_refused():
    _needs("jax")
    import jax.numpy as jnp

    spec = posbias.get("alibi", num_heads=1)
    with pytest.raises(posbias.InvalidArgumentError, match="jax_enable_x64"):
        spec.bias(2, 2, q_offset=jnp.array([2**31 - 1], jnp.int32))
    with pytest.raises(posbias.InvalidArgumentError, match="jax_enable_x64"):
        spec.bias(q_pos=jnp.array([2**31 - 1], jnp.int32), k_pos=jnp.array([0], jnp.int32))


def test_weights_beyond_float32_are_refused(backend):
    module = lp.framework_module(backend)
    layer = module.MultiHeadAttention(16, 2, bias="t5")
    weights = layer.portable_weights()
    for bad in (np.nan, np.inf, 1e39):
        with pytest.raises(posbias.InvalidArgumentError, match=r"q\.kernel holds NaN"):
            layer.load_portable_weights({**weights, "q.kernel": np.full((16, 16), bad)})
    with pytest.raises(posbias.InvalidArgumentError, match="beyond-float32"):
        layer.positional_bias.load_params({"table": np.full((32, 2), -1e40)})


@pytest.mark.parametrize("name", ["alibi", "t5", "swin", "fire", "sandwich", "swin_v2_cpb"])
def test_empty_biases_are_empty_not_a_division_by_zero(name):
    spec = posbias.registered()[name].parity_examples(2)[0]
    assert spec.bias(0, 0).shape == (2, 0, 0)
    assert spec.bias(3, 0).shape == (2, 3, 0)


def test_a_cache_is_checked_field_by_field(framework):
    module = lp.framework_module(framework)
    layer = module.MultiHeadAttention(16, 2, causal=True)
    cache = layer.init_cache(batch_size=2, capacity=6)
    x = native(framework, np.ones((2, 1, 16), np.float32))
    bad = [
        cache._replace(length=native(framework, np.zeros(3, np.int32))),
        cache._replace(valid=native(framework, np.zeros((2, 5), bool))),
        cache._replace(v=native(framework, np.zeros((2, 2, 7, 8), np.float32))),
        cache._replace(length=native(framework, np.zeros(2, np.float32))),
    ]
    for c in bad:
        with pytest.raises(posbias.InvalidArgumentError, match="cache"):
            layer(x, cache=c)
    other = _other(framework)
    if other is not None and framework != "tensorflow":  # Keras converts call arguments
        foreign = lp.framework_module(other).MultiHeadAttention(16, 2, causal=True)
        with pytest.raises(posbias.BackendError, match=r"cache\.k is a"):
            layer(x, cache=foreign.init_cache(batch_size=2, capacity=6))


def _other(framework):
    return next((f for f in FRAMEWORKS if f != framework), None)


def test_a_bias_callable_is_checked_and_converted(framework):
    attention = lp.framework_module(framework).attention
    q = native(framework, np.ones((2, 4, 6, 8), np.float32))  # (B, 4, 6, D) either layout

    if framework == "torch":  # (B, H=4, L=6, D)
        assert attention(q, q, q, lambda q_pos, k_pos, dtype: np.zeros((4, 6, 6))).shape == q.shape
        with pytest.raises(posbias.InvalidArgumentError, match=r"\(3, 4, 6, 6\)"):
            attention(q, q, q, lambda q_pos, k_pos, dtype: np.zeros((3, 4, 6, 6)))
    with pytest.raises(posbias.InvalidTypeError, match="must accept keyword arguments"):
        attention(q, q, q, lambda a: a)


def test_devices_are_checked(backend):
    spec = posbias.get("alibi", num_heads=1)
    with pytest.raises(posbias.BackendError, match="device="):
        spec.bias(2, 2, backend=backend, device="nonexistent-device")


def test_init_params_reads_its_seed_strictly():
    spec = posbias.get("t5", num_heads=2)
    for seed, error in (("1", posbias.InvalidTypeError), (1.5, posbias.InvalidTypeError),
                        (-1, posbias.InvalidArgumentError)):  # fmt: skip
        with pytest.raises(error, match="seed"):
            spec.init_params(seed=seed)


def test_q_k_v_must_share_a_dtype(framework):
    attention = lp.framework_module(framework).attention
    q = native(framework, np.ones((1, 2, 3, 4), np.float32))
    k = native(framework, np.ones((1, 2, 3, 4), np.float16))
    with pytest.raises(posbias.InvalidTypeError, match="must share one dtype"):
        attention(q, k, k, "alibi")


def test_keras_bias_layers_take_hyper_parameters_and_report_config_errors():
    _needs("tensorflow")
    import posbias.tensorflow as ptf

    assert ptf.PositionalBias("t5", 2, bidirectional=False).spec.bidirectional is False
    config = ptf.MultiHeadAttention(16, 2, causal=True).get_config()
    with pytest.raises(posbias.InvalidTypeError, match="causal must be a bool"):
        ptf.MultiHeadAttention.from_config({**config, "causal": "false"})


def test_layers_share_a_bias_module_and_check_2d_biases_when_built(backend):
    module = lp.framework_module(backend)
    shared = module.PositionalBias("t5", 4)
    a, b = (module.MultiHeadAttention(16, 4, bias=shared) for _ in range(2))
    assert a.positional_bias is shared and b.positional_bias is shared
    with pytest.raises(posbias.InvalidArgumentError, match="has 2 heads"):
        module.MultiHeadAttention(16, 4, bias=module.PositionalBias("t5", 2))
    with pytest.raises(posbias.InvalidArgumentError, match="grid="):
        module.MultiHeadAttention(16, 4, bias="alibi_2d")


def test_subnormal_slopes_are_refused():
    """JAX and TF flush float32 subnormals to zero, NumPy and torch keep them."""
    with pytest.raises(posbias.InvalidArgumentError, match="float32"):
        posbias.get("alibi", num_heads=1, custom_slopes=[1e-40])


def test_save_params_takes_framework_tensors(tmp_path):
    _needs("torch")
    import torch

    save_params(
        {"a": torch.ones(3, requires_grad=True), "b": torch.ones(2, dtype=torch.bfloat16)},
        tmp_path / "p.npz",
    )
    loaded = load_params(tmp_path / "p.npz")
    assert loaded["a"].shape == (3,) and loaded["b"].dtype == np.float32


def test_zigzag_reads_its_arguments_strictly():
    _needs("jax")
    from posbias.jax import zigzag

    x = np.arange(8)[None]
    with pytest.raises(posbias.InvalidArgumentError, match="shards must be >= 1"):
        zigzag(x, 0)
    with pytest.raises(posbias.InvalidTypeError, match="shards must be an integer"):
        zigzag(x, "2")
    with pytest.raises(posbias.InvalidArgumentError, match="axis=5"):
        zigzag(x, 2, axis=5)


@pytest.mark.skipif("tensorflow" not in BACKENDS, reason="TensorFlow not under test")
def test_tf_function_with_an_unknown_length_raises_ours_and_an_unknown_batch_runs():
    """posbias lays out its blocks at trace time: an unknown length is a clear error,
    an unknown batch size (Keras' partial last batch) runs, with key_mask too."""
    import tensorflow as tf

    import posbias.tensorflow as ptf

    x = tf.random.normal((2, 8, 4, 8))
    mask = tf.constant(np.arange(8)[None] >= np.array([[3], [0]]))
    unknown_batch = tf.function(
        lambda q, m: ptf.attention(q, q, q, "t5", causal=True, key_mask=m),
        input_signature=[tf.TensorSpec((None, 8, 4, 8)), tf.TensorSpec((None, 8), tf.bool)],
    )
    eager = ptf.attention(x, x, x, "t5", causal=True, key_mask=mask)
    np.testing.assert_allclose(unknown_batch(x, mask).numpy(), eager.numpy(), atol=1e-6)
    unknown_length = tf.function(
        lambda q: ptf.attention(q, q, q, "alibi"), input_signature=[tf.TensorSpec((2, None, 4, 8))]
    )
    with pytest.raises(posbias.InvalidArgumentError, match="need known heads, lengths"):
        unknown_length(x)


@pytest.mark.parametrize("kind", ["entry", "pair"])
@pytest.mark.parametrize("value", [-1, 2.5, True, "8", None])
def test_a_variants_temporaries_must_be_a_non_negative_int(kind, value):
    """They size the row blocks of ``bias()``: a wrong count is the variant's error."""
    from posbias.variants.fire import Fire

    odd = type("Odd", (Fire,), {f"temporaries_per_{kind}": lambda self: value})(num_heads=2)
    with pytest.raises(posbias.InvalidTypeError, match=f"temporaries_per_{kind}"):
        odd.bias(4, 4)


# ------------------------------------------------- found by a new user's review
def test_init_cache_takes_any_spelling_of_a_float_dtype_and_refuses_others(framework):
    """init_cache(dtype=) reads its dtype like spec.bias(dtype=): a string, a NumPy dtype or
    the framework's own; an integer dtype was accepted (PyTorch) and strings were refused
    with "unknown dtype None"."""
    module = lp.framework_module(framework)
    layer = module.MultiHeadAttention(16, 2, causal=True)
    xp = posbias.backends.load(framework)()
    for dtype in ("float16", np.float16, np.dtype("float16"), xp.native_dtype("float16")):
        cache = layer.init_cache(batch_size=2, capacity=4, dtype=dtype)
        assert xp.dtype_name(cache.k.dtype) == "float16", dtype
    for dtype in ("int8", np.int64, xp.native_dtype("int64")):
        with pytest.raises(posbias.BackendError, match="unknown cache dtype"):
            layer.init_cache(batch_size=2, capacity=4, dtype=dtype)
    with pytest.raises(posbias.InvalidTypeError, match="dtype must be a float dtype"):
        layer.init_cache(batch_size=2, capacity=4, dtype=True)


def test_a_cache_error_names_the_field_that_is_off(framework):
    """A cache whose k alone is off was reported as a bad v (k was taken as the reference)."""
    module = lp.framework_module(framework)
    layer = module.MultiHeadAttention(16, 2, causal=True)  # 2 heads of dim 8
    cache = layer.init_cache(batch_size=2, capacity=6)
    x = native(framework, np.ones((2, 1, 16), np.float32))
    for field, shape in (("k", (2, 2, 6, 4)), ("k", (2, 2, 5, 8)), ("v", (2, 2, 5, 8))):
        bad = cache._replace(**{field: native(framework, np.zeros(shape, np.float32))})
        with pytest.raises(posbias.InvalidArgumentError, match=rf"cache\.{field} has shape"):
            layer(x, cache=bad)
    bad = cache._replace(valid=native(framework, np.zeros((2, 5), bool)))
    with pytest.raises(posbias.InvalidArgumentError, match=r"cache\.valid has shape \(2, 5\)"):
        layer(x, cache=bad)


def test_bias_parameters_on_another_device_are_a_posbias_error():
    """A bias module left on another device gave uninitialised memory (meta) or a raw
    PyTorch error deep inside a kernel."""
    _needs("torch")
    import torch

    import posbias.torch as pt

    q = torch.randn(1, 2, 40, 8)
    for name in ("t5", "kerple_log", "fire"):
        bias = pt.PositionalBias(name, 2).to("meta")
        with pytest.raises(posbias.BackendError, match=r"bias parameter '\w+' is on meta"):
            pt.attention(q, q, q, bias)
    table = pt.PositionalBias("t5", 2).params["table"].detach().to("meta")
    with pytest.raises(posbias.BackendError, match="bias parameter 'table' is on meta"):
        posbias.get("t5", num_heads=2).bias(
            q_pos=torch.arange(3), k_pos=torch.arange(3), params={"table": table}
        )


def test_a_bias_callable_must_return_finite_tensors(backend):
    """None, a list, NaN or +inf from a bias callable: a posbias error, never a framework
    TypeError, a silent conversion or NaN outputs (-inf still hides a pair)."""
    attention = lp.framework_module(backend).attention
    q = native(backend, np.ones((2, 4, 4, 8), np.float32))  # (B, 4, 4, D) either layout
    xp = posbias.backends.load(backend)()

    def returning(value):
        return lambda q_pos, k_pos, dtype: value

    for value in (None, [[0.0] * 4] * 4):
        with pytest.raises(posbias.InvalidTypeError, match=r"must return a .* tensor or a NumPy"):
            attention(q, q, q, returning(value))
    for fill in (np.nan, np.inf):
        with pytest.raises(posbias.InvalidArgumentError, match=r"returned NaN or \+inf"):
            attention(q, q, q, returning(xp.from_numpy(np.full((4, 4, 4), fill, np.float32))))
    hidden = np.zeros((4, 4, 4), np.float32)
    hidden[:, :, 1] = -np.inf
    out = to_np(attention(q, q, q, returning(xp.from_numpy(hidden))))
    assert np.isfinite(out).all()


def test_k_v_shape_errors_show_the_callers_layout(framework):
    """(B, L, H, D) callers saw k and v shapes printed head-major under a (B, L, H, D) label."""
    attention = lp.framework_module(framework).attention
    bhld = framework == "torch"
    k_shape, v_shape = ((2, 4, 8, 16), (2, 4, 7, 16)) if bhld else ((2, 8, 4, 16), (2, 7, 4, 16))
    q = native(framework, np.ones(k_shape, np.float32))
    k, v = (native(framework, np.ones(s, np.float32)) for s in (k_shape, v_shape))
    with pytest.raises(posbias.InvalidArgumentError, match=rf"got \(2, {8 if not bhld else 4}"):
        attention(q, k, v, "alibi")


def test_a_traced_nan_in_a_float_attn_mask_gives_nan_not_a_hidden_pair():
    """Eagerly a NaN in a float attn_mask is refused; under jax.jit (values unknown) it was
    read as -inf, hiding the pair: a guessed answer. Now the outputs are NaN (loud)."""
    _needs("jax")
    import jax
    import jax.numpy as jnp

    import posbias.jax as pj

    q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 4, 16)), jnp.float32)
    mask = jnp.zeros((8, 8)).at[:, 3].set(jnp.nan)
    out = jax.jit(lambda m: pj.attention(q, q, q, "alibi", attn_mask=m))(mask)
    assert bool(jnp.isnan(out).all())
    hide = jnp.zeros((8, 8)).at[:, 3].set(-jnp.inf)
    traced = jax.jit(lambda m: pj.attention(q, q, q, "alibi", attn_mask=hide))(hide)
    assert float(jnp.abs(traced - pj.attention(q, q, q, "alibi", attn_mask=hide)).max()) < 1e-6
