"""2-D biases for vision transformers, over (row, col) patch positions.

Positions are ``(L, 2)`` / ``(B, L, 2)`` integer (row, col) arrays; with
lengths instead, token ``t`` sits at ``(t // W, t % W)`` of a row-major grid of
width ``W`` (the window width, or ``grid[1]`` for ``alibi_2d``).

* ``swin`` — Swin V1 (Liu et al., ICCV 2021): a learned table over the
  ``(2Wh-1)·(2Ww-1)`` relative offsets ``(dy, dx) = (i_row - j_row, i_col - j_col)``
  inside a ``window = (Wh, Ww)``; offsets beyond the window are clipped to it.
* ``swin_v2_cpb`` — Swin V2 continuous position bias (Liu et al., CVPR 2022):
  ``16·sigmoid(MLP(ĉ))`` with log-spaced coordinates
  ``ĉ = sign(c)·log2(1 + 8|c|/(W-1)) / log2(8)`` and a 2 → 512 → H ReLU MLP.
* ``alibi_2d`` — ``-m_h · sqrt(dy² + dx²)`` with the paper's ALiBi slopes.
"""

from __future__ import annotations

from typing import ClassVar

import einops
import numpy as np

from .._core.checks import MAX_WIDTH, check_finite_float, check_int
from ..errors import InvalidArgumentError
from ..positions import decode_points
from ..registry import register
from ..slopes import alibi_slopes
from ..spec import BiasSpec


def _pair(name: str, value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InvalidArgumentError(f"{name} must be (rows, cols), got {value!r}.")
    return tuple(
        check_int(f"{name}[{i}]", v, minimum=1, maximum=MAX_WIDTH) for i, v in enumerate(value)
    )


def _offsets(q_pos, k_pos):
    (qr, qc), (kr, kc) = decode_points(q_pos), decode_points(k_pos)
    return qr - kr, qc - kc  # (..., Lq, Lk)


class _Windowed(BiasSpec):
    position_dims = 2
    learnable = True

    window: tuple[int, int] = (7, 7)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("window", _pair("window", self.window))

    def grid_width(self) -> int:
        return self.window[1]

    @classmethod
    def parity_examples(cls, num_heads: int) -> list[BiasSpec]:
        return [cls(num_heads=num_heads, window=(3, 4))]


@register("swin")
class Swin(_Windowed):
    """Swin V1 relative position bias table (Liu et al. 2021).

    Args:
        num_heads: ``H``.
        window: ``(Wh, Ww)`` (default ``(7, 7)``).

    Parameters: ``table`` ``((2Wh-1)·(2Ww-1), H)``, initialised from a normal
    of std 0.02 truncated at ±2 std (as Swin), seeded NumPy.

    Example:
        >>> import posbias
        >>> posbias.get("swin", num_heads=3, window=(2, 2)).bias(q_len=4, k_len=4).shape
        (3, 4, 4)
    """

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        rows = (2 * self.window[0] - 1) * (2 * self.window[1] - 1)
        return {"table": (rows, self.num_heads)}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        table = rng.normal(0, 0.02, self.param_shapes()["table"])
        return {"table": np.clip(table, -0.04, 0.04)}

    def compute(self, xp, q_pos, k_pos, heads, params):
        wh, ww = self.window
        dy, dx = _offsets(q_pos, k_pos)
        dy = xp.minimum(xp.maximum(dy, 1 - wh), wh - 1)
        dx = xp.minimum(xp.maximum(dx, 1 - ww), ww - 1)
        index = (dy + (wh - 1)) * (2 * ww - 1) + (dx + (ww - 1))
        values = xp.take(xp.take_axis(params["table"], heads, 1), index)
        return einops.rearrange(values, "... q k h -> ... h q k")


@register("swin_v2_cpb")
class SwinV2CPB(_Windowed):
    """Swin V2 continuous position bias, ``16·sigmoid(MLP(log-spaced (dy, dx)))``.

    Args:
        num_heads: ``H``.
        window: ``(Wh, Ww)`` used to normalise offsets (default ``(8, 8)``).
        hidden: MLP width (512, as Swin V2).

    Parameters: ``w1`` ``(2, hidden)``, ``b1`` ``(hidden,)``, ``w2`` ``(hidden, H)``
    (no output bias, as Swin V2), ``torch.nn.Linear``-style uniform init.

    Example:
        >>> import posbias
        >>> b = posbias.get("swin_v2_cpb", num_heads=2, window=(2, 2)).bias(q_len=4, k_len=4)
        >>> bool(((b > 0) & (b < 16)).all())
        True
    """

    bit_identical = False
    tolerances: ClassVar[dict[str, tuple[float, float]]] = {"float32": (1e-5, 1e-5)}

    window: tuple[int, int] = (8, 8)
    hidden: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("hidden", check_int("hidden", self.hidden, minimum=1, maximum=MAX_WIDTH))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"w1": (2, self.hidden), "b1": (self.hidden,), "w2": (self.hidden, self.num_heads)}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        shapes = self.param_shapes()
        b1, b2 = 1 / np.sqrt(2), 1 / np.sqrt(self.hidden)
        return {
            "w1": rng.uniform(-b1, b1, shapes["w1"]),
            "b1": rng.uniform(-b1, b1, shapes["b1"]),
            "w2": rng.uniform(-b2, b2, shapes["w2"]),
        }

    def temporaries_per_pair(self) -> int:
        return 2 * self.hidden + 8  # the MLP's hidden layer and its ReLU, per (query, key)

    def compute(self, xp, q_pos, k_pos, heads, params):
        coords = []
        for offset, size in zip(_offsets(q_pos, k_pos), self.window, strict=True):
            c = xp.float(offset) * (8.0 / max(size - 1, 1))
            sign = xp.float(offset > 0) - xp.float(offset < 0)
            coords.append(sign * xp.log1p(xp.abs(c)) * float(1.0 / np.log(8.0)))
        features = xp.stack(coords, -1)  # (..., Lq, Lk, 2)
        hidden = xp.relu(xp.matmul(features, params["w1"]) + params["b1"])
        out = xp.matmul(hidden, xp.take_axis(params["w2"], heads, 1))
        return einops.rearrange(16.0 * xp.sigmoid(out), "... q k h -> ... h q k")


