"""FIRE: Functional Interpolation for Relative positions (Li et al., ICLR 2024).

https://arxiv.org/abs/2310.04418

    bias[h, i, j] = MLP_h( ψ(i - j) / ψ(max(i, L)) ),   ψ(x) = log(c·|x| + 1)

with learnable ``c`` (init 0.1), a learnable threshold ``L = |ℓ · init_L|``
(``ℓ`` init 1, ``init_L = 512``), ``eps = 1e-6`` added to the denominator and
a one-hidden-layer ReLU MLP ``1 → mlp_width → H`` (default width 32), as in
the paper's reference implementation. Not Toeplitz: the normaliser depends on
the query position ``i``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .._core.checks import MAX_WIDTH, check_finite_float, check_int
from ..registry import register
from ..spec import BiasSpec


@register("fire")
class Fire(BiasSpec):
    """FIRE learned functional bias (Li et al. 2024).

    Args:
        num_heads: ``H``.
        mlp_width: hidden width of the MLP (32).
        init_c: initial ``c`` (0.1).
        init_L: base threshold ``L`` (512), multiplied by the learnable ``L_multiplier``.
        eps: added to the normaliser (1e-6).

    Parameters: ``c`` ``()``, ``L_multiplier`` ``()``, ``w1`` ``(mlp_width,)``,
    ``b1`` ``(mlp_width,)``, ``w2`` ``(mlp_width, H)``, ``b2`` ``(H,)``; MLP
    weights initialised like ``torch.nn.Linear`` (``U(±1/sqrt(fan_in))``),
    seeded NumPy.

    Example:
        >>> import posbias
        >>> spec = posbias.get("fire", num_heads=4)
        >>> spec.bias(q_len=3, k_len=3).shape
        (4, 3, 3)
    """

    learnable = True
    bit_identical = False
    tolerances: ClassVar[dict[str, tuple[float, float]]] = {"float32": (1e-5, 1e-5)}

    mlp_width: int = 32
    init_c: float = 0.1
    init_L: float = 512.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("mlp_width", check_int("mlp_width", self.mlp_width, minimum=1, maximum=MAX_WIDTH))
        self._set("init_c", check_finite_float("init_c", self.init_c, positive=True))
        self._set("init_L", check_finite_float("init_L", self.init_L, positive=True))
        self._set("eps", check_finite_float("eps", self.eps, positive=True))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        w, h = self.mlp_width, self.num_heads
        return {"c": (), "L_multiplier": (), "w1": (w,), "b1": (w,), "w2": (w, h), "b2": (h,)}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        shapes = self.param_shapes()
        bound2 = 1.0 / np.sqrt(self.mlp_width)
        return {
            "c": np.array(self.init_c),
            "L_multiplier": np.array(1.0),
            "w1": rng.uniform(-1.0, 1.0, size=shapes["w1"]),
            "b1": rng.uniform(-1.0, 1.0, size=shapes["b1"]),
            "w2": rng.uniform(-bound2, bound2, size=shapes["w2"]),
            "b2": rng.uniform(-bound2, bound2, size=shapes["b2"]),
        }

    def temporaries_per_pair(self) -> int:
        return 2 * self.mlp_width + 8  # the hidden layer and its ReLU, per (query, key)

    def compute(self, xp, q_pos, k_pos, heads, params):
        i = xp.float(q_pos)  # (..., Lq, 1)
        rel = i - xp.float(k_pos)  # (..., Lq, Lk)
        c = params["c"]
        threshold = xp.abs(params["L_multiplier"] * self.init_L)
        normaliser = xp.log(xp.abs(c * xp.maximum(i, threshold)) + 1.0) + self.eps
        x = xp.log(xp.abs(c * rel) + 1.0) / normaliser
        w2 = xp.take_axis(params["w2"], heads, 1)
        b2 = xp.take_axis(params["b2"], heads, 0)
        return xp.scalar_mlp(x, params["w1"], params["b1"], w2, b2)  # (..., H, Lq, Lk)
