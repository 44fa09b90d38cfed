"""Sequence- and head-parallel attention with biases over ``torch.distributed``.

Every rank passes its *local shard*; the bias is never communicated: each rank
computes its tiles from global positions and global head indices.

* :func:`ring_attention` — sequence (context) parallelism. Each rank holds a
  block of the sequence with every head; key/value blocks travel around the
  ring (``batch_isend_irecv``, ``world - 1`` steps) and the partial results are
  merged exactly by log-sum-exp. Causal attention skips hidden blocks;
  ``order="zigzag"`` balances that work across ranks.
* :func:`head_parallel_attention` — Ulysses-style: one ``all_to_all_single``
  turns sequence shards into head shards (all tokens, ``H / world`` heads), each
  rank attends with the bias of its *global* heads, a second all-to-all turns
  the output back into sequence shards.
* :func:`shard_score_mod` — a FlexAttention ``score_mod`` for a query shard
  against gathered keys, mapping shard-local indices to global positions.

Both attention functions are differentiable (the communication is wrapped in
autograd functions whose backward runs the reverse exchange). Gradients of a
learnable bias module's parameters are each rank's share: all-reduce them as
you do for any replicated parameter (``DistributedDataParallel`` does).

Before communicating, the ranks exchange their shapes and options once
(one small ``all_gather``); a mismatch raises :class:`posbias.DistributedError`
on every rank instead of hanging.

Run with e.g. ``torchrun --nproc-per-node 2 script.py`` (``gloo`` on CPU,
``nccl`` on GPU); see docs/distributed.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint

from .. import _attention, _partial, _ring
from ..backends.torch import TorchBackend
from ..errors import DistributedError, InvalidArgumentError, PosBiasError

__all__ = [
    "head_parallel_attention",
    "layout_positions",
    "ring_attention",
    "shard",
    "shard_score_mod",
    "traffic",
]

#: bytes this process has sent through posbias's exchanges, by kind (see
#: :func:`traffic`); the communication benchmark reads it
_SENT: dict[str, int] = {}


def traffic(reset: bool = False) -> dict[str, int]:
    """Bytes this process sent through posbias collectives so far, by kind.

    ``{"ring": ..., "all_to_all": ..., "handshake": ...}``; ``reset=True``
    zeroes the counters after reading them.
    """
    out = dict(_SENT)
    if reset:
        _SENT.clear()
    return out


def _count(kind: str, nbytes: int) -> None:
    _SENT[kind] = _SENT.get(kind, 0) + int(nbytes)


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


# ----------------------------------------------------------------- exchanges
def _group_info(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError(
            "torch.distributed is not initialised; call "
            "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets the "
            "environment up)."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _peer(group: Any, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


class _RingShift(torch.autograd.Function):
    """Send a tensor to the next rank and receive the previous rank's (backward: reverse)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, step: int) -> torch.Tensor:
        ctx.group, ctx.step = group, step
        return _shift(x.contiguous(), group, step)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return _shift(grad.contiguous(), ctx.group, -ctx.step), None, None


def _shift(x: torch.Tensor, group: Any, step: int) -> torch.Tensor:
    """Receive the tensor of rank ``rank - step`` while sending ours to ``rank + step``."""
    rank, world = _group_info(group)
    received = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, _peer(group, (rank + step) % world), group),
        dist.P2POp(dist.irecv, received, _peer(group, (rank - step) % world), group),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    _count("ring", x.numel() * x.element_size())
    return received


