"""Framework adapters: native types, dtype objects, compilation, detection, missing frameworks."""

import subprocess
import sys

import numpy as np
import pytest

import posbias
from conftest import BACKENDS, native, to_np
from posbias import backends

needs = {
    name: pytest.mark.skipif(name not in BACKENDS, reason=f"{name} not under test")
    for name in ("torch", "jax", "tensorflow")
}


def test_native_dtype_objects(backend, alibi12):
    xp = backends.load(backend)()
    for name in ("float32", "float16", "bfloat16"):
        out = alibi12.bias(q_len=2, k_len=2, backend=backend, dtype=xp.native_dtype(name))
        assert to_np(out).dtype.name == name
        assert backends.detect(out) == backend


def test_numpy_dtype_objects_are_accepted(backend, alibi12):
    out = alibi12.bias(q_len=2, k_len=2, backend=backend, dtype=np.float16)
    assert to_np(out).dtype == np.float16


def test_numpy_inputs_convert_to_explicit_backend(framework, alibi12):
    out = alibi12.bias(q_pos=np.arange(3), k_pos=[0, 1, 2, 3], backend=framework)
    assert backends.detect(out) == framework


def test_mixed_frameworks_are_an_error(alibi12):
    if len(BACKENDS) < 2:
        pytest.skip("needs two backends")
    a, b = BACKENDS[-2:]
    with pytest.raises(posbias.BackendError, match="mix"):
        alibi12.bias(q_pos=native(a, np.arange(2)), k_pos=native(b, np.arange(2)))


def test_explicit_backend_conflicting_with_inputs(framework, alibi12):
    other = "numpy" if framework != "numpy" else None
    qp = native(framework, np.arange(2))
    with pytest.raises(posbias.BackendError, match="was asked for"):
        alibi12.bias(q_pos=qp, k_len=2, q_offset=None, backend=other)


