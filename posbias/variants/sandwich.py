"""Sandwich (Chi et al., ACL 2023, https://arxiv.org/abs/2212.10356).

Parameter-free: the inner product of sinusoidal embeddings, shifted and scaled
per head,

    bias[h, i, j] = (Σ_{k=1..d/2} cos(|i-j| / 10000^(2k/d)) − d/2) / (8(h+1)/H)

with ``d`` the per-head dimension. ``causal=True`` zeroes the bias of future
keys (``j > i``) before masking, as the reference does.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .._core.checks import MAX_WIDTH, check_bool, check_int
from ..errors import InvalidArgumentError
from ..registry import register
from ..spec import BiasSpec


@register("sandwich")
class Sandwich(BiasSpec):
    """Sandwich bias (Chi et al. 2023); parameter-free.

    Args:
        num_heads: ``H``.
        head_dim: ``d`` (even), the per-head dimension (default 64).
        causal: zero the bias of future keys.

    Example:
        >>> import posbias
        >>> spec = posbias.get("sandwich", num_heads=4, head_dim=64)
        >>> spec.bias(q_pos=[5], k_pos=range(6), heads=[0], dtype="float64")[0, 0][::-1].round(4)
        array([ 0.    , -0.3117, -1.14  , -2.2115, -3.206 , -3.8898])
    """

    toeplitz = True
    bit_identical = False  # cos differs by an ulp between frameworks
    tolerances: ClassVar[dict[str, tuple[float, float]]] = {
        "float32": (1e-5, 2e-5),
        "float16": (2e-3, 2e-3),
        "bfloat16": (1e-2, 1e-2),
    }

    head_dim: int = 64
    causal: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("head_dim", check_int("head_dim", self.head_dim, minimum=2, maximum=MAX_WIDTH))
        if self.head_dim % 2:
            raise InvalidArgumentError(f"head_dim must be even, got {self.head_dim}.")
        self._set("causal", check_bool("causal", self.causal))
        k = np.arange(1, self.head_dim // 2 + 1, dtype=np.float64)
        self._set("_inv_freq", 10000.0 ** (-2.0 * k / self.head_dim))
        h = np.arange(self.num_heads, dtype=np.float64)
        self._set("_inv_divisor", self.num_heads / (8.0 * (h + 1)))

    def temporaries_per_pair(self) -> int:
        return self.head_dim + 4  # d/2 angles and their cosines per (query, key)

    def compute(self, xp, q_pos, k_pos, heads, params):
        n = q_pos - k_pos  # i - j
        n = xp.maximum(n, 0) if self.causal else xp.abs(n)
        angles = xp.float(n)[..., None] * xp.constant(self._inv_freq)  # (..., Lq, Lk, d/2)
        similarity = xp.sum(xp.cos(angles), -1) - self.head_dim // 2
        scale = xp.constant(self._inv_divisor[heads])[:, None, None]
        return similarity[..., None, :, :] * scale
