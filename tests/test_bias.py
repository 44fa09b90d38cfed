"""ALiBi values and position semantics against a float64 NumPy formula, on every backend."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import posbias
from conftest import native, to_np


def reference(slopes, q_pos, k_pos):
    """-m_h |i - j| in float64, shape (..., H, Lq, Lk)."""
    q = np.asarray(q_pos, dtype=np.float64)[..., :, None]
    k = np.asarray(k_pos, dtype=np.float64)[..., None, :]
    dist = np.abs(q - k)[..., None, :, :]
    return -np.asarray(slopes)[:, None, None] * dist


def test_issue_example(backend, alibi12):
    b = alibi12.bias(q_len=5, k_len=9, backend=backend)
    x = to_np(b)
    assert x.shape == (12, 5, 9) and x.dtype == np.float32
    # bottom-right: query r sits at 9 - 5 + r
    np.testing.assert_allclose(
        x, reference(alibi12.slopes, np.arange(4, 9), np.arange(9)), rtol=1e-6
    )
    assert x[:, -1, -1].tolist() == [0.0] * 12


def test_no_negative_zero(backend, alibi12):
    x = to_np(alibi12.bias(q_len=4, k_len=4, backend=backend))
    assert not np.signbit(x[x == 0]).any()


@pytest.mark.parametrize(
    ("kwargs", "q", "k"),
    [
        (dict(q_len=3, k_len=3), [0, 1, 2], [0, 1, 2]),
        (dict(q_len=1, k_len=5), [4], [0, 1, 2, 3, 4]),
        (dict(q_len=4, k_len=2), [-2, -1, 0, 1], [0, 1]),
        (dict(q_len=2, k_len=3, k_offset=10), [11, 12], [10, 11, 12]),
        (dict(q_len=2, k_len=3, q_offset=0), [0, 1], [0, 1, 2]),
        (dict(q_len=2, k_len=3, q_offset=7, k_offset=2), [7, 8], [2, 3, 4]),
        (dict(q_len=0, k_len=3), [], [0, 1, 2]),
    ],
)
def test_alignment_rules(backend, kwargs, q, k):
    spec = posbias.get("alibi", num_heads=3)
    x = to_np(spec.bias(**kwargs, backend=backend))
    np.testing.assert_allclose(x, reference(spec.slopes, q, k).astype(np.float32), rtol=1e-6)


def test_native_positions_pick_the_backend(backend, alibi12):
    qp = native(backend, np.arange(3, 7))
    kp = native(backend, np.arange(9))
    b = alibi12.bias(q_pos=qp, k_pos=kp, heads=range(4, 8))
    assert posbias.backends.detect(b) == backend
    np.testing.assert_allclose(
        to_np(b), reference(alibi12.slopes[4:8], np.arange(3, 7), np.arange(9)), rtol=1e-6
    )


def test_batched_positions(backend, alibi12):
    rng = np.random.default_rng(0)
    q = rng.integers(0, 50, size=(3, 4))
    k = rng.integers(0, 50, size=(3, 6))
    b = to_np(alibi12.bias(q_pos=native(backend, q), k_pos=native(backend, k)))
    assert b.shape == (3, 12, 4, 6)
    np.testing.assert_allclose(b, reference(alibi12.slopes, q, k), rtol=1e-6)
    # one side batched, the other shared
    b = to_np(alibi12.bias(q_pos=native(backend, q), k_pos=native(backend, np.arange(6))))
    np.testing.assert_allclose(b, reference(alibi12.slopes, q, np.arange(6)[None]), rtol=1e-6)


def test_left_padding_positions(backend):
    """Positions from a padding mask (cumsum - 1) make padded rows equal unpadded ones."""
    spec = posbias.get("alibi", num_heads=4)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=bool)
    pos = np.cumsum(mask, axis=-1) - 1
    b = to_np(spec.bias(q_pos=native(backend, pos), k_pos=native(backend, pos)))
    unpadded = to_np(spec.bias(q_len=3, k_len=3, backend=backend))
    np.testing.assert_array_equal(b[0][:, 2:, 2:], unpadded)


def test_batched_offsets(backend, alibi12):
    off = native(backend, np.array([0, 5, 9]))
    b = to_np(alibi12.bias(q_len=1, k_len=10, q_offset=off))
    assert b.shape == (3, 12, 1, 10)
    for row, o in enumerate([0, 5, 9]):
        np.testing.assert_allclose(b[row], reference(alibi12.slopes, [o], np.arange(10)), rtol=1e-6)


@pytest.mark.parametrize("heads", [range(4, 8), [11, 0, 5], 3, np.array([2, 1])])
def test_global_head_indices(backend, alibi12, heads):
    index = list(heads) if not isinstance(heads, int) else [heads]
    x = to_np(alibi12.bias(q_len=3, k_len=5, heads=heads, backend=backend))
    full = to_np(alibi12.bias(q_len=3, k_len=5, backend=backend))
    np.testing.assert_array_equal(x, full[index])


def test_asymmetric(backend):
    spec = posbias.get("alibi_asymmetric", num_heads=2, future_custom_slopes=[1.0, 2.0])
    x = to_np(spec.bias(q_len=3, k_len=3, q_offset=0, backend=backend))
    past = spec.slopes
    rel = np.arange(3)[None, :] - np.arange(3)[:, None]  # j - i
    expected = np.where(
        rel[None] > 0, -np.array([1.0, 2.0])[:, None, None] * rel, past[:, None, None] * rel
    )
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    same = posbias.get("alibi_asymmetric", num_heads=12)
    np.testing.assert_array_equal(
        to_np(same.bias(q_len=4, k_len=6, backend=backend)),
        to_np(posbias.get("alibi", num_heads=12).bias(q_len=4, k_len=6, backend=backend)),
    )


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_dtypes(backend, alibi12, dtype):
    if backend == "jax" and dtype == "float64":
        with pytest.raises(posbias.BackendError, match="jax_enable_x64"):
            alibi12.bias(q_len=3, k_len=4, backend=backend, dtype=dtype)
        return
    x = alibi12.bias(q_len=3, k_len=4, backend=backend, dtype=dtype)
    assert to_np(x).dtype.name == dtype


def test_float16_saturates_instead_of_inf(backend):
    spec = posbias.get("alibi", num_heads=1, custom_slopes=[1.0])
    x = to_np(spec.bias(q_len=1, k_len=70_000, backend=backend, dtype="float16"))
    assert np.isfinite(x).all() and x.min() == np.float16(-65504)


def test_float64_is_the_reference():
    spec = posbias.get("alibi", num_heads=12)
    x = spec.bias(q_len=5, k_len=7, dtype="float64")
    np.testing.assert_array_equal(x, reference(spec.slopes, np.arange(2, 7), np.arange(7)))


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 20),
    q_len=st.integers(1, 12),
    k_len=st.integers(1, 12),
    offsets=st.tuples(st.integers(0, 100), st.integers(0, 100)),
    data=st.data(),
)
def test_tiles_concatenate_bit_exactly(heads, q_len, k_len, offsets, data):
    from posbias.testing import backends_under_test, tile_mismatch

    spec = posbias.get("alibi_asymmetric", num_heads=heads, future_max_bias=3.0)
    for backend in backends_under_test():
        mismatch = tile_mismatch(
            spec,
            backend,
            q_len=q_len,
            k_len=k_len,
            q_split=data.draw(st.integers(0, q_len)),
            k_split=data.draw(st.integers(0, k_len)),
            h_split=data.draw(st.integers(0, heads)),
            q_offset=offsets[0],
            k_offset=offsets[1],
        )
        assert mismatch == 0.0, backend


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(q_len=-1, k_len=3), posbias.InvalidArgumentError, "q_len must be >= 0"),
        (dict(q_len=2, k_len=1.5), posbias.InvalidTypeError, "k_len must be an integer"),
        (dict(q_len=2, k_len=3, q_offset=-1), posbias.InvalidArgumentError, "q_offset"),
        (dict(q_len=2, k_len=3, k_offset=0.5), posbias.InvalidTypeError, "k_offset"),
        (dict(q_len=2), posbias.InvalidArgumentError, "give k_len"),
        (dict(k_len=2), posbias.InvalidArgumentError, "give q_len"),
        (dict(q_pos=np.array([0.0, 1.0]), k_len=3), posbias.InvalidTypeError, "integers"),
        (dict(q_pos=np.zeros((2, 2, 2), int), k_len=3), posbias.InvalidArgumentError, "shape"),
        (dict(q_pos=np.array(3), k_len=3), posbias.InvalidArgumentError, "shape"),
        (
            dict(q_pos=np.zeros((2, 3), int), k_pos=np.zeros((3, 4), int)),
            posbias.InvalidArgumentError,
            "batch size",
        ),
        (dict(q_pos=np.arange(3), q_len=4, k_len=4), posbias.InvalidArgumentError, "match"),
        (dict(q_pos=np.arange(3), q_offset=1, k_len=4), posbias.InvalidArgumentError, "not both"),
        (dict(q_len=2, k_pos=np.arange(3)), posbias.InvalidArgumentError, "q_offset"),
        (dict(q_len=2, k_len=3, heads=[12]), posbias.InvalidArgumentError, "out of range"),
        (dict(q_len=2, k_len=3, heads=[-1]), posbias.InvalidArgumentError, "out of range"),
        (dict(q_len=2, k_len=3, heads=[1, 1]), posbias.InvalidArgumentError, "duplicates"),
        (dict(q_len=2, k_len=3, heads=[]), posbias.InvalidArgumentError, "empty"),
        (dict(q_len=2, k_len=3, heads=[1.0]), posbias.InvalidTypeError, "ints"),
        (dict(q_len=2, k_len=3, heads="0"), posbias.InvalidTypeError, "range"),
        (dict(q_len=2, k_len=3, dtype="int8"), posbias.BackendError, "unknown bias dtype"),
        (dict(q_len=2, k_len=3, dtype="float8"), posbias.BackendError, "unknown bias dtype"),
        (dict(q_len=2, k_len=3, backend="mxnet"), posbias.BackendError, "unknown backend"),
        (
            dict(q_len=2, k_len=3, params={"x": np.ones(2)}),
            posbias.InvalidArgumentError,
            "no learnable",
        ),
        (dict(q_len=200_000, k_len=200_000), posbias.ResourceError, "GiB"),
    ],
)
def test_bad_input(alibi12, kwargs, error, message):
    with pytest.raises(error, match=message):
        alibi12.bias(**kwargs)
