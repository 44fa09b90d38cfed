"""The reference tile (textbook formula) and the blockwise loop over query rows."""

from __future__ import annotations

import dataclasses
from typing import Any

from . import partial as _partial
from .problem import Problem


def reference_partial(p: Problem, r0: int, r1: int) -> _partial.Partial:
    """Rows ``[r0, r1)`` by the textbook formula: ``(out, lse)`` in ``p.compute``.

    ``lse`` is each row's log-sum-exp over its visible keys (the lowest finite
    value for a row that sees none, whose ``out`` is 0): what the blockwise
    backward pass (:mod:`posbias._core.backward`) recomputes probabilities from.
    """
    xp = p.xp
    extent = p.extent(r0, r1)
    if extent == 0:
        return _partial.empty(xp, p.batch, p.heads, r1 - r0, xp.shape(p.q)[-1], p.compute)
    q = xp.cast(p.q[:, :, r0:r1], p.compute)
    k = xp.cast(p.k[:, :, :extent], p.compute)
    v = xp.cast(p.v[:, :, :extent], p.compute)
    scores = xp.einsum("bhqd,bhkd->bhqk", q, k) * p.scale
    bias = p.bias_tile(r0, r1, extent)
    if bias is not None:
        scores = scores + bias
    scores, visible = p.masked_scores(scores, r0, r1, extent)
    return _partial.softmax_rows(xp, scores, visible, v, p.compute)


def reference_tile(p: Problem, r0: int, r1: int) -> Any:
    """Rows ``[r0, r1)`` by the textbook formula in ``p.compute`` (any backend)."""
    return reference_partial(p, r0, r1)[0]


#: tying the next block's inputs to the last output orders the blocks (the positions
#: too: a bias tile depends on nothing else, and could be computed early for every block)
SEQUENCED = ("q", "k", "v", "q_slot", "k_slot", "q_pos", "k_pos")


def blockwise(p: Problem, tile: Any, block_size: int) -> Any:
    """Concatenate ``tile(p, r0, r1)`` over blocks of ``block_size`` query rows.

    A tile returns rows ``(B, H, n, ...)`` or a tuple of them (``(out, lse)``),
    each concatenated along the row axis (2). Each block starts after the
    previous one finished (``xp.after``), so a compiler cannot keep every
    block's scores alive at once: peak memory stays at one block's
    ``(B, H, n, Lk)``.
    """
    outs, first = [], p
    for r0 in range(0, p.q_len, block_size):
        if outs:  # tie the original inputs: a chain of ties could fuse into one late read
            last = outs[-1][0] if isinstance(outs[-1], tuple) else outs[-1]
            p = sequenced(first, last, SEQUENCED)
        outs.append(tile(p, r0, min(r0 + block_size, p.q_len)))
    if isinstance(outs[0], tuple):
        return tuple(_concat(p.xp, list(parts)) for parts in zip(*outs, strict=True))
    return _concat(p.xp, outs)


def sequenced(p: Problem, done: Any, names: tuple[str, ...]) -> Problem:
    """``p`` whose fields ``names`` are only available once ``done`` is computed."""
    names = tuple(f for f in names if getattr(p, f) is not None)
    fresh = p.xp.after(done, [getattr(p, f) for f in names])
    return dataclasses.replace(p, **dict(zip(names, fresh, strict=True)))


def _concat(xp, parts: list) -> Any:
    return parts[0] if len(parts) == 1 else xp.concat(parts, 2)