@register("alibi_2d")
class Alibi2D(BiasSpec):
    """2-D ALiBi: ``-m_h`` times the Euclidean distance between patch positions.

    Args:
        num_heads: ``H``.
        max_bias: ``B`` of the paper's slope schedule (8).
        grid: ``(rows, cols)`` to map token indices to positions when lengths
            are given (positions as ``(L, 2)`` arrays need no grid).

    Example:
        >>> import posbias
        >>> spec = posbias.get("alibi_2d", num_heads=1, max_bias=8.0)
        >>> spec.bias(q_pos=[[0, 0]], k_pos=[[0, 0], [3, 4]]).tolist()
        [[[0.0, -0.01953125]]]
    """

    position_dims = 2
    bit_identical = False  # sqrt is exact, but XLA may fuse the product differently
    tolerances: ClassVar[dict[str, tuple[float, float]]] = {"float32": (1e-6, 1e-12)}

    max_bias: float = 8.0
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("max_bias", check_finite_float("max_bias", self.max_bias, positive=True))
        if self.grid is not None:
            self._set("grid", _pair("grid", self.grid))
        self._set("_slopes", alibi_slopes(self.num_heads, self.max_bias))

    @property
    def slopes(self) -> np.ndarray:
        return self._slopes

    def grid_width(self) -> int:
        if self.grid is None:
            return super().grid_width()
        return self.grid[1]

    @classmethod
    def parity_examples(cls, num_heads: int) -> list[BiasSpec]:
        return [cls(num_heads=num_heads, grid=(3, 5))]

    def compute(self, xp, q_pos, k_pos, heads, params):
        dy, dx = _offsets(q_pos, k_pos)
        distance = xp.sqrt(xp.float(dy * dy + dx * dx))
        m = xp.constant(self._slopes[heads])[:, None, None]
        return 0.0 - m * distance[..., None, :, :]  # 0 - x: zero distance gives +0.0
