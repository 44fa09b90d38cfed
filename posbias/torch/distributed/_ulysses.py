"""Head-parallel (Ulysses) attention over ``torch.distributed``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..._core import bias_arg as _bias_arg
from ..._core import dispatch as _dispatch
from ...backends.torch import TorchBackend
from ...errors import InvalidArgumentError
from ._comm import _AllToAll, _group_info, _local_positions, _prepare
from ._layout import layout_positions


def head_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Any = None,
    *,
    group: Any = None,
    causal: bool = False,
    order: str = "contiguous",
    q_pos: Any = None,
    k_pos: Any = None,
    scale: float | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """Head-parallel (Ulysses) attention with an additive bias; layout ``(B, H, L, D)``.

    Sequence shards in, sequence shards out: an ``all_to_all_single`` gives each
    rank the whole sequence for ``H / world`` heads (global heads
    ``rank·H/world …``, whose slopes and table columns the bias uses), the
    rank runs :func:`posbias.torch.attention` on it (blockwise, memory-lean),
    and a second all-to-all returns this rank's rows for every head. Each rank
    sends ``(world-1)/world`` of its q, k, v and output: the volume does not
    grow with the number of steps, unlike the ring's.

    Args:
        q: ``(B, H, L_local, D)`` this rank's queries (``H`` divisible by world).
        k: ``(B, H_kv, L_local, D)`` this rank's keys (``H_kv`` divisible by world).
        v: ``(B, H_kv, L_local, D)`` this rank's values.
        bias: registered name, ``BiasSpec``, ``posbias.torch.PositionalBias`` or None.
        group: the process group (default: the world).
        causal: causal masking in sequence order (the natural order of the
            tokens; zigzag shards are put back in order first).
        order: ``"contiguous"`` or ``"zigzag"``: how the sequence is split (:func:`shard`).
        q_pos: ``(L_local,)`` or ``(B, L_local)`` explicit bias positions of this
            rank's queries, gathered over the ranks in rank order (``order``
            must then be ``"contiguous"``). Causal masking follows the
            sequence order, as in :func:`posbias.torch.attention`.
        k_pos: the same for the keys.
        scale: score scale; default ``1/√D``.
        implementation: passed to :func:`posbias.torch.attention`.

    Returns:
        ``(B, H, L_local, D)`` in ``q``'s dtype.
    """

    def local_checks(batch, heads, kv_heads, q_len, k_len, world):
        for what, count in (("query heads", heads), ("key/value heads", kv_heads)):
            if count % world:
                raise InvalidArgumentError(
                    f"head_parallel_attention splits the heads over {world} ranks, but there "
                    f"are {count} {what}; use ring_attention, or a head count divisible by "
                    f"{world}."
                )
        if q_pos is None:
            return None
        if order != "contiguous":
            raise InvalidArgumentError(
                "explicit q_pos/k_pos are gathered in rank order; leave order='contiguous'."
            )
        return tuple(
            _local_positions(p, batch, q_len, n, q.device)
            for p, n in ((q_pos, "q_pos"), (k_pos, "k_pos"))
        )

    (rank, world, _, heads, _, length, _), positions = _prepare(
        q, k, v, group, causal, order, q_pos, k_pos, None, "head_parallel_attention",
        local_checks=local_checks,
    )  # fmt: skip
    width = heads // world
    bias_fn = _bias_arg.head_bias(bias, heads, range(rank * width, (rank + 1) * width), "torch")
    # sequence shards -> head shards: (B, H/world, L, D), rank 0's tokens first
    q, k, v = (_AllToAll.apply(t, group, 1, 2) for t in (q, k, v))
    inverse = None
    if order == "zigzag":
        inverse = torch.as_tensor(
            np.argsort(layout_positions(length * world, world, order)), device=q.device
        )
        q, k, v = (t.index_select(2, inverse) for t in (q, k, v))
    if positions is not None:
        q_pos, k_pos = (_gather_positions(p, group) for p in positions)
    out = _dispatch.attend(
        TorchBackend(q.device),
        q,
        k,
        v,
        bias_fn,
        causal=causal,
        scale=scale,
        q_pos=q_pos,
        k_pos=k_pos,
        implementation=implementation,
    )
    if inverse is not None:
        out = out.index_select(2, torch.argsort(inverse))
    return _AllToAll.apply(out, group, 2, 1)


def _gather_positions(pos: torch.Tensor, group: Any) -> torch.Tensor:
    _, world = _group_info(group)
    parts = [torch.empty_like(pos) for _ in range(world)]
    dist.all_gather(parts, pos.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
