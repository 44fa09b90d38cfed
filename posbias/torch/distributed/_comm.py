"""Exchanges between ranks (with autograd), traffic counters and the rank handshake."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from ..._core import conventions, layouts
from ..._core import gates as _gates
from ..._core import problem as _problem
from ..._core.bias_arg import BiasArg, read_bias
from ..._core.ring import DECODE_GATES, Ring, check_segment_bias
from ...backends.torch import TorchBackend
from ...errors import ConfigError, DistributedError, InvalidArgumentError, PosBiasError

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


class TorchRing(Ring):
    """The ring of ranks of a process group (:class:`posbias._core.ring.Ring`)."""

    def __init__(self, group: Any, device: Any, checkpoint_tiles: bool) -> None:
        self.group = group
        self.me, self.n = _group_info(group)
        self.xp = TorchBackend(device)
        self.checkpoint_tiles = checkpoint_tiles

    def shift(self, blocks: tuple) -> tuple:
        return tuple(self._shift_one(t) for t in blocks)

    def _shift_one(self, t: Any) -> Any:
        if t is None:
            return None
        if t.is_floating_point():
            return _RingShift.apply(t, self.group, 1)
        if t.dtype == torch.bool:  # gloo sends no bool
            return _shift(t.to(torch.uint8).contiguous(), self.group, 1).bool()
        return _shift(t.contiguous(), self.group, 1)

    def gather(self, x: Any) -> Any:
        parts = [torch.empty_like(x) for _ in range(self.n)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        _count("positions", x.numel() * x.element_size() * (self.n - 1))
        return torch.stack(parts)

    def total(self, x: Any) -> Any:
        out = x.clone()
        dist.all_reduce(out, group=self.group)
        _count("positions", out.numel() * out.element_size())
        return out

    def top(self, x: Any) -> Any:
        out = x.detach().clone()  # a shift: the result does not depend on it
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        _count("decode", out.numel() * out.element_size())
        return out

    def sum(self, x: Any) -> Any:
        from torch.distributed.nn import functional as collective  # all_reduce with autograd

        _count("decode", x.numel() * x.element_size())
        return collective.all_reduce(x, group=self.group)

    def checkpoint(self, fn: Any) -> Any:
        if not self.checkpoint_tiles:
            return fn

        def run(*args: Any) -> Any:
            if not torch.is_grad_enabled():
                return fn(*args)
            # keep only the tile's inputs; its scores are recomputed in the backward pass
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

        return run

    def keep(self, out: Any, blocks: tuple) -> Any:
        # every rank's backward must run every reverse shift, also when this rank's
        # last received block was hidden: a zero-weight use keeps it in the graph
        for block in blocks:
            if block is not None and block.requires_grad:
                out = out + 0.0 * block.flatten()[0]
        return out


_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _agree(
    group: Any, what: str, facts: dict[str, Any], device: Any, shown: dict[str, Any]
) -> None:
    """Raise the same DistributedError on every rank unless all ranks pass equal ``facts``.

    ``shown`` gives a readable form of facts that travel as numbers (a float's bits, a
    fingerprint): floats are decoded for the message, others are said for this rank.
    """
    _, world = _group_info(group)
    values = torch.tensor([int(v) for v in facts.values()], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(gathered, values, group=group)
    _count("handshake", values.numel() * 8 * (world - 1))
    table = torch.stack(gathered).cpu()
    for name, column in zip(facts, table.T, strict=True):
        if bool((column != column[0]).any()):
            values_by_rank = column.tolist()
            if name == "scale":
                values_by_rank = [_from_bits(v) for v in values_by_rank]
            detail = f"{values_by_rank} (by rank)"
            if name in shown and name != "scale":
                detail = f"they differ; this rank has {shown[name]!r}"
            raise DistributedError(
                f"{what}: the ranks disagree on {name}: {detail}. Every rank must pass shards "
                "of the same shape and the same options."
            )


def _from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _fingerprint(value: Any) -> int:
    """A stable signed 64-bit hash of a JSON-able value (the same on every rank)."""
    text = json.dumps(value, sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def _describe_bias(arg: BiasArg | None) -> Any:
    """What defines the bias's values: its config, parameter shapes and heads."""
    if arg is None:
        return None
    try:
        config: Any = arg.spec.to_config()
    except ConfigError:  # an unregistered spec: its repr holds every field
        config = repr(arg.spec)
    shapes = {k: list(v) for k, v in arg.spec.param_shapes().items()}
    values = arg.current_params() or {}
    digests = {  # ranks whose learnable parameters drifted apart would silently disagree
        k: hashlib.sha256(_bytes(v)).hexdigest()[:16]
        for k, v in sorted(values.items())
        if isinstance(v, torch.Tensor)
    }
    described = {"config": config, "parameter shapes": shapes, "heads": arg.heads}
    return {**described, "parameter values (sha256)": digests} if digests else described


def _bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor of any dtype (bfloat16 has no NumPy dtype)."""
    return tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _float_bits(value: Any) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0] if value is not None else 0


@dataclasses.dataclass
class Call:
    """One rank's distributed attention call, read and agreed on by every rank."""

    rank: int
    world: int
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    causal: bool
    scale: float
    bias: BiasArg | None
    q_pos: Any = None
    k_pos: Any = None
    segment_ids: Any = None
    key_mask: Any = None
    gates: Any = None  # (g, g') (B, H, L_local) read by posbias._core.gates.read, or None
    extra: Any = None


