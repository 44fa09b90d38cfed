"""An example posbias plugin: ``example/linear_window``.

``bias[h, i, j] = -|i - j| / (h + 2)`` within ``window`` tokens, ``penalty``
beyond. Installing this package (``pip install examples/posbias-plugin-example``)
makes ``posbias.get("example/linear_window", num_heads=H)`` work without any
import: posbias finds it through the ``posbias.biases`` entry point.

Note the class is *not* decorated with ``@posbias.register``: the entry point
registers it under its entry-point name on first lookup.
"""

from __future__ import annotations

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

    def compute(self, xp, q_pos, k_pos, heads, params):
        m = xp.constant(1.0 / (heads + 2.0))[:, None, None]
        distance = xp.abs(k_pos - q_pos)[..., None, :, :]
        inside = m * xp.float(-distance)
        return xp.where(distance <= self.window, inside, xp.constant(np.float64(self.penalty)))
