"""Learned and scaled ALiBi.

* ``alibi_learned``: ``-exp(θ_h)·|i-j|`` with per-head learnable log-slopes
  ``θ``, initialised to the log of the paper's slopes (so it starts as ``alibi``).
* ``alibi_scaled``: slope interpolation for contexts longer than training. A
  static factor (``scale``) multiplies every slope; with ``train_length = T``
  the dynamic rule multiplies the slopes of query ``i`` by
  ``min(1, T / (i + 1))``: the slopes shrink by ``train_length / current_length``
  once the sequence a query sees (its prefix, ``i + 1`` tokens) exceeds ``T``.
  Defining the current length per query keeps tiles, KV-cache decoding and
  sequence parallelism consistent (a row never depends on which keys are in
  the tile).
"""

from __future__ import annotations

import numpy as np

from .._checks import check_finite_float, check_int
from ..registry import register
from ..slopes import SCHEDULES
from ..spec import BiasSpec
from .alibi import Alibi, _check_schedule


@register("alibi_learned")
class AlibiLearned(BiasSpec):
    """ALiBi with learnable per-head log-slopes (``params["log_slopes"]``, shape ``(H,)``).

    Args:
        num_heads: ``H``.
        max_bias: ``B`` of the initial (paper) slopes.
        schedule: ``"paper"`` or ``"geometric"`` for the initial slopes.

    Example:
        >>> import posbias
        >>> spec = posbias.get("alibi_learned", num_heads=8)
        >>> spec.bias(q_len=1, k_len=3)[0].tolist()          # initial = alibi
        [[-1.0, -0.5, 0.0]]
    """

    toeplitz = True
    linear = True
    learnable = True
    exact = False  # exp() differs by an ulp between frameworks

    max_bias: float = 8.0
    schedule: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("max_bias", check_finite_float("max_bias", self.max_bias, positive=True))
        self._set("schedule", _check_schedule(self.schedule))

    @property
    def slopes(self) -> np.ndarray:
        """The *initial* slopes; trained slopes are ``exp(params["log_slopes"])``."""
        return SCHEDULES[self.schedule](self.num_heads, self.max_bias)

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        return {"log_slopes": np.log(self.slopes)}

    def compute(self, xp, q_pos, k_pos, heads, params):
        m = xp.exp(xp.take_axis(params["log_slopes"], heads, 0))[:, None, None]
        return m * xp.float(-xp.abs(k_pos - q_pos))[..., None, :, :]


@register("alibi_scaled")
class AlibiScaled(Alibi):
    """ALiBi with slope interpolation: static ``scale`` and dynamic ``train_length``.

    Args:
        train_length: ``T``; if set, query ``i``'s slopes are multiplied by
            ``min(1, T / (i + 1))``. ``None``: static scaling only.
        (and every ``alibi`` argument; ``scale`` is the static factor)

    Example:
        >>> import posbias
        >>> spec = posbias.get("alibi_scaled", num_heads=1, custom_slopes=[1.0], train_length=2)
        >>> spec.bias(q_pos=[1, 3], k_pos=[0]).tolist()   # row i=3: slope 2/4
        [[[-1.0], [-1.5]]]
    """

    toeplitz = False  # with train_length, rows depend on the query position
    # The dynamic factor divides; XLA on GPU does not round that division like
    # NumPy (seen on an H100: 1-ulp differences), so no bitwise promise.
    exact = False

    train_length: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_length is not None:
            self._set("train_length", check_int("train_length", self.train_length, minimum=1))

    @classmethod
    def parity_examples(cls, num_heads: int) -> list[BiasSpec]:
        return [cls(num_heads=num_heads, scale=0.5), cls(num_heads=num_heads, train_length=4)]

    def symmetric_slopes(self) -> np.ndarray | None:
        return self.slopes if self.train_length is None else None

    def compute(self, xp, q_pos, k_pos, heads, params):
        values = super().compute(xp, q_pos, k_pos, heads, params)
        if self.train_length is None:
            return values
        length = xp.float(xp.maximum(q_pos + 1, 1))  # (..., Lq, 1)
        factor = xp.minimum(self.train_length / length, 1.0)
        return values * factor[..., None, :, :]
