"""KERPLE: kernelized relative positional embeddings (Chi et al., NeurIPS 2022).

https://arxiv.org/abs/2205.09921

* ``kerple_log``:   ``bias[h, i, j] = -r1_h · log(1 + r2_h · |i - j|)``
* ``kerple_power``: ``bias[h, i, j] = -r1_h · |i - j| ^ r2_h``, ``r2_h ∈ (0, 2]``

Per-head learnable ``r1``, ``r2``. Initialisation as in the authors'
GPT-NeoX implementation: ``r1 ~ U(0, 2)``, ``r2 ~ U(0, 1)`` (log) or
``U(0, 2)`` (power), seeded NumPy.

**Parameters are stored raw; ``compute`` constrains them.** The bias uses
``max(r1, 0.01)`` and ``max(r2, 0.01)`` (and ``min(r2, 2)`` for the power
exponent) — the clamp the reference applies to the stored values after every
optimiser step, applied in the forward pass instead. So any finite values are
valid parameters: whatever state training reaches (an optimiser step may take
``r1`` or ``r2`` below 0.01, even below 0) exports, reloads and gives the same
bias in every framework. Only NaN and infinities are rejected. A raw value below
the bound gets no gradient from the bias (only weight decay moves it), as a
clamped value in the reference does.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..registry import register
from ..spec import BiasSpec

EPS = 0.01


class _Kerple(BiasSpec):
    toeplitz = True
    learnable = True
    bit_identical = False  # log / pow differ by an ulp between frameworks
    tolerances: ClassVar[dict[str, tuple[float, float]]] = {"float32": (2e-6, 1e-6)}

    _r2_scale: ClassVar[float] = 1.0
    _r2_max: ClassVar[float | None] = None

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"r1": (self.num_heads,), "r2": (self.num_heads,)}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            "r1": rng.uniform(0.0, 2.0, size=self.num_heads),
            "r2": rng.uniform(0.0, self._r2_scale, size=self.num_heads),
        }

    def _params(self, xp, params, heads):
        """``r1``, ``r2`` of ``heads`` as used: the raw values clamped to ``[EPS, r2_max]``."""
        r1 = xp.maximum(xp.take_axis(params["r1"], heads, 0), EPS)[:, None, None]
        r2 = xp.maximum(xp.take_axis(params["r2"], heads, 0), EPS)
        if self._r2_max is not None:
            r2 = xp.minimum(r2, self._r2_max)
        return r1, r2[:, None, None]


@register("kerple_log")
class KerpleLog(_Kerple):
    """KERPLE logarithmic kernel, ``-r1·log(1 + r2·|i-j|)`` (Chi et al. 2022).

    Parameters ``r1``, ``r2`` of shape ``(H,)``, stored raw: the bias uses
    ``max(r, 0.01)``, so any finite values load (module docstring).

    Example:
        >>> import numpy as np, posbias
        >>> spec = posbias.get("kerple_log", num_heads=1)
        >>> p = {"r1": np.array([1.0]), "r2": np.array([1.0])}
        >>> spec.bias(q_len=1, k_len=3, params=p, dtype="float64").round(4).tolist()
        [[[-1.0986, -0.6931, 0.0]]]
    """

    def compute(self, xp, q_pos, k_pos, heads, params):
        r1, r2 = self._params(xp, params, heads)
        distance = xp.float(xp.abs(k_pos - q_pos))[..., None, :, :]
        return 0.0 - r1 * xp.log1p(r2 * distance)  # 0 - x: zero distance gives +0.0


@register("kerple_power")
class KerplePower(_Kerple):
    """KERPLE power kernel, ``-r1·|i-j|^r2`` with ``r2 ∈ (0, 2]`` (Chi et al. 2022).

    Parameters ``r1``, ``r2`` of shape ``(H,)``, stored raw: the bias uses
    ``max(r1, 0.01)`` and ``min(max(r2, 0.01), 2)``, so any finite values load.

    Example:
        >>> import numpy as np, posbias
        >>> spec = posbias.get("kerple_power", num_heads=1)
        >>> p = {"r1": np.array([0.5]), "r2": np.array([2.0])}
        >>> spec.bias(q_len=1, k_len=3, params=p).tolist()
        [[[-2.0, -0.5, 0.0]]]
    """

    _r2_scale = 2.0
    _r2_max = 2.0

    def compute(self, xp, q_pos, k_pos, heads, params):
        r1, r2 = self._params(xp, params, heads)
        distance = xp.float(xp.abs(k_pos - q_pos))[..., None, :, :]
        # |d|^r2 as exp(r2·log|d|) with 0^r2 = 0, written with where so that the
        # gradient at d = 0 stays finite on every framework
        safe = xp.where(distance > 0, distance, 1.0)
        return 0.0 - r1 * xp.where(distance > 0, xp.exp(r2 * xp.log(safe)), 0.0)
