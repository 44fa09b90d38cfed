"""Ring (sequence-parallel) attention over ``torch.distributed``."""

from __future__ import annotations

from typing import Any

import torch

from ..._core import conventions
from ..._core.ring import attend_on_ring, make_tile
from ._comm import TorchRing, read_call

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
    "checkpoint_tiles",
)


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
    key_mask: Any = None,
    scale: float | None = None,
    log_gates: Any = None,
    log_gates_after: Any = None,
    checkpoint_tiles: bool = True,
    **removed: Any,
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
        bias: registered name, ``BiasSpec``, its config dict,
            ``posbias.torch.PositionalBias`` or None, with ``H`` heads. Every
            rank must pass the same bias (config, parameter shapes), ``scale``
            and ``causal``: the ranks check that before exchanging anything.
        group: the process group (default: the world).
        causal: key visible iff it comes no later than the query in sequence order.
        order: how the sequence is split: ``"contiguous"`` (rank ``r`` holds block
            ``r``) or ``"zigzag"`` (rank ``r`` holds chunks ``r`` and ``2·world-1-r``
            of ``2·world``; equal causal work). See :func:`shard`.
        q_pos: ``(L_local,)`` or ``(B, L_local)`` explicit bias positions of this
            rank's queries (packed documents, shifted positions), as in
            :func:`posbias.torch.attention`: they set the bias only; causal
            visibility follows the sequence order given by ``order``.
        k_pos: the same for this rank's keys (travels with them around the ring).
        segment_ids: ``(B, L_local)`` document ids of this rank's tokens
            (documents are contiguous runs): queries see keys of their own
            document only. A Toeplitz bias (ALiBi, T5, KERPLE, ...) then equals
            single-device attention; other biases need ``q_pos``/``k_pos``.
        key_mask: ``(B, L_local)`` bool, True for this rank's real keys
            (padding, or the empty slots of a KV cache block, are hidden). Bias
            positions are the global ``cumsum(key_mask) - 1``, as on one device
            (one all-gather of ``B × chunks`` counts).
        scale: score scale; default ``1/√D``.
        log_gates: ``(B, H, L_local)`` per-token log-gates ``g <= 0`` of this
            rank's key slots (forget gates: FoX, CABLE; see
            :func:`posbias.torch.attention`): adds ``Σ_{s=j+1..i} g[s]`` for
            keys ``j <= i`` of the whole sequence. Each rank computes its
            chunks' local sums; the totals of every chunk come from one
            all-reduce of ``B × H`` scalars per chunk, and no pair's bias is a
            difference of two large sums. Differentiable. Not when decoding.
        log_gates_after: ``(B, H, L_local)`` log-gates of keys after the query,
            for ``causal=False`` (required there with ``log_gates``).
        checkpoint_tiles: with autograd on, recompute each tile's scores in the
            backward pass instead of keeping them (posbias's blockwise backward,
            :mod:`posbias._core.backward`; ``torch.utils.checkpoint`` for a
            plain callable bias): activation memory O(L_local·D) per step
            instead of O(L_local²), for about one extra forward of compute.

    Returns:
        ``(B, H, L_local, D)`` in ``q``'s dtype.

    Raises:
        DistributedError: the ranks disagree on shapes or options (on every rank),
            or no process group is initialised.
        InvalidArgumentError, InvalidTypeError: this rank's own bad input (the
            other ranks raise ``DistributedError``; none hangs).

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
    call = read_call(
        "ring_attention",
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
        decode=decode,
        removed=removed,
        keywords=_KEYWORDS,
        local_checks=lambda call: conventions.check_bool("checkpoint_tiles", checkpoint_tiles),
    )
    ring = TorchRing(group, q.device, checkpoint_tiles)
    compute = conventions.compute_dtype(ring.xp.dtype_name(q.dtype))
    bias_fn = None
    if call.bias is not None:
        bias_fn = lambda q_pos, k_pos, dtype: call.bias.tile(ring.xp, q_pos, k_pos, dtype)  # noqa: E731
    tile = make_tile(
        ring.xp,
        bias_fn,
        scale=call.scale,
        compute=compute,
        kv_group=call.heads // call.kv_heads,  # K/V travel un-repeated; tiles repeat them
        ring=ring,
        bias=call.bias,
        own_backward=True,
        gates=call.gates is not None,
    )
    out = attend_on_ring(
        ring,
        tile,
        q,
        k,
        v,
        causal=call.causal,
        order=order,
        compute=compute,
        q_pos=call.q_pos,
        k_pos=call.k_pos,
        segment_ids=call.segment_ids,
        key_mask=call.key_mask,
        log_gates=call.gates,
    )
    return out.to(q.dtype)
