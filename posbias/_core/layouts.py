"""Sequence layouts for sequence-parallel attention, shared by the JAX and PyTorch engines.

A sequence of ``L`` tokens sharded over ``n`` devices is cut into chunks:

* ``"contiguous"``: device ``d`` holds chunk ``d`` of ``n`` (positions
  ``d·L/n … (d+1)·L/n - 1``). Under causal masking device ``n-1`` does ``n``
  times the work of device 0.
* ``"zigzag"``: the sequence is cut into ``2n`` chunks and device ``d`` holds
  chunks ``d`` and ``2n-1-d``, so every device holds one early and one late
  chunk and does the same causal work (the load-balanced layout of
  ring-flash-attention and Megatron context parallelism).

Under causal masking a (query chunk ``a``, key chunk ``b``) pair is either
fully visible (``b < a``), the causal diagonal (``b == a``) or fully hidden
(``b > a``, skipped). Chunk ids and positions are plain arithmetic, so they
work on Python ints (PyTorch ranks) and traced device indices (JAX).

    >>> from posbias._core import layouts
    >>> layouts.chunk_ids("zigzag", 4, 1)
    [1, 6]
    >>> layouts.layout_positions(16, 4, "zigzag")[:8].tolist()
    [0, 1, 14, 15, 2, 3, 12, 13]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidArgumentError

ORDERS = ("contiguous", "zigzag")
FULL, DIAGONAL, HIDDEN = 0, 1, 2


def check_order(order: Any) -> str:
    """``order`` if it names a layout of :data:`ORDERS`, else a clear error."""
    if order not in ORDERS:
        raise InvalidArgumentError(f"order must be one of {list(ORDERS)}, got {order!r}.")
    return order


def chunks_per_device(order: str) -> int:
    """1 chunk per device for ``"contiguous"``, 2 for ``"zigzag"``."""
    return 2 if order == "zigzag" else 1


def chunk_ids(order: str, shards: int, device: Any) -> list[Any]:
    """The global chunk indices device ``device`` holds (int or traced)."""
    if order == "zigzag":
        return [device, 2 * shards - 1 - device]
    return [device]


def check_divisible(length: int, shards: int, order: str, what: str = "the sequence") -> int:
    """The chunk length, or an error when ``length`` does not split evenly."""
    pieces = shards * chunks_per_device(order)
    if length % pieces:
        raise InvalidArgumentError(
            f"{what} has length {length}, which does not split into {pieces} equal chunks "
            f"({shards} shards, order={order!r}). Pad it to a multiple of {pieces} at the end "
            "and slice the output: with causal=True the padding changes no real token's "
            "output; without causal masking real tokens would attend to the padding, so "
            "choose a length that divides evenly."
        )
    return length // pieces


def layout_positions(length: int, shards: int, order: str) -> np.ndarray:
    """``(L,)`` global positions of the tokens in shard order (device 0's first)."""
    check_order(order)
    size = check_divisible(length, shards, order)
    ids = [c for d in range(shards) for c in chunk_ids(order, shards, d)]
    return np.concatenate([np.arange(c * size, (c + 1) * size) for c in ids])


def relation(q_chunk: Any, k_chunk: Any, xp: Any = None) -> Any:
    """:data:`FULL`, :data:`DIAGONAL` or :data:`HIDDEN` for a causal chunk pair."""
    if xp is None:
        return FULL if k_chunk < q_chunk else DIAGONAL if k_chunk == q_chunk else HIDDEN
    return xp.where(k_chunk < q_chunk, FULL, xp.where(k_chunk == q_chunk, DIAGONAL, HIDDEN))
