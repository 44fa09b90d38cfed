"""The reference tile (textbook formula) and the blockwise loop over query rows."""

from __future__ import annotations

import dataclasses
from typing import Any

from . import partial as _partial
from .problem import Problem


def reference_tile(p: Problem, r0: int, r1: int) -> Any:
    """Rows ``[r0, r1)`` by the textbook formula in ``p.compute`` (any backend)."""
    xp = p.xp
    extent = p.extent(r0, r1)
    if extent == 0:
        return xp.zeros((p.batch, p.heads, r1 - r0, xp.shape(p.q)[-1]), p.compute)
    q = xp.cast(p.q[:, :, r0:r1], p.compute)
    k = xp.cast(p.k[:, :, :extent], p.compute)
    v = xp.cast(p.v[:, :, :extent], p.compute)
    scores = xp.einsum("bhqd,bhkd->bhqk", q, k) * p.scale
    bias = p.bias_tile(r0, r1, extent)
    if bias is not None:
        scores = scores + bias
    visible = p.visible(r0, r1, extent)
    if visible is not None:
        visible = visible[:, None]  # one mask for every head
    return _partial.softmax_rows(xp, scores, visible, v, p.compute)[0]


#: tying the next block's inputs to the last output orders the blocks
_SEQUENCED = ("q", "k", "v")


def blockwise(p: Problem, tile: Any, block_size: int) -> Any:
    """Concatenate ``tile(p, r0, r1)`` over blocks of ``block_size`` query rows.

    Each block starts after the previous one finished (``xp.after``), so a
    compiler cannot keep every block's scores alive at once: peak memory stays
    at one block's ``(B, H, n, Lk)``.
    """
    outs = []
    for r0 in range(0, p.q_len, block_size):
        if outs:
            names = [f for f in _SEQUENCED if getattr(p, f) is not None]
            fresh = p.xp.after(outs[-1], [getattr(p, f) for f in names])
            p = dataclasses.replace(p, **dict(zip(names, fresh, strict=True)))
        outs.append(tile(p, r0, min(r0 + block_size, p.q_len)))
    return outs[0] if len(outs) == 1 else p.xp.concat(outs, 2)
