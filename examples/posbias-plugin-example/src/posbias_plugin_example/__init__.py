"""An example posbias plugin: ``example/linear_window``.

``bias[h, i, j] = -|i - j| / (h + 2)`` within ``window`` tokens, ``penalty``
beyond. Installing this package (``pip install examples/posbias-plugin-example``)
makes ``posbias.get("example/linear_window", num_heads=H)`` work without any
import: posbias finds it through the ``posbias.biases`` entry point.

Note the class is *not* decorated with ``@posbias.register``: the entry point
registers it under its entry-point name on first lookup.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

import posbias


class LinearWindow(posbias.BiasSpec):
    """ALiBi-like slope ``1/(h+2)`` inside a window, a constant penalty outside.

    Args:
        num_heads: ``H``.
        window: distance up to which the linear slope applies.
        penalty: the bias beyond the window.
    """

    toeplitz = True  # depends on j - i only: the fast attention paths apply
    window: int = 4
    penalty: float = -10.0

    def __post_init__(self) -> None:
        super().__post_init__()  # checks num_heads
        # strict types: a bool is not an int, a string is not a number (a YAML config
        # may hold "4"); errors are posbias errors that name the argument
        if isinstance(self.window, bool) or not isinstance(self.window, numbers.Integral):
            raise posbias.InvalidTypeError(f"window must be an int, got {self.window!r}.")
        if not 0 <= self.window <= 2**40:
            raise posbias.InvalidArgumentError(f"window must be in [0, 2^40], got {self.window}.")
        if isinstance(self.penalty, bool) or not isinstance(self.penalty, numbers.Real):
            raise posbias.InvalidTypeError(f"penalty must be a real number, got {self.penalty!r}.")
        if not math.isfinite(self.penalty):
            raise posbias.InvalidArgumentError(f"penalty must be finite, got {self.penalty}.")
        self._set("window", int(self.window))
        self._set("penalty", float(self.penalty))

    def compute(self, xp, q_pos, k_pos, heads, params):
        m = xp.constant(1.0 / (heads + 2.0))[:, None, None]
        distance = xp.abs(k_pos - q_pos)[..., None, :, :]
        inside = 0.0 - m * xp.float(distance)  # 0 - x: a zero distance gives +0.0, not -0.0
        return xp.where(distance <= self.window, inside, xp.constant(np.float64(self.penalty)))
