"""ALiBi slope schedules, computed once in float64 NumPy.

Press et al. (2022), *Train Short, Test Long: Attention with Linear Biases*,
https://arxiv.org/abs/2108.12409.

For a power of two ``n`` heads and maximum bias ``B`` (the paper uses ``B = 8``)
head ``h = 0 .. n-1`` gets

    m_h = 2 ** (-B * (h + 1) / n)

For other ``n`` the paper takes the ``P = 2**floor(log2 n)`` slopes of the
``P``-head schedule, then every other slope of the ``2P``-head schedule
(``2 ** (-B * (2k + 1) / (2P))``, ``k = 0, 1, ...``) until ``n`` slopes are
reached. MPT's ``gen_slopes(n, alibi_bias_max)`` and keras-hub's
``AlibiBias(alibi_bias_max=...)`` give the same numbers.

The *geometric* rule ``2 ** (-B * (h + 1) / n)`` for every ``n`` (used by some
libraries, e.g. attention-gym's FlexAttention example) agrees with the paper
only when ``n`` is a power of two.
"""

from __future__ import annotations

import numpy as np

from ._core.checks import MAX_POSITION, check_finite_float, check_num_heads
from .errors import InvalidArgumentError

__all__ = ["SCHEDULES", "alibi_slopes", "geometric_slopes", "resolve_slopes"]


def _power_of_two_slopes(n: int, max_bias: float) -> np.ndarray:
    exponents = np.arange(1, n + 1, dtype=np.float64) * (max_bias / n)
    return np.exp2(-exponents)


#: the smallest slope is 2^-max_bias; below 2^-126 it is no longer a normal float32
MAX_MAX_BIAS = 126.0


def _check_max_bias(max_bias: object) -> float:
    max_bias = check_finite_float("max_bias", max_bias, positive=True)
    if max_bias > MAX_MAX_BIAS:
        raise InvalidArgumentError(
            f"max_bias={max_bias} makes the smallest slope 2^-{max_bias:g}, below float32's "
            f"smallest normal number 2^-126 (it would be 0 or lose its digits); use "
            f"max_bias <= {MAX_MAX_BIAS:g} (the paper uses 8)."
        )
    return max_bias


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> np.ndarray:
    """The paper's ALiBi slopes, including its rule for non-power-of-two head counts.

    Args:
        num_heads: number of attention heads ``n >= 1``.
        max_bias: ``B`` in ``m_h = 2 ** (-B (h+1) / n)``; 8 in the paper. Must be
            finite and positive.

    Returns:
        ``float64`` array of shape ``(num_heads,)``, decreasing.

    Example:
        >>> import posbias
        >>> posbias.alibi_slopes(8).tolist()
        [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
        >>> posbias.alibi_slopes(12)[8:].round(8).tolist()
        [0.70710678, 0.35355339, 0.1767767, 0.08838835]
    """
    num_heads = check_num_heads(num_heads)
    max_bias = _check_max_bias(max_bias)
    closest = 1 << (num_heads.bit_length() - 1)  # largest power of two <= num_heads
    slopes = _power_of_two_slopes(closest, max_bias)
    if closest == num_heads:
        return slopes
    extra = _power_of_two_slopes(2 * closest, max_bias)[0::2][: num_heads - closest]
    return np.concatenate([slopes, extra])


def geometric_slopes(num_heads: int, max_bias: float = 8.0) -> np.ndarray:
    """The naive geometric rule ``m_h = 2 ** (-max_bias * (h + 1) / num_heads)``.

    Equal to :func:`alibi_slopes` for power-of-two head counts and different
    otherwise (for 12 heads the first slope is ``2**(-2/3)`` instead of ``0.5``).

    Example:
        >>> import posbias
        >>> posbias.geometric_slopes(4).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625]
    """
    num_heads = check_num_heads(num_heads)
    max_bias = _check_max_bias(max_bias)
    return _power_of_two_slopes(num_heads, max_bias)


#: Named slope schedules, each a function ``(num_heads, max_bias) -> float64 array``.
SCHEDULES = {"paper": alibi_slopes, "geometric": geometric_slopes}


def resolve_slopes(
    num_heads: int,
    *,
    max_bias: float = 8.0,
    schedule: str = "paper",
    scale: float = 1.0,
    slopes: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Slopes for a spec: explicit ``slopes`` or a named ``schedule``, times ``scale``.

    ``scale`` multiplies every slope (length interpolation: a model trained at
    length ``T`` and run at ``L > T`` may use ``scale = T / L``).

    Returns:
        ``float64`` array of shape ``(num_heads,)``.

    Example:
        >>> from posbias.slopes import resolve_slopes
        >>> resolve_slopes(2, scale=0.5).tolist()
        [0.03125, 0.001953125]
    """
    if slopes is not None:
        values = np.asarray(slopes, dtype=np.float64)
    else:
        if schedule not in SCHEDULES:
            raise InvalidArgumentError(
                f"unknown slope schedule {schedule!r}; expected one of {sorted(SCHEDULES)}."
            )
        values = SCHEDULES[schedule](num_heads, max_bias)
    values = values * scale
    source = "custom_slopes × scale" if slopes is not None else "the schedule's slopes × scale"
    check_float32_slopes(values, source)
    return values


#: the largest slope whose bias ``-m·|i - j|`` stays finite in float32 for every position
#: posbias accepts (|i - j| <= 2^40)
MAX_SLOPE = float(np.finfo(np.float32).max) / MAX_POSITION


def check_float32_slopes(values: np.ndarray, source: str) -> None:
    """Slopes are used in float32: none may overflow there, and none but 0 may vanish.

    Raises:
        InvalidArgumentError: a slope above :data:`MAX_SLOPE` (its bias overflows float32
            to -inf, NaN after a softmax), or a nonzero slope that is 0 in float32.
    """
    big = np.abs(values) > MAX_SLOPE
    # below float32's smallest normal number, JAX and TensorFlow flush to zero where
    # NumPy and PyTorch keep a subnormal: no bit-identical answer
    vanished = (values != 0) & (np.abs(values) < float(np.finfo(np.float32).tiny))
    if big.any() or vanished.any():
        which = np.flatnonzero(big | vanished).tolist()
        raise InvalidArgumentError(
            f"{source} give slopes {values[which].tolist()} for heads {which}: posbias computes "
            f"biases in float32, where a slope must lie in [1.2e-38, {MAX_SLOPE:.3g}] (or be "
            "exactly 0, a head without bias) so that -m·|i - j| is neither 0 nor infinite."
        )
