"""Head-parallel (Ulysses) attention over ``torch.distributed``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..._core import dispatch as _dispatch
from ...backends.torch import TorchBackend
from ...errors import InvalidArgumentError
from ._comm import _AllToAll, _count, read_call
from ._layout import layout_positions

_KEYWORDS = (
    "group",
    "causal",
    "order",
    "q_pos",
    "k_pos",
    "segment_ids",
    "key_mask",
    "scale",
    "log_gates",
    "log_gates_after",
    "implementation",
)


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
    segment_ids: Any = None,
    key_mask: Any = None,
    scale: float | None = None,
    log_gates: Any = None,
    log_gates_after: Any = None,
    implementation: str = "auto",
    **removed: Any,
) -> torch.Tensor:
    """Head-parallel (Ulysses) attention with an additive bias; layout ``(B, H, L, D)``.

    Sequence shards in, sequence shards out: an ``all_to_all_single`` gives each
    rank the whole sequence for ``H / world`` heads (global heads
    ``rank·H/world …``, whose slopes and table columns the bias uses — the
    Toeplitz and FlashAttention fast paths still apply), the rank runs
    :func:`posbias.torch.attention` on it (blockwise, memory-lean), and a
    second all-to-all returns this rank's rows for every head. Each rank sends
    ``(world-1)/world`` of its q, k, v and output: the volume does not grow
    with the number of steps, unlike the ring's.

    Args:
        q: ``(B, H, L_local, D)`` this rank's queries (``H`` divisible by world).
        k: ``(B, H_kv, L_local, D)`` this rank's keys (``H_kv`` divisible by world).
        v: ``(B, H_kv, L_local, D)`` this rank's values.
        bias: registered name, ``BiasSpec``, its config dict,
            ``posbias.torch.PositionalBias`` or None, with ``H`` heads (the
            same on every rank; checked before any exchange).
        group: the process group (default: the world).
        causal: causal masking in sequence order (the natural order of the
            tokens; zigzag shards are put back in order first).
        order: ``"contiguous"`` or ``"zigzag"``: how the sequence is split (:func:`shard`).
        q_pos: ``(L_local,)`` or ``(B, L_local)`` explicit bias positions of this
            rank's queries, gathered with the tokens. Causal masking follows the
            sequence order, as in :func:`posbias.torch.attention`.
        k_pos: the same for the keys.
        segment_ids: ``(B, L_local)`` document ids of this rank's tokens
            (gathered like the tokens; as in :func:`posbias.torch.attention`).
        key_mask: ``(B, L_local)`` bool, True for this rank's real keys
            (gathered like the tokens; bias positions ``cumsum(key_mask) - 1``
            of the whole sequence, as on one device).
        scale: score scale; default ``1/√D``.
        log_gates: ``(B, H, L_local)`` per-token log-gates ``g <= 0`` of this
            rank's tokens (forget gates; see :func:`posbias.torch.attention`):
            exchanged like the queries (whole sequence, ``H / world`` heads),
            then the rank's heads attend as on one device. Differentiable.
        log_gates_after: ``(B, H, L_local)`` log-gates of keys after the query,
            for ``causal=False`` (required there with ``log_gates``).
        implementation: passed to :func:`posbias.torch.attention`.

    Returns:
        ``(B, H, L_local, D)`` in ``q``'s dtype.

    Raises:
        DistributedError: the ranks disagree on shapes or options (on every rank).
        InvalidArgumentError, InvalidTypeError: this rank's own bad input.
    """

    def local_checks(call):
        for what, count in (("query heads", call.heads), ("key/value heads", call.kv_heads)):
            if count % call.world:
                raise InvalidArgumentError(
                    f"head_parallel_attention splits the heads over {call.world} ranks, but "
                    f"there are {count} {what}; use ring_attention, or a head count divisible "
                    f"by {call.world}."
                )
        _dispatch.check_implementation(implementation)

    call = read_call(
        "head_parallel_attention",
        q,
        k,
        v,
        bias,
        group=group,
        causal=causal,
        order=order,
        scale=scale,
        q_pos=q_pos,
        k_pos=k_pos,
        segment_ids=segment_ids,
        key_mask=key_mask,
        log_gates=log_gates,
        log_gates_after=log_gates_after,
        implementation=implementation,
        removed=removed,
        keywords=_KEYWORDS,
        local_checks=local_checks,
    )
    width = call.heads // call.world
    arg = None
    if call.bias is not None:
        arg = call.bias.for_heads(range(call.rank * width, (call.rank + 1) * width))
    # sequence shards -> head shards: (B, H/world, L, D), rank 0's tokens first
    q, k, v = (_AllToAll.apply(t, group, 1, 2) for t in (q, k, v))
    # log-gates (B, H, L_local) of this rank's tokens -> (B, H/world, L): like the queries
    gates = [None, None] if call.gates is None else list(call.gates)
    gates = [None if g is None else _AllToAll.apply(g, group, 1, 2) for g in gates]
    per_token = {
        name: _gather(t, group, call.world)
        for name, t in (
            ("q_pos", call.q_pos),
            ("k_pos", call.k_pos),
            ("segment_ids", call.segment_ids),
            ("key_mask", call.key_mask),
        )
    }
    inverse = None
    if order == "zigzag":
        natural = np.argsort(layout_positions(call.k_len * call.world, call.world, order))
        inverse = torch.as_tensor(natural, device=q.device)
        q, k, v = (t.index_select(2, inverse) for t in (q, k, v))
        gates = [None if g is None else g.index_select(2, inverse) for g in gates]
        per_token = {
            n: None if t is None else t.index_select(-1, inverse) for n, t in per_token.items()
        }
    out = _dispatch.attend(
        TorchBackend(q.device),
        q,
        k,
        v,
        arg,
        causal=call.causal,
        scale=call.scale,
        implementation=implementation,
        log_gates=gates[0],
        log_gates_after=gates[1],
        **per_token,
    )
    if inverse is not None:
        out = out.index_select(2, torch.argsort(inverse))
    return _AllToAll.apply(out, group, 2, 1)


def _gather(t: Any, group: Any, world: int) -> Any:
    """Every rank's ``(..., L_local)`` tensor, concatenated in rank order along the last axis."""
    if t is None:
        return None
    sent = t.to(torch.uint8) if t.dtype == torch.bool else t  # gloo sends no bool
    parts = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(parts, sent.contiguous(), group=group)
    _count("positions", sent.numel() * sent.element_size() * (world - 1))
    out = torch.cat(parts, dim=-1)
    return out.bool() if t.dtype == torch.bool else out
