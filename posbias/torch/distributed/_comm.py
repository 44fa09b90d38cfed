"""Exchanges between ranks (with autograd), traffic counters and the rank handshake."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..._core import layouts as _ring
from ..._core import problem as _problem
from ...backends.torch import TorchBackend
from ...errors import DistributedError, InvalidArgumentError, PosBiasError

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
        shapes = _problem._check_qkv(xp, q, k, v, "bhld")
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


def _compute_dtype(q: torch.Tensor) -> str:
    """Scores and softmax statistics: float64 for float64 inputs, else float32."""
    return "float64" if q.dtype == torch.float64 else "float32"
