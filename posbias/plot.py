"""Heatmaps of a bias, one panel per head (needs matplotlib: ``pip install 'posbias[plot]'``).

>>> import posbias, tempfile, os
>>> from posbias.plot import plot_bias
>>> path = os.path.join(tempfile.mkdtemp(), "alibi.png")
>>> fig = plot_bias(posbias.get("alibi", num_heads=4), length=16, path=path)
>>> os.path.getsize(path) > 0
True
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .errors import BackendUnavailableError
from .spec import BiasSpec


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BackendUnavailableError(
            "plotting needs matplotlib: pip install 'posbias[plot]'"
        ) from exc
    return plt


def grid_side(length: int) -> int:
    """The side of the square grid that holds ``length`` patches: ``ceil(sqrt(L))``."""
    return math.isqrt(length - 1) + 1


def describe_positions(spec: BiasSpec, length: int) -> str:
    """What the rows and columns of :func:`bias_matrix` are, in words."""
    if spec.position_dims == 2:
        side = grid_side(length)
        return f"patches 0..{side * side - 1} of a {side}x{side} grid, row-major"
    return f"positions i, j in 0..{length - 1}"


def bias_matrix(spec: BiasSpec, length: int) -> np.ndarray:
    """The float64 bias ``(H, L, L)`` that :func:`plot_bias` draws.

    Sequence biases use positions ``0 .. L-1``; 2-D biases a square grid of
    ``ceil(sqrt(L))²`` patches in row-major order.
    """
    if spec.position_dims == 2:
        side = grid_side(length)
        points = np.array([[r, c] for r in range(side) for c in range(side)])
        return np.asarray(spec.bias(q_pos=points, k_pos=points, dtype="float64"))
    return np.asarray(spec.bias(q_len=length, k_len=length, dtype="float64"))


def plot_bias(
    spec: BiasSpec,
    *,
    length: int = 32,
    heads: int | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """Draw ``bias[h]`` for the first ``heads`` heads (default all, at most 16).

    Rows are queries ``i``, columns keys ``j``. Returns the matplotlib figure
    and writes it to ``path`` if given.
    """
    plt = _pyplot()
    values = bias_matrix(spec, length)
    count = min(spec.num_heads if heads is None else heads, 16, spec.num_heads)
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= count:
            ax.axis("off")
            continue
        image = ax.imshow(values[h], cmap="viridis", interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    what = describe_positions(spec, length)
    fig.suptitle(f"{spec.name or type(spec).__name__}: {spec.num_heads} heads, {what}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
        plt.close(fig)
    return fig
