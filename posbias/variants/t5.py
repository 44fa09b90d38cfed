"""T5 relative position buckets (Raffel et al., JMLR 2020, https://arxiv.org/abs/1910.10683).

``bias[h, i, j] = table[bucket(j - i), h]`` with a learned ``table`` of shape
``(num_buckets, num_heads)``. With ``n = i - j`` (positive for past keys):

* bidirectional (default): half the buckets per direction; future keys
  (``n < 0``) are offset by ``num_buckets // 2``; ``n = |n|``;
* causal: future keys share bucket 0 (``n = max(n, 0)``);
* within a side of ``B`` buckets, ``n < B/2`` has its own bucket, larger ``n``
  get ``B/2 + floor(log(n / (B/2)) / log(max_distance / (B/2)) · (B - B/2))``,
  capped at ``B - 1``.

The logarithmic buckets are turned into integer thresholds once, in float64
NumPy, so every backend compares integers only. At ``n = 16, 32, 64`` (default
bidirectional) the log term is exactly an integer; a ``log`` one ulp low in
some framework would otherwise drop a bucket.
"""

from __future__ import annotations

import einops
import numpy as np

from .._core.checks import MAX_POSITION, MAX_WIDTH, check_bool, check_int
from ..errors import InvalidArgumentError
from ..registry import register
from ..spec import BiasSpec


def bucket_thresholds(num_buckets: int, max_distance: int) -> tuple[int, ...]:
    """Smallest distance of each logarithmic bucket of one side (float64, once).

    Example:
        >>> bucket_thresholds(16, 128)  # bidirectional defaults: one side of 16
        (12, 16, 23, 32, 46, 64, 91)
    """
    max_exact = num_buckets // 2
    n = np.arange(max_exact, max_distance + 1, dtype=np.float64)
    scaled = np.log(n / max_exact) / np.log(max_distance / max_exact) * (num_buckets - max_exact)
    buckets = np.minimum(max_exact + np.floor(scaled).astype(np.int64), num_buckets - 1)
    starts = np.searchsorted(buckets, np.arange(max_exact + 1, num_buckets), side="left")
    return tuple(int(max_exact + s) for s in starts)


def relative_bucket(
    xp, relative, *, bidirectional: bool, num_buckets: int, thresholds: tuple[int, ...]
):
    """Bucket of ``relative = j - i`` (integer tensor), T5's rule, integer-only."""
    n = -relative
    if bidirectional:
        side = num_buckets // 2
        offset = xp.as_int(n < 0) * side
        n = xp.abs(n)
    else:
        side = num_buckets
        offset = 0
        n = xp.maximum(n, 0)
    max_exact = side // 2
    large = max_exact + sum(xp.as_int(n >= t) for t in thresholds)
    return offset + xp.where(n < max_exact, n, large)


@register("t5")
class T5(BiasSpec):
    """T5 relative position buckets with a learned table (Raffel et al. 2020).

    Args:
        num_heads: ``H``.
        bidirectional: encoder (True, default) or causal decoder buckets.
        num_buckets: table rows (32); even when bidirectional.
        max_distance: distance from which the last bucket is used (128).

    Parameters: ``table`` ``(num_buckets, num_heads)``, initialised
    ``N(0, 0.1²)`` from a seeded NumPy generator.

    Example:
        >>> import numpy as np, posbias
        >>> spec = posbias.get("t5", num_heads=1)
        >>> table = np.arange(32.0)[:, None]     # bias = bucket number
        >>> spec.bias(q_pos=[64], k_pos=[0, 48, 56, 63, 64, 65, 80, 128, 155],
        ...           params={"table": table})[0, 0].tolist()
        [14.0, 10.0, 8.0, 1.0, 0.0, 17.0, 26.0, 30.0, 31.0]
    """

    toeplitz = True
    learnable = True

    bidirectional: bool = True
    num_buckets: int = 32
    max_distance: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("bidirectional", check_bool("bidirectional", self.bidirectional))
        self._set(
            "num_buckets", check_int("num_buckets", self.num_buckets, minimum=2, maximum=MAX_WIDTH)
        )
        self._set(
            "max_distance",
            check_int("max_distance", self.max_distance, minimum=1, maximum=MAX_POSITION),
        )
        if self.bidirectional and self.num_buckets % 2:
            raise InvalidArgumentError(
                f"num_buckets={self.num_buckets} must be even in bidirectional mode "
                "(half the buckets for each direction)."
            )
        side = self.num_buckets // 2 if self.bidirectional else self.num_buckets
        if side < 2:
            raise InvalidArgumentError(
                f"num_buckets={self.num_buckets} leaves {side} bucket per direction; "
                "bidirectional T5 buckets need num_buckets >= 4."
            )
        if self.max_distance <= self.num_buckets // 2:
            raise InvalidArgumentError(
                f"max_distance={self.max_distance} must exceed num_buckets/2 = "
                f"{self.num_buckets // 2} (the logarithmic buckets start there)."
            )
        self._set("_thresholds", bucket_thresholds(side, self.max_distance))

    def bucket(self, xp, relative):
        """Bucket index of ``relative = j - i``."""
        return relative_bucket(
            xp,
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            thresholds=self._thresholds,
        )

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"table": (self.num_buckets, self.num_heads)}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"table": rng.normal(0.0, 0.1, size=self.param_shapes()["table"])}

    def compute(self, xp, q_pos, k_pos, heads, params):
        table = xp.take_axis(params["table"], heads, 1)  # (num_buckets, h)
        values = xp.take(table, self.bucket(xp, k_pos - q_pos))  # (..., Lq, Lk, h)
        return einops.rearrange(values, "... q k h -> ... h q k")