@pytest.mark.parametrize("shape", [(2, 1, 13, 32), (2, 3, 1, 13, 32), (5, 32), (1, 1, 32)])
def test_matmul_broadcasts_a_2d_right_operand(backend, shape):
    """The op MLP biases use (FIRE, Swin V2): a batched (…, K) @ (K, N), against NumPy.
    TensorFlow's broadcasting matmul returned garbage for (2, 1, 13, 32) @ (32, 4)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=shape), rng.normal(size=(32, 4))
    xp = backends.load(backend)()
    for _ in range(3):
        out = to_np(xp.matmul(xp.constant(a), xp.constant(b)))
        np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fire", "swin_v2_cpb"])
def test_mlp_biases_with_one_query_row_per_sequence(backend, name):
    """Batched positions with one query each (a blockwise kernel's last block)."""
    spec = posbias.registered()[name].parity_examples(4)[0]
    qp, kp = np.array([[8], [11]]), np.array([np.arange(-4, 9), np.arange(13)])
    if spec.position_dims == 2:  # token t at (t // 4, t % 4)
        kp = np.array([np.arange(2, 15), np.arange(13)])
        qp, kp = np.stack([qp // 4, qp % 4], -1), np.stack([kp // 4, kp % 4], -1)
    ref = spec.bias(q_pos=qp, k_pos=kp, dtype="float64")
    for _ in range(3):
        out = to_np(spec.bias(q_pos=qp, k_pos=kp, backend=backend))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_detect_never_imports(backend):
    code = (
        "import sys, posbias.backends as b\n"
        "print(b.detect([1]), b.detect(3), b.detect(range(2)), b.detect('x'))\n"
        "print([m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["None None None None", "[]"]


@pytest.mark.parametrize(
    ("framework_name", "extra"), [("torch", "torch"), ("jax", "jax"), ("tensorflow", "tensorflow")]
)
def test_missing_framework_names_the_extra(framework_name, extra):
    code = (
        f"import sys; sys.modules[{framework_name!r}] = None\n"
        "import posbias\n"
        "try:\n"
        "    spec = posbias.get('alibi', num_heads=2)\n"
        f"    spec.bias(q_len=1, k_len=1, backend={framework_name!r})\n"
        "except posbias.BackendUnavailableError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f"pip install 'posbias[{extra}]'" in out.stdout


def test_available_lists_installed(backend):
    assert backend in backends.available()


@needs["torch"]
def test_torch_compile_fullgraph(alibi12):
    import torch

    def fn(qp, kp):
        return alibi12.bias(q_pos=qp, k_pos=kp, heads=range(4, 8), dtype=torch.bfloat16)

    compiled = torch.compile(fn, fullgraph=True)
    for n in (3, 5):
        qp, kp = torch.arange(n), torch.arange(n + 2)
        torch.testing.assert_close(compiled(qp, kp), fn(qp, kp), rtol=0, atol=0)


@needs["torch"]
def test_torch_device_follows_positions(alibi12):
    import torch

    qp = torch.arange(3, device="meta")
    out = alibi12.bias(q_pos=qp, k_pos=torch.arange(4, device="meta"))
    assert out.device.type == "meta" and out.shape == (12, 3, 4)
    out = alibi12.bias(q_len=2, k_len=2, backend="torch", device="meta")
    assert out.device.type == "meta"


@needs["jax"]
def test_jax_jit_with_traced_positions_and_offsets(alibi12):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def fn(qp, kp, off):
        return alibi12.bias(q_pos=qp, k_pos=kp), alibi12.bias(q_len=1, k_len=6, q_offset=off)

    a, b = fn(jnp.arange(2), jnp.arange(5), jnp.array([2, 5]))
    np.testing.assert_array_equal(
        np.asarray(a), alibi12.bias(q_pos=np.arange(2), k_pos=np.arange(5))
    )
    assert b.shape == (2, 12, 1, 6)
    np.testing.assert_array_equal(np.asarray(b[1]), alibi12.bias(q_len=1, k_len=6, q_offset=5))


@needs["jax"]
def test_jax_vmap_over_positions(alibi12):
    import jax
    import jax.numpy as jnp

    out = jax.vmap(lambda qp: alibi12.bias(q_pos=qp, k_pos=jnp.arange(4)))(
        jnp.arange(6).reshape(2, 3)
    )
    assert out.shape == (2, 12, 3, 4)


@needs["jax"]
def test_jax_float64_with_x64():
    code = (
        "import jax; jax.config.update('jax_enable_x64', True)\n"
        "import numpy as np, posbias\n"
        "s = posbias.get('alibi', num_heads=12)\n"
        "x = np.asarray(s.bias(q_len=3, k_len=5, backend='jax', dtype='float64'))\n"
        "print(x.dtype, np.array_equal(x, s.bias(q_len=3, k_len=5, dtype='float64')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["float64", "True"]


@needs["tensorflow"]
@pytest.mark.parametrize("jit_compile", [False, True])
def test_tf_function(alibi12, jit_compile):
    import tensorflow as tf

    @tf.function(
        jit_compile=jit_compile,
        input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.int64)],
    )
    def fn(qp, kp):
        return alibi12.bias(q_pos=qp, k_pos=kp, dtype=tf.bfloat16)

    out = fn(tf.range(3), tf.reshape(tf.range(10, dtype=tf.int64), (2, 5)))
    assert out.dtype == tf.bfloat16 and out.shape == (2, 12, 3, 5)
    expected = alibi12.bias(q_pos=np.arange(3), k_pos=np.arange(10).reshape(2, 5), dtype="bfloat16")
    np.testing.assert_array_equal(to_np(out), expected)


@needs["tensorflow"]
def test_tf_variables_as_positions(alibi12):
    import tensorflow as tf

    qp = tf.Variable([0, 1, 2])
    out = alibi12.bias(q_pos=qp, k_pos=tf.range(3))
    assert backends.detect(out) == "tensorflow"


@needs["torch"]
def test_torch_cuda_bias_is_bit_identical_to_cpu(alibi12):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    qp = torch.arange(100, 300, device="cuda")
    kp = torch.arange(400, device="cuda")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = alibi12.bias(q_pos=qp, k_pos=kp, dtype=dtype)
        assert out.device.type == "cuda"
        cpu = alibi12.bias(q_pos=qp.cpu(), k_pos=kp.cpu(), dtype=dtype)
        assert torch.equal(out.cpu(), cpu)