def read_call(
    what: str,
    q: Any,
    k: Any,
    v: Any,
    bias: Any,
    *,
    group: Any,
    causal: Any,
    order: Any,
    scale: Any,
    q_pos: Any = None,
    k_pos: Any = None,
    segment_ids: Any = None,
    key_mask: Any = None,
    log_gates: Any = None,
    log_gates_after: Any = None,
    implementation: Any = None,
    decode: bool = False,
    removed: dict | None = None,
    keywords: tuple[str, ...] = (),
    local_checks: Any = None,
) -> Call:
    """Check every input of this rank, then agree with the other ranks before any exchange.

    Every local check — shapes, dtypes, options, masks, positions *and the
    bias* — runs before the handshake, and its outcome is one of the agreed
    facts: a rank with bad input raises its own error, the others a
    :class:`~posbias.DistributedError`, and no rank is left waiting in a later
    collective. The ranks agree on everything that changes the answer: shapes,
    dtype, ``causal``, ``order``, ``scale``, the bias (config, parameter shapes
    and heads), the implementation, which masks, positions and log-gates are
    given, and which inputs (gates included) require grad. ``local_checks(call)`` validates
    entry-point-specific inputs; what it returns is ``call.extra``.
    """
    rank, world = _group_info(group)
    error, call = None, None
    try:
        conventions.reject_unknown(f"posbias.torch.distributed.{what}", removed or {}, keywords)
        layouts.check_order(order)
        conventions.both_or_neither(q_pos, k_pos, None if bias is None else True)
        xp = TorchBackend(q.device if isinstance(q, torch.Tensor) else None)
        q, k, v = (_problem.native(xp, n, t) for n, t in (("q", q), ("k", k), ("v", v)))
        batch, heads, kv_heads, q_len, k_len = _problem.check_qkv(xp, q, k, v, "bhld")
        if q_len != k_len and not decode:
            raise InvalidArgumentError(
                f"{what} needs query and key shards of the same length, got {q_len} and {k_len}."
            )
        if order == "zigzag" and k_len % 2:
            raise InvalidArgumentError(
                f"order='zigzag' needs an even shard length (two chunks per rank), got {k_len}."
            )
        arg = read_bias(bias, heads)
        if arg is not None and (arg.spec is None or arg.points):
            raise InvalidArgumentError(
                f"{what} shards 1-D token positions and selects heads by global index: pass a "
                "1-D bias with a spec (a name, a BiasSpec, its config or a PositionalBias); "
                "use posbias.torch.attention on one device for 2-D or callable biases."
            )
        call = Call(
            rank=rank,
            world=world,
            batch=batch,
            heads=heads,
            kv_heads=kv_heads,
            q_len=q_len,
            k_len=k_len,
            causal=conventions.check_bool("causal", causal),
            scale=conventions.resolve_scale(scale, q.shape[-1]),
            bias=arg,
        )
        if q_pos is not None:
            call.q_pos = _problem.read_positions(xp, "q_pos", q_pos, batch, q_len, False)
            call.k_pos = _problem.read_positions(xp, "k_pos", k_pos, batch, k_len, False)
        if segment_ids is not None:
            if decode:
                raise InvalidArgumentError(
                    "segment_ids needs query and key shards of the same length (packed "
                    "training sequences); for decoding pass q_pos/k_pos."
                )
            call.segment_ids = _problem.check_mask(
                xp, "segment_ids", segment_ids, batch, k_len, boolean=False
            )
            check_segment_bias(arg, segment_ids, q_pos)
        if key_mask is not None:
            call.key_mask = _problem.check_mask(
                xp, "key_mask", key_mask, batch, k_len, boolean=True
            )
        read = _gates.read(
            xp,
            log_gates,
            log_gates_after,
            layout="bhld",
            batch=batch,
            heads=heads,
            k_len=k_len,
            q_len=k_len,  # every query at its own key slot (decoding is refused)
            causal=call.causal,
            q_offset=0,
            key_mask=call.key_mask,
            segment_ids=call.segment_ids,
            compute=conventions.compute_dtype(xp.dtype_name(q.dtype)),
            native=_problem.native,
        )
        if read is not None:
            if decode:
                raise InvalidArgumentError(DECODE_GATES)
            call.gates = (read.before, read.after)
        if local_checks is not None:
            call.extra = local_checks(call)
    except PosBiasError as exc:
        error = exc
    device = q.device if isinstance(q, torch.Tensor) else None
    facts = _facts(error is None, q, k, v, causal, order, q_pos, segment_ids, key_mask)
    gates = (log_gates, log_gates_after)
    facts["log_gates, log_gates_after (bits)"] = sum(
        (g is not None) << i for i, g in enumerate(gates)
    )
    facts["log-gates that require grad (bits)"] = torch.is_grad_enabled() * sum(
        bool(getattr(g, "requires_grad", False)) << i for i, g in enumerate(gates)
    )
    described = None if call is None else _describe_bias(call.bias)
    facts["bias (config, parameters, heads)"] = _fingerprint(described)
    facts["scale"] = _float_bits(None if call is None else call.scale)
    facts["implementation"] = _fingerprint(implementation)
    shown = {"bias (config, parameters, heads)": described, "implementation": implementation}
    try:
        _agree(group, what, facts, device, shown)
    except DistributedError as mismatch:
        if error is not None:
            raise error from mismatch
        raise
    if error is not None:  # every rank had bad input
        raise error
    return call


def _facts(valid, q, k, v, causal, order, q_pos, segment_ids, key_mask) -> dict[str, Any]:
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
        "causal": causal is True,
        "order": layouts.ORDERS.index(order) if order in layouts.ORDERS else -1,
        "explicit positions": q_pos is not None,
        "segment_ids": segment_ids is not None,
        "key_mask": key_mask is not None,
        # a backward pass exchanges too: every rank must run it, or one waits forever
        "inputs that require grad (q, k, v bits)": torch.is_grad_enabled()
        * (4 * requires[0] + 2 * requires[1] + requires[2]),
    }
