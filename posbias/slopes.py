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

from ._core.checks import check_finite_float, check_num_heads
from .errors import InvalidArgumentError

__all__ = ["SCHEDULES", "alibi_slopes", "geometric_slopes", "resolve_slopes"]


def _power_of_two_slopes(n: int, max_bias: float) -> np.ndarray:
    exponents = np.arange(1, n + 1, dtype=np.float64) * (max_bias / n)
    return np.exp2(-exponents)


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
    max_bias = check_finite_float("max_bias", max_bias, positive=True)
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
    max_bias = check_finite_float("max_bias", max_bias, positive=True)
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
    return values * scale
