"""Ring (sequence-parallel) attention over ``torch.distributed``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint

from ..._core import bias_arg as _bias_arg
from ..._core import layouts as _ring
from ..._core import partial as _partial
from ...backends.torch import TorchBackend
from ...errors import InvalidArgumentError
from ._comm import (
    _compute_dtype,
    _count,
    _group_info,
    _local_positions,
    _prepare,
    _RingShift,
    _shift,
)
from ._layout import layout_positions


def ring_attention(
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
    key_padding_mask: Any = None,
    scale: float | None = None,
    checkpoint_tiles: bool = True,
) -> torch.Tensor:
    """Sequence-parallel (ring) attention with an additive bias; layout ``(B, H, L, D)``.

    Each of the ``world`` ranks passes its shard of the sequence, every head.
    The result is this rank's rows of single-device
    :func:`posbias.torch.attention` over the whole sequence (to float32
    rounding), and it is differentiable.

    Args:
        q: ``(B, H, L_local, D)`` this rank's queries. With fewer queries than
            keys (decoding against a sequence-sharded KV cache) ``q`` holds the
            *same* new tokens on every rank; each rank attends to its cache
            block and three all-reduces over ``(B, H, Lq)`` statistics and the
            ``(B, H, Lq, D)`` output merge the results. The queries sit
            bottom-right of the whole cache unless ``q_pos`` is given.
        k: ``(B, H_kv, L_local, D)`` this rank's keys (its cache block when decoding).
        v: ``(B, H_kv, L_local, D)`` this rank's values.
        bias: registered name, ``BiasSpec``, ``posbias.torch.PositionalBias`` or None.
        group: the process group (default: the world).
        causal: key visible iff its position is ``<=`` the query's.
        order: how the sequence is split: ``"contiguous"`` (rank ``r`` holds block
            ``r``) or ``"zigzag"`` (rank ``r`` holds chunks ``r`` and ``2·world-1-r``
            of ``2·world``; equal causal work). See :func:`shard`.
        q_pos: ``(L_local,)`` or ``(B, L_local)`` explicit global positions of this
            rank's queries (non-contiguous shards, packed documents); they
            override ``order`` and every tile is then computed and masked.
        k_pos: the same for this rank's keys (travels with them around the ring).
        segment_ids: ``(B, L_local)`` document ids of this rank's tokens: queries
            see keys of their own document only.
        key_padding_mask: ``(B, L_local)`` bool, True for this rank's real keys
            (padding, or the empty slots of a KV cache block, are hidden). Bias
            positions stay those of ``order`` or ``q_pos``/``k_pos``.
        scale: score scale; default ``1/√D``.
        checkpoint_tiles: with autograd on, recompute each tile's scores in the
            backward pass (``torch.utils.checkpoint``) instead of keeping them:
            activation memory O(L_local·D) per step instead of O(L_local²),
            for about one extra forward of compute.

    Returns:
        ``(B, H, L_local, D)`` in ``q``'s dtype.

    Example (run under ``torchrun --nproc-per-node 2``)::

        import torch, torch.distributed as dist
        from posbias.torch.distributed import ring_attention, shard
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        q, k, v = torch.randn(3, 1, 8, 1024, 64)            # the same on every rank
        local = [shard(t, rank, world, "zigzag") for t in (q, k, v)]
        out = ring_attention(*local, "alibi", causal=True, order="zigzag")
    """
    decode = isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.ndim == k.ndim == 4
    decode = decode and q.shape[2] != k.shape[2]

    def local_checks(batch, heads, kv_heads, q_len, k_len, world):
        if decode and segment_ids is not None:
            raise InvalidArgumentError(
                "segment_ids needs query and key shards of the same length (packed training "
                "sequences); for decoding pass q_pos/k_pos."
            )
        masks = {}
        if q_pos is not None:
            masks["q_pos"] = _local_positions(q_pos, batch, q_len, "q_pos", q.device)
            masks["k_pos"] = _local_positions(k_pos, batch, k_len, "k_pos", q.device)
        if segment_ids is not None:
            masks["segments"] = _local_positions(
                segment_ids, batch, k_len, "segment_ids", q.device, batched=True
            )
        if key_padding_mask is not None:
            real = torch.as_tensor(key_padding_mask, device=q.device)
            if real.dtype != torch.bool or tuple(real.shape) != (batch, k_len):
                raise InvalidArgumentError(
                    f"key_padding_mask must be a bool tensor of shape (B, L_local) = "
                    f"({batch}, {k_len}) (this rank's keys), got {real.dtype} "
                    f"{tuple(real.shape)}."
                )
            masks["real"] = real
        return masks

    (rank, world, _, heads, *_), masks = _prepare(
        q, k, v, group, causal, order, q_pos, k_pos, segment_ids, "ring_attention",
        decode=decode, real=key_padding_mask, local_checks=local_checks,
    )  # fmt: skip
    xp = TorchBackend(q.device)
    compute = _compute_dtype(q)
    scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
    bias_fn = _bias_arg.head_bias(bias, heads, None, "torch")
    group_size = q.shape[1] // k.shape[1]  # K/V travel un-repeated; tiles repeat them

    def tile(qs, ks, vs, qp, kp, diagonal, visible=None):
        def fn(qs, ks, vs):
            return _partial.tile(
                xp, qs, ks, vs, scale=scale, bias_fn=bias_fn, q_pos=qp, k_pos=kp,
                causal=diagonal, compute=compute, visible=visible, kv_group=group_size,
            )  # fmt: skip

        if checkpoint_tiles and torch.is_grad_enabled():
            # keep only the tile's inputs; its scores are recomputed in the backward pass
            return torch.utils.checkpoint.checkpoint(fn, qs, ks, vs, use_reentrant=False)
        return fn(qs, ks, vs)

    if decode:
        return _decode(q, k, v, tile, causal, order, masks, group).to(q.dtype)
    kv = torch.stack([k, v])
    if masks:
        out = _ring_explicit(q, kv, masks, tile, causal, order, group)
    else:
        out = _ring_layout(q, kv, tile, causal, order, group, rank, world)
    return out.to(q.dtype)


def _ring_explicit(q, kv, masks, tile, causal, order, group):
    """Ring over key blocks with explicit positions and/or masks: every tile computed, masked."""
    rank, world = _group_info(group)
    batch, heads, length, dim = q.shape
    if "q_pos" in masks:
        q_pos, k_pos = masks["q_pos"], masks["k_pos"]
    else:  # masks with positions from the layout
        q_pos = k_pos = torch.as_tensor(
            layout_positions(length * world, world, order)[rank * length : (rank + 1) * length],
            device=q.device,
        )
    segment_ids = k_seg = masks.get("segments")
    real = masks.get("real")
    xp = TorchBackend(q.device)
    acc = _partial.empty(xp, batch, heads, length, dim, _compute_dtype(q))
    k_real = None if real is None else real.to(torch.uint8)  # gloo sends no bool
    for step in range(world):
        visible = _partial.key_visibility(
            segment_ids, k_seg, None if k_real is None else k_real.bool()
        )
        acc = _partial.merge(xp, acc, tile(q, kv[0], kv[1], q_pos, k_pos, causal, visible))
        if step < world - 1:
            kv = _RingShift.apply(kv, group, 1)
            k_pos, k_seg, k_real = (
                None if t is None else _shift(t.contiguous(), group, 1)
                for t in (k_pos, k_seg, k_real)
            )
    return acc[0]


def _decode(q, k, v, tile, causal, order, masks, group):
    """Replicated queries against a sequence-sharded KV cache: local tile, merged by all-reduce."""
    from torch.distributed.nn import functional as collective  # all_reduce with autograd

    rank, world = _group_info(group)
    batch, _, q_len, _ = q.shape
    k_len = k.shape[2]
    q_pos, k_pos = masks.get("q_pos"), masks.get("k_pos")
    if q_pos is None:  # keys from the layout, queries bottom-right of the whole cache
        total = k_len * world
        k_pos = layout_positions(total, world, order)[rank * k_len : (rank + 1) * k_len]
        q_pos = np.arange(q_len) + (total - q_len)
        if causal and q_len > total:
            raise InvalidArgumentError(
                f"causal=True with more queries than keys ({q_len} > {total}); pass q_pos."
            )
    q_pos = _local_positions(q_pos, batch, q_len, "q_pos", q.device)
    k_pos = _local_positions(k_pos, batch, k_len, "k_pos", q.device)
    visible = _partial.key_visibility(None, None, masks.get("real"))
    out, lse = tile(q, k, v, q_pos, k_pos, causal, visible)
    top = lse.detach().clone()  # a shift: the result does not depend on it
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    weight = torch.exp(lse - top)
    total_weight = collective.all_reduce(weight, group=group)  # >= 1 on every row
    merged = collective.all_reduce(out * weight[..., None], group=group)
    _count("decode", (top.numel() * 2 + merged.numel()) * top.element_size())
    return merged / total_weight[..., None]


def _ring_layout(q, kv, tile, causal, order, group, rank, world):
    xp = TorchBackend(q.device)
    per = _ring.chunks_per_device(order)
    batch, heads, length, dim = q.shape
    size = length // per
    q_ids = _ring.chunk_ids(order, world, rank)
    acc = [_partial.empty(xp, batch, heads, size, dim, _compute_dtype(q))] * per

    def positions(chunk):
        return torch.arange(chunk * size, (chunk + 1) * size, device=q.device)

    for step in range(world):
        source = (rank - step) % world
        k_ids = _ring.chunk_ids(order, world, source)
        for a in range(per):
            for b in range(per):
                which = _ring.relation(q_ids[a], k_ids[b]) if causal else _ring.FULL
                if which == _ring.HIDDEN:
                    continue
                rows = slice(a * size, (a + 1) * size)
                keys = slice(b * size, (b + 1) * size)
                part = tile(
                    q[:, :, rows],
                    kv[0][:, :, keys],
                    kv[1][:, :, keys],
                    positions(q_ids[a]),
                    positions(k_ids[b]),
                    which == _ring.DIAGONAL,
                )
                acc[a] = _partial.merge(xp, acc[a], part)
        if step < world - 1:
            kv = _RingShift.apply(kv, group, 1)
    out = torch.cat([out for out, _ in acc], dim=2)
    if kv.requires_grad:
        # every rank's backward must run every reverse shift, also when this rank's
        # last received block was hidden: a zero-weight use keeps it in the graph
        out = out + 0.0 * kv.flatten()[0]
    return out
