import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import posbias
from posbias.slopes import resolve_slopes

PUBLISHED_12 = [2.0**-k for k in range(1, 9)] + [0.70710678, 0.35355339, 0.17677670, 0.08838835]
PUBLISHED_20_TAIL = [0.84089642, 0.59460356, 0.42044821, 0.29730178]


def test_published_8_heads():
    assert posbias.alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]


def test_published_12_heads():
    np.testing.assert_allclose(posbias.alibi_slopes(12), PUBLISHED_12, rtol=0, atol=5e-9)


def test_published_16_heads():
    np.testing.assert_allclose(
        posbias.alibi_slopes(16), [2.0 ** (-k / 2) for k in range(1, 17)], rtol=1e-15
    )


def test_published_20_heads():
    slopes = posbias.alibi_slopes(20)
    np.testing.assert_array_equal(slopes[:16], posbias.alibi_slopes(16))
    np.testing.assert_allclose(slopes[16:], PUBLISHED_20_TAIL, rtol=0, atol=5e-9)


def test_power_of_two_values_are_exact():
    for n in (1, 2, 4, 8):  # 2^(-8k/n) is an exact power of two: no rounding at all
        assert posbias.alibi_slopes(n).tolist() == [2.0 ** (-8 * k // n) for k in range(1, n + 1)]
    for n in (16, 32, 64):  # correctly rounded 2^(-8k/n), not a rounded running product
        k = np.arange(1, n + 1)
        np.testing.assert_array_equal(posbias.alibi_slopes(n), np.exp2(-8.0 * k / n))


def test_geometric_rule_differs_for_12_heads():
    naive = posbias.geometric_slopes(12)
    assert naive[0] == pytest.approx(2 ** (-8 / 12))
    assert not np.allclose(naive, posbias.alibi_slopes(12))


def _paper_reference(n: int) -> list[float]:
    """The paper authors' code (Press et al., fairseq `get_slopes`), transcribed."""

    def power_of_2(m):
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _paper_reference(2 * closest)[0::2][: n - closest]


def _mpt_reference(n: int, max_bias: float) -> np.ndarray:
    """MPT's `gen_slopes(n_heads, alibi_bias_max)` transcribed to NumPy."""
    padded = 2 ** math.ceil(math.log2(n))
    m = np.arange(1, padded + 1, dtype=np.float64) * (max_bias / padded)
    slopes = 1.0 / np.power(2, m)
    if padded != n:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n]
    return slopes


@given(st.integers(1, 300))
def test_matches_paper_code(n):
    np.testing.assert_allclose(posbias.alibi_slopes(n), _paper_reference(n), rtol=1e-13)


@given(st.integers(1, 300), st.floats(0.5, 16, allow_nan=False))
def test_max_bias_matches_mpt(n, max_bias):
    np.testing.assert_allclose(
        posbias.alibi_slopes(n, max_bias=max_bias), _mpt_reference(n, max_bias), rtol=1e-13
    )


@given(st.integers(1, 1000), st.floats(0.1, 32, allow_nan=False))
def test_schedule_properties(n, max_bias):
    slopes = posbias.alibi_slopes(n, max_bias)
    assert slopes.shape == (n,) and slopes.dtype == np.float64
    assert np.all(slopes > 0) and np.all(slopes < 1)
    closest = 1 << (n.bit_length() - 1)
    np.testing.assert_array_equal(slopes[:closest], posbias.alibi_slopes(closest, max_bias))
    assert len(np.unique(slopes)) == n  # interleaved slopes never repeat
    if closest == n:
        np.testing.assert_array_equal(slopes, posbias.geometric_slopes(n, max_bias))


def test_scale_and_custom_slopes():
    np.testing.assert_array_equal(resolve_slopes(8, scale=0.5), posbias.alibi_slopes(8) * 0.5)
    spec = posbias.get("alibi", num_heads=3, custom_slopes=[0.3, 0.2, 0.1])
    assert spec.slopes.tolist() == [0.3, 0.2, 0.1]
    spec = posbias.get("alibi", num_heads=3, custom_slopes=[0.3, 0.2, 0.1], scale=2.0)
    assert spec.slopes.tolist() == [0.6, 0.4, 0.2]
    spec = posbias.get("alibi", num_heads=12, schedule="geometric")
    np.testing.assert_array_equal(spec.slopes, posbias.geometric_slopes(12))


def test_slopes_are_read_only():
    spec = posbias.get("alibi", num_heads=4)
    with pytest.raises(ValueError):
        spec.slopes[0] = 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(num_heads=0), posbias.InvalidArgumentError, ">= 1"),
        (dict(num_heads=-3), posbias.InvalidArgumentError, ">= 1"),
        (dict(num_heads=2.0), posbias.InvalidTypeError, "integer"),
        (dict(num_heads=True), posbias.InvalidTypeError, "integer"),
        (dict(num_heads=10**12), posbias.InvalidArgumentError, "too large"),
        (dict(num_heads=8, max_bias=0.0), posbias.InvalidArgumentError, "> 0"),
        (dict(num_heads=8, max_bias=-1.0), posbias.InvalidArgumentError, "> 0"),
        (dict(num_heads=8, max_bias=float("nan")), posbias.InvalidArgumentError, "finite"),
        (dict(num_heads=8, max_bias=float("inf")), posbias.InvalidArgumentError, "finite"),
        (dict(num_heads=8, max_bias="8"), posbias.InvalidTypeError, "real number"),
    ],
)
def test_bad_schedule_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        posbias.alibi_slopes(**kwargs)
    with pytest.raises(error, match=message):
        posbias.get("alibi", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(schedule="naive"), "unknown slope schedule"),
        (dict(scale=0.0), "> 0"),
        (dict(custom_slopes=[0.5, 0.25]), "4 entries"),
        (dict(custom_slopes=[0.5, 0.25, float("nan"), 1.0]), "finite"),
        (dict(custom_slopes=[0.5, -0.25, 0.1, 1.0]), ">= 0"),
        (dict(custom_slopes="0.5"), "sequence"),
    ],
)
def test_bad_spec_arguments(kwargs, message):
    with pytest.raises(posbias.PosBiasError, match=message):
        posbias.get("alibi", num_heads=4, **kwargs)


def test_zero_slopes_are_heads_without_a_bias():
    """x-transformers' partial ALiBi (docs/migration.md) gives some heads slope 0."""
    slopes = [0.25, 0.0625, 0.015625, 0.00390625, 0, 0, 0, 0]
    bias = posbias.get("alibi", num_heads=8, custom_slopes=slopes).bias(q_len=3, k_len=3)
    assert not bias[4:].any() and not np.signbit(bias).any(axis=(1, 2))[4:].any()
    np.testing.assert_array_equal(bias[0, 2], [-0.5, -0.25, 0.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(custom_slopes=[1e300]), "float32"),
        (dict(scale=1e300), "float32"),
        (dict(custom_slopes=[1e-50]), "float32"),
        (dict(max_bias=2000.0), "max_bias <= 126"),
    ],
)
def test_slopes_that_overflow_or_vanish_in_float32_are_errors(kwargs, match):
    with pytest.raises(posbias.InvalidArgumentError, match=match):
        posbias.get("alibi", num_heads=1, **kwargs)
