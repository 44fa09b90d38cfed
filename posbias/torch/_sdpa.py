"""Blockwise attention on ``torch.nn.functional.scaled_dot_product_attention`` tiles.

Each block of ``n`` query rows is one SDPA call over the keys it can see
(``[0, q_offset + r1)`` when causal: the upper triangle is skipped), with the
bias passed as SDPA's float ``attn_mask``. Nothing of size ``H × Lq × Lk`` is
built:

* **Toeplitz biases** (ALiBi, T5 buckets, KERPLE, Sandwich: the bias depends on
  ``d = j - i`` only) with slot positions need one ``(H, Lq + Lk - 1)`` vector
  of values ``F(d)`` (``-inf`` for future keys when causal). With the keys in
  reverse order, a block's mask ``F(d0 - r - c)`` is a *Hankel* matrix, which
  is a zero-copy ``unfold`` view of that vector with strides ``(1, 1)``:
  SDPA reads it from cache and the block costs what an unbiased SDPA call of
  the same size costs.
* Every other case (padding, packed segments, explicit or per-sequence
  positions, non-Toeplitz biases, learnable parameters that need gradients)
  builds the block's ``(B, H, n, K)`` mask from the bias and the visibility,
  ``O(H · n · Lk)`` memory per block.

Rows that see no key output zeros, like the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._core import conventions
from .._core import gates as _gates
from .._core.problem import Problem

#: copy each block's Hankel view into a contiguous mask on CUDA (see docs/performance.md)
CONTIGUOUS_MASK_ON_CUDA = True


def tile_fn(p: Problem) -> Any:
    """The tile function for ``p``: the Hankel fast path when it applies."""
    table = _toeplitz_table(p)
    if table is None and gate_rows(p) and not torch.compiler.is_compiling():
        # (compiled: plain masks; the reused in-place buffer does not functionalize)
        workspace: list = []
        return lambda p, r0, r1: _masked_tile(p, r0, r1, workspace)
    if table is None:
        return _masked_tile
    # Reversing K/V costs 2·B·H·Lk·D copies once; copying each block's mask out of
    # the table costs H·Lq·Lk: decoding (few queries) takes the copy, and a single
    # query row is a plain slice of the table (no copy at all).
    reverse = p.q_len >= 2 * p.batch * p.q.shape[-1]
    if reverse:
        table = table.flip(-1)  # column t holds F(d_max - t)
        keys = (p.k.flip(2).to(_dtype(p)), p.v.flip(2).to(_dtype(p)))
    else:
        keys = (p.k.to(_dtype(p)), p.v.to(_dtype(p)))

    def hankel_tile(p: Problem, r0: int, r1: int) -> torch.Tensor:
        extent = p.extent(r0, r1)
        if extent == 0:
            return _zeros(p, r1 - r0)
        rows = r1 - r0
        if reverse:
            # reversed key c is key j = extent-1-c; query slot q_offset+r0+r:
            # d = extent-1-c-q_offset-r0-r, i.e. column (Lk - extent) + r0 + r + c
            base = (p.k_len - extent) + r0
            mask = table[:, base : base + rows + extent - 1].unfold(-1, extent, 1)
            k, v = (t[:, :, p.k_len - extent :] for t in keys)
        else:
            # key j, query row r: d = j - q_offset - r0 - r, column (Lq-1-r0-r) + j
            base = p.q_len - r1
            mask = table[:, base : base + rows + extent - 1].unfold(-1, extent, 1)
            if rows > 1:
                mask = mask.flip(-2)  # rows in order: a copy of this block's mask
            k, v = (t[:, :, :extent] for t in keys)
        mask = mask[None]  # (1, H, rows, extent), last stride 1
        if mask.is_cuda and CONTIGUOUS_MASK_ON_CUDA:
            mask = mask.contiguous()  # CUDA kernels want a row-aligned bias
        q = p.q[:, :, r0:r1].to(_dtype(p))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=p.scale)

    return hankel_tile


def _toeplitz_table(p: Problem) -> torch.Tensor | None:
    """``(H, Lq + Lk - 1)``: column ``t`` holds ``F(d_min + t)`` (None: no fast path)."""
    if not (p.slot_positions and isinstance(p.q_offset, int)) or p.has_attn_mask:
        return None
    if p.gates is not None:  # data-dependent: no table of diagonals
        return None
    if p.bias is not None and not p.bias.toeplitz:
        return None
    if p.causal and p.q_offset < 0:
        return None  # the first rows would see no key at all: the masked path zeroes them
    d_min, d_max = conventions.diagonal_range(p.q_offset, p.q_len, 0, p.k_len)
    # A spec's values are a pure function of (spec, d): cache them per spec/dtype/device
    # over a range that covers every offset of this key length (KV-cache decoding
    # asks again at each step). Modules (learnable parameters) are never cached.
    cacheable = (p.bias is None or p.bias.cacheable) and not torch.compiler.is_compiling()
    # the cache spans the diagonals of this key length (and the queries' rows); a far
    # offset (q_offset = 10**7 on 8 keys) is computed for its Lq + Lk - 1 diagonals only,
    # so the cache never grows with |q_offset|
    span = p.k_len + p.q_len
    if not cacheable or d_min < -span or d_max > span:
        return _diagonal_values(p, d_min, d_max)
    key = (p.bias.key if p.bias is not None else p.heads, p.causal, p.compute, p.q.device)
    hit = _TABLES.get(key)
    if hit is None or not (hit[0] <= d_min and d_max <= hit[1]):
        lo, hi = min(d_min, -(p.k_len - 1)), max(d_max, p.k_len - 1)
        if hit is not None:
            lo, hi = min(lo, hit[0]), max(hi, hit[1])
        if len(_TABLES) >= _TABLE_CACHE_SIZE:
            _TABLES.pop(next(iter(_TABLES)))
        hit = _TABLES[key] = (lo, hi, _diagonal_values(p, lo, hi))
    lo, _, table = hit
    return table[:, d_min - lo : d_max - lo + 1]


#: cached diagonal tables: key -> (d_min, d_max, (H, d_max - d_min + 1) tensor)
_TABLES: dict[Any, tuple[int, int, torch.Tensor]] = {}
_TABLE_CACHE_SIZE = 16


def _diagonal_values(p: Problem, d_min: int, d_max: int) -> torch.Tensor | None:
    """``F(d)`` for ``d = d_min .. d_max`` per head (``-inf`` for ``d > 0`` if causal)."""
    device = p.q.device
    d = torch.arange(d_min, d_max + 1, device=device)
    if p.bias is None:
        table = torch.zeros((p.heads, d.shape[0]), dtype=_dtype(p), device=device)
    else:
        values = p.bias.diagonals(p.xp, d_min, d_max, p.compute)
        if values.requires_grad:
            return None  # learnable values that train: SDPA gives no mask gradient
        table = values.to(_dtype(p))
    if p.causal:
        table = table.masked_fill(~conventions.diagonal_visible(d), float("-inf"))
    return table


def _masked_tile(p: Problem, r0: int, r1: int, workspace: list | None = None) -> torch.Tensor:
    extent = p.extent(r0, r1)
    if extent == 0:
        return _zeros(p, r1 - r0)
    if workspace is not None:  # causal log_gates: the rows' constants change no output
        q, k, v, mask, visible, _ = gated_block(p, r0, r1, extent, workspace, rows=False)
    else:
        q, k, v, mask, visible = masked_block(p, r0, r1, extent)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=p.scale)
    if visible is not None:
        out = torch.where(visible.any(-1, keepdim=True), out, 0.0)
    return out


def masked_block(p: Problem, r0: int, r1: int, extent: int) -> tuple:
    """``(q, k, v, mask, visible)`` of rows ``[r0, r1)`` against keys ``[0, extent)``.

    ``mask`` ``(B|1, H, n, K)`` is the bias (plus ``attn_mask``'s values) with
    hidden keys at the lowest float (None: no bias and nothing hidden);
    ``visible`` ``(B|1, H|1, n, K)`` or None.
    """
    dtype = _dtype(p)
    mask = p.bias_tile(r0, r1, extent)
    if p.mask_add is not None:
        zero = torch.zeros((), dtype=_dtype(p), device=p.q.device)
        mask, visible = p.masked_scores(zero if mask is None else mask, r0, r1, extent)
    else:
        visible = p.keep(r0, r1, extent)
    if visible is not None:
        base = torch.zeros((), dtype=dtype, device=p.q.device) if mask is None else mask
        mask = torch.where(visible, base.to(dtype), torch.finfo(dtype).min)
    elif mask is not None:
        mask = mask.to(dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask[None]
    q, k, v = (t.to(dtype) for t in (p.q[:, :, r0:r1], p.k[:, :, :extent], p.v[:, :, :extent]))
    return q, k, v, mask, visible


def gate_rows(p: Problem) -> bool:
    """Whether blocks take the causal gate bias as ``keys`` per group of rows, its
    ``row`` part moved into the log-sum-exp (:meth:`posbias._core.gates.Gates.parts`)."""
    return p.gates is not None and p.causal and p.mask_add is None


#: float elements of one block's mask with log_gates (64 MiB): longer keys, fewer rows
GATE_MASK_ELEMENTS = 2**24


def gate_block_rows(p: Problem, block_size: int) -> int:
    """Rows per block for :func:`gated_block`: ``block_size``, fewer (a multiple of
    ``CHUNK``, at least one ``CHUNK``) where a block's mask would pass
    :data:`GATE_MASK_ELEMENTS`, since every worker holds one."""
    fits = GATE_MASK_ELEMENTS // (p.batch * p.heads * p.k_len)
    return min(block_size, max(_gates.CHUNK, fits // _gates.CHUNK * _gates.CHUNK))


def gate_parts(p: Problem, r0: int, r1: int, extent: int, rows: bool = True) -> tuple:
    """``(row, keys)`` of :meth:`posbias._core.gates.Gates.parts` for rows ``[r0, r1)``.

    At an integer ``q_offset`` (not on MPS, which has no float64) from the call's
    ``G`` summed once in float64 and kept as a float32 pair ``hi + lo``
    (:func:`_gate_table`): each value is the float32 rounding of the exact
    difference, in four operations per block (a CPU whose cores are shared stalls
    at every operation's barrier, so few matter more than small).
    """
    table = _gate_table(p)
    if table is None:
        return p.gates.parts(p.xp, p.q_slot[..., r0:r1], extent)
    chunk, n, start = _gates.CHUNK, r1 - r0, p.q_offset + r0
    anchors = [start + min(t + chunk - 1, n - 1) for t in range(0, n, chunk)]
    keys = table[:, :, :, anchors, None] - table[:, :, :, None, :extent]  # (2, B, H, m, K)
    if not rows:  # (a softmax without its log-sum-exp does not need them)
        return None, keys[0] + keys[1]
    mine = [anchors[r // chunk] for r in range(n)]
    row = table[:, :, :, start : start + n] - table[:, :, :, mine]
    return row[0] + row[1], keys[0] + keys[1]


def _gate_table(p: Problem) -> torch.Tensor | None:
    """``(2, B, H, Lk)``: ``G = cumsum(g)`` as ``hi = float32(G)`` and ``lo =
    float32(G − hi)``, summed in float64 once per call (cached on ``p.gates``);
    None where :func:`gate_parts` takes the chunked sums instead."""
    gates = p.gates
    if not isinstance(p.q_offset, int) or gates.before.device.type == "mps":
        return None
    table = gates.kernel_tables.get("torch_hi_lo")
    if table is None:
        table = gates.kernel_tables["torch_hi_lo"] = torch.stack(cumsum_hi_lo(gates.before))
    return table


def cumsum_hi_lo(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = cumsum(g)`` along the last axis, summed in float64 and returned as a float32
    pair ``hi = float32(G)``, ``lo = float32(G − hi)`` (differentiable; MPS, which has no
    float64, sums on the CPU): ``(hi[i] − hi[j]) + (lo[i] − lo[j])`` is the float32
    rounding of the exact ``G[i] − G[j]``."""
    wide = g.to("cpu") if g.device.type == "mps" else g
    total = torch.cumsum(wide.to(torch.float64), -1)
    hi = total.to(torch.float32)
    lo = (total - hi.to(torch.float64)).to(torch.float32)
    return hi.to(g.device), lo.to(g.device)


def gated_block(
    p: Problem, r0: int, r1: int, extent: int, workspace: list | None = None, rows: bool = True
) -> tuple:
    """:func:`masked_block` for causal ``log_gates``, plus the rows' ``(B, H, n)``
    constants. The softmax of a row does not change with a constant added to it, so
    the mask holds only ``G[a] − G[j]`` (``a``: the anchor of the row's group,
    :meth:`posbias._core.gates.Gates.parts`) and ``G[i] − G[a]`` belongs in the
    log-sum-exp: the mask is one copy of the per-group key values, then the hidden
    keys (for plain causal masks only the columns right of the block's first slot).

    ``workspace``: a one-element list holding a flat buffer reused by every block of
    a call (fresh memory for each block's mask costs page faults that can take as
    long as the copy); filled on first use. ``rows=False``: the row constants are
    not needed (None), as for an output without its log-sum-exp.
    """
    dtype = _dtype(p)
    n = r1 - r0
    row, keys = gate_parts(p, r0, r1, extent, rows)
    keys = keys.to(dtype)
    shape = (p.batch, p.heads, n, extent)
    size = p.batch * p.heads * n * extent
    if workspace is None:
        mask = torch.empty(shape, dtype=dtype, device=p.q.device)
    else:
        if not workspace or workspace[0].numel() < size:
            workspace[:] = [
                torch.empty(p.batch * p.heads * n * p.k_len, dtype=dtype, device=p.q.device)
            ]
        mask = workspace[0][:size].view(shape)
    full, rest = divmod(n, _gates.CHUNK)
    if full:
        grouped = mask[:, :, : full * _gates.CHUNK].unflatten(2, (full, _gates.CHUNK))
        grouped.copy_(keys[:, :, :full, None])
    if rest:
        mask[:, :, full * _gates.CHUNK :].copy_(keys[:, :, full:, :])
    lowest = torch.finfo(dtype).min
    plain = p.key_mask is None and p.segment_ids is None and p.mask_keep is None
    if plain and isinstance(p.q_offset, int):
        # plain causal: row r sees keys up to its slot q_offset + r0 + r (>= 0 with
        # log_gates, so every row sees a key); only keys right of the first row's
        # slot are hidden from some rows: a triangle
        visible = None
        first = p.q_offset + r0 + 1
        if first < extent:
            width = extent - first
            mask[..., first:].masked_fill_(triangle(n, width, p.q.device), lowest)
    else:
        visible = p.keep(r0, r1, extent)  # (B|1, 1, n, K): causal, so never None
        mask.masked_fill_(~visible, lowest)
    positional = p.positional_tile(r0, r1, extent)
    if positional is not None:  # hidden keys stay at about the lowest float
        mask += positional.to(dtype)
    q, k, v = (t.to(dtype) for t in (p.q[:, :, r0:r1], p.k[:, :, :extent], p.v[:, :, :extent]))
    return q, k, v, mask, visible, None if row is None else row.to(dtype)


def triangle(rows: int, width: int, device: Any) -> torch.Tensor:
    """``(rows, width)`` bool, True at ``c >= r`` (the keys after each row's slot)."""
    key = (rows, width, str(device))
    hit = _TRIANGLES.get(key)
    if hit is None:
        if len(_TRIANGLES) >= 8:
            _TRIANGLES.pop(next(iter(_TRIANGLES)))
        hit = _TRIANGLES[key] = torch.ones((rows, width), dtype=torch.bool, device=device).triu()
    return hit


_TRIANGLES: dict[Any, torch.Tensor] = {}


def _dtype(p: Problem) -> torch.dtype:
    return getattr(torch, p.compute)


def _zeros(p: Problem, rows: int) -> torch.Tensor:
    return p.q.new_zeros((p.batch, p.heads, rows, p.q.shape[-1]), dtype=_dtype(p))
