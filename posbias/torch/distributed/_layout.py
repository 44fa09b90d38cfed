"""Sequence layouts of ranks: positions and shards."""

from __future__ import annotations

import numpy as np
import torch

from ..._core import layouts as _ring


def layout_positions(length: int, world: int, order: str = "contiguous") -> np.ndarray:
    """``(L,)`` global positions of a sequence split over ``world`` ranks, rank 0's first.

    Example:
        >>> from posbias.torch.distributed import layout_positions
        >>> layout_positions(8, 2, "zigzag").tolist()
        [0, 1, 6, 7, 2, 3, 4, 5]
    """
    return _ring.layout_positions(length, world, order)


def shard(x: torch.Tensor, rank: int, world: int, order: str = "contiguous", dim: int = 2):
    """This rank's shard of a full-sequence tensor in ``order`` (``dim``: the sequence axis).

    Example:
        >>> import torch
        >>> from posbias.torch.distributed import shard
        >>> shard(torch.arange(8), 1, 2, "zigzag", dim=0).tolist()
        [2, 3, 4, 5]
    """
    positions = layout_positions(x.shape[dim], world, order)
    size = len(positions) // world
    index = torch.as_tensor(positions[rank * size : (rank + 1) * size], device=x.device)
    return x.index_select(dim, index)