class _AllToAll(torch.autograd.Function):
    """Split ``scatter_dim`` over the ranks, concatenate what arrives along ``gather_dim``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    _, world = _group_info(group)
    sent = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent, group=group)
    _count("all_to_all", sent.numel() * sent.element_size() * (world - 1) // world)
    return torch.cat(received.unbind(0), dim=gather_dim)


_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _agree(group: Any, what: str, facts: dict[str, Any], device: Any) -> None:
    """Raise the same DistributedError on every rank unless all ranks pass equal ``facts``."""
    _, world = _group_info(group)
    values = torch.tensor([int(v) for v in facts.values()], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(gathered, values, group=group)
    _count("handshake", values.numel() * 8 * (world - 1))
    table = torch.stack(gathered).cpu()
    for name, column in zip(facts, table.T, strict=True):
        if bool((column != column[0]).any()):
            raise DistributedError(
                f"{what}: the ranks disagree on {name}: {column.tolist()} (by rank). Every "
                "rank must pass shards of the same shape and the same options."
            )


def _facts(valid, q, k, v, causal, order, q_pos, segment_ids, real) -> dict[str, Any]:
    """What every rank must agree on; the same keys (and count) on every rank, valid or not."""

    def dim(t: Any, i: int) -> int:
        shape = tuple(getattr(t, "shape", ()))
        return shape[i] if len(shape) > i else -1

    dtype = TorchBackend().dtype_name(q.dtype) if isinstance(q, torch.Tensor) else None
    requires = [bool(getattr(t, "requires_grad", False)) for t in (q, k, v)]
    return {
        "inputs valid (0: this rank raised its own error)": valid,
        "batch": dim(q, 0),
        "heads": dim(q, 1),
        "key/value heads": dim(k, 1),
        "query length": dim(q, 2),
        "key length": dim(k, 2),
        "head dim": dim(q, 3),
        "value length": dim(v, 2),
        "dtype": _DTYPES.index(dtype) if dtype in _DTYPES else -1,
        "causal": bool(causal),
        "order": _ring.ORDERS.index(order) if order in _ring.ORDERS else -1,
        "explicit positions": q_pos is not None,
        "segment_ids": segment_ids is not None,
        "key_padding_mask": real is not None,
        # a backward pass exchanges too: every rank must run it, or one waits forever
        "inputs that require grad (q, k, v bits)": torch.is_grad_enabled()
        * (4 * requires[0] + 2 * requires[1] + requires[2]),
    }


def _local_positions(
    pos: Any, batch: int, length: int, name: str, device: Any, *, batched: bool = False
) -> torch.Tensor:
    pos = torch.as_tensor(pos, device=device)
    if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise InvalidArgumentError(f"{name} must hold integers, got dtype {pos.dtype}.")
    shapes = ((batch, length),) if batched else ((length,), (batch, length))
    if tuple(pos.shape) not in shapes:
        raise InvalidArgumentError(
            f"{name} must have shape {' or '.join(map(str, shapes))} (this rank's shard), "
            f"got {tuple(pos.shape)}."
        )
    return pos.long()


def _prepare(
    q, k, v, group, causal, order, q_pos, k_pos, segment_ids, what, *, decode=False, real=None,
    local_checks=None,
):  # fmt: skip
    """Check this rank's inputs, then agree with the other ranks before any exchange.

    Every local check runs *before* the handshake and its outcome is one of the
    agreed facts: a rank with bad input raises its own error, the others a
    DistributedError, and no rank is left waiting in a later collective.
    ``local_checks(batch, heads, kv_heads, q_len, k_len, world)`` validates and
    normalises entry-point-specific inputs; what it returns is returned.
    """
    rank, world = _group_info(group)
    error, shapes, extra = None, None, None
    try:
        _ring.check_order(order)
        if (q_pos is None) != (k_pos is None):
            raise InvalidArgumentError("give both q_pos and k_pos, or neither.")
        xp = TorchBackend(q.device)
        shapes = _attention._check_qkv(xp, q, k, v, "bhld")
        batch, heads, kv_heads, q_len, k_len = shapes
        if q_len != k_len and not decode:
            raise InvalidArgumentError(
                f"{what} needs query and key shards of the same length, got {q_len} and {k_len}."
            )
        if order == "zigzag" and k_len % 2:
            raise InvalidArgumentError(
                f"order='zigzag' needs an even shard length (two chunks per rank), got {k_len}."
            )
        if local_checks is not None:
            extra = local_checks(batch, heads, kv_heads, q_len, k_len, world)
    except PosBiasError as exc:
        error = exc
    device = q.device if isinstance(q, torch.Tensor) else None
    facts = _facts(error is None, q, k, v, causal, order, q_pos, segment_ids, real)
    try:
        _agree(group, what, facts, device)
    except DistributedError as mismatch:
        if error is not None:
            raise error from mismatch
        raise
    if error is not None:  # every rank had bad input
        raise error
    return (rank, world, *shapes), extra


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
    bias_fn = _attention.head_bias(bias, heads, None, "torch")
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


def _compute_dtype(q: torch.Tensor) -> str:
    """Scores and softmax statistics: float64 for float64 inputs, else float32."""
    return "float64" if q.dtype == torch.float64 else "float32"


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
    bias_fn = _attention.head_bias(bias, heads, range(rank * width, (rank + 1) * width), "torch")
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
    out = _attention.attend(
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


def shard_score_mod(bias: Any, q_pos: Any, k_pos: Any, *, num_heads: int | None = None):
    """A FlexAttention ``score_mod`` for shard-local indices with global positions.

    Context-parallel FlexAttention runs each rank's query shard against keys
    gathered from every rank; ``score_mod`` then sees shard-local indices
    ``q_idx``/``kv_idx``. This maps them through the position tables and adds
    the bias at ``d = k_pos[kv_idx] - q_pos[q_idx]``: symmetric ALiBi in closed
    form, other Toeplitz biases (T5, KERPLE, Sandwich, ...) from a small table
    of their values per difference. Global heads ``0..H-1``.

    Args:
        bias: registered name (with ``num_heads``), ``BiasSpec`` or
            ``posbias.torch.PositionalBias`` module.
        q_pos: ``(Lq_local,)`` global positions of this rank's queries.
        k_pos: ``(Lk,)`` global positions of the keys it attends to.
        num_heads: head count when ``bias`` is a name.

    Example:
        >>> import torch, posbias.torch
        >>> from torch.nn.attention.flex_attention import flex_attention
        >>> from posbias.torch.distributed import shard_score_mod
        >>> q = torch.randn(1, 4, 8, 16)
        >>> pos = torch.arange(8)
        >>> mod = shard_score_mod("alibi", pos[4:], pos, num_heads=4)   # rank 1 of 2
        >>> out = flex_attention(q[:, :, 4:], q, q, score_mod=mod)
        >>> ref = posbias.torch.attention(q, q, q, "alibi")[:, :, 4:]
        >>> bool((out - ref).abs().max() < 1e-5)
        True
    """
    from ._flex import positions_score_mod

    if isinstance(bias, str) and num_heads is None:
        raise InvalidArgumentError("pass num_heads= with a bias name.")
    spec = _attention.spec_of(bias, num_heads or 0)
    if spec is None:
        raise InvalidArgumentError(
            f"bias must be a registered name, a BiasSpec or a PositionalBias, got {bias!r}."
        )
    # copies: views of one another (pos[4:], pos) make torch.compile guard on aliasing
    q_pos, k_pos = (torch.as_tensor(p).to(torch.long, copy=True) for p in (q_pos, k_pos))
    if q_pos.ndim != 1 or k_pos.ndim != 1:
        raise InvalidArgumentError("shard_score_mod takes 1-D q_pos and k_pos position tables.")
    return positions_score_mod(spec, q_pos, k_pos, params=_attention.module_params(bias))
