"""PyTorch: blockwise attention with its own backward pass (what training runs).

The algorithm is :mod:`posbias._core.backward` (FlashAttention-2 style: save
``out`` and the row log-sum-exp, recompute each block's probabilities in the
backward pass, reduce ``dS`` for the bias parameters); this module gives it
faster PyTorch block loops:

* **forward** on CPU: each block is one call of PyTorch's fused CPU attention
  kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel
  behind ``F.scaled_dot_product_attention`` on CPU), which returns the
  log-sum-exp too. Toeplitz biases at slot positions pass the zero-copy
  Hankel view of :mod:`posbias.torch._sdpa` as its mask, learnable ones
  included (SDPA itself returns no mask gradient, which is why this module
  exists). Elsewhere (CUDA, other devices): the engine's textbook blocks.
* **backward**: blocks of :data:`BACKWARD_ROWS` rows, a few heads at a time
  (:data:`GROUP_ELEMENTS`), five batched matrix products each, written into
  workspaces allocated once per call (fresh memory per block costs page
  faults that dominate on CPU). Each block sees ``n`` zero keys after its
  own: every product writes a contiguous buffer, and for a Toeplitz bias the
  per-diagonal sums of ``dS`` are a plain column sum of a strided view — no
  copy, no scatter, no atomics.
* **threads**: on CPU the work is shared out to ``torch.get_num_threads()``
  threads running single-threaded operations (head groups on the Hankel
  path, row blocks elsewhere): one join per pass instead of PyTorch's barrier
  after every operation, which stalls when the cores are shared.

``blocks`` chooses: with gradients to compute (and not under
``torch.compile``) this path; otherwise the SDPA tiles of :mod:`._sdpa`,
whose forward needs no log-sum-exp. A plain callable bias keeps autograd
through the tiles (it may close over tensors this path cannot see).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch
import torch.nn.functional as F

from .._core import backward as _engine
from .._core import gates as _gates
from .._core import partial as _partial
from .._core.problem import Problem
from .._core.reference import blockwise, reference_tile
from . import _sdpa

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def blocks(p: Problem, block_size: int) -> torch.Tensor:
    """``(B, H, Lq, D)`` rows of ``p`` in ``p.compute``, differentiable when asked."""
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vjp, vmap, jacrev, ...) transforms plain PyTorch operations
        # (SDPA's fused kernels give no gradient of a learnable bias there)
        return blockwise(p, reference_tile, block_size)
    if torch.compiler.is_compiling():
        return blockwise(p, _sdpa.tile_fn(p), block_size)
    if not _needs_grad(p) and _gates_on_threads(p):
        return _masked_forward(p, block_size)[0]  # the training forward, lse unused
    if not (_needs_grad(p) and _engine.supported(p)):
        return blockwise(p, _sdpa.tile_fn(p), block_size)
    if p.v.shape[-1] != p.q.shape[-1]:  # PyTorch's fused CPU kernel needs one head size
        return _engine.attention(p, block_size)[0]
    if p.has_attn_mask:  # the engine's backward blocks apply attn_mask; the fused ones do not
        return _engine.attention(p, block_size, forward_fn=forward)[0]
    return _engine.attention(p, block_size, forward_fn=forward, backward_fn=backward)[0]


def _gates_on_threads(p: Problem) -> bool:
    """Causal ``log_gates`` on CPU: blocks of rows shared out to threads (as in training)
    beat one block after another with PyTorch's threads, whose barrier after every
    operation stalls on shared cores (:func:`_parallel`)."""
    return (
        _sdpa.gate_rows(p)
        and p.q.device.type == "cpu"
        and _FLASH_CPU is not None
        and p.v.shape[-1] == p.q.shape[-1]
    )


def _needs_grad(p: Problem) -> bool:
    if not torch.is_grad_enabled():
        return False
    params = _engine.learnable_params(p) or {}
    gates = [] if p.gates is None else p.gates.inputs()
    return any(t.requires_grad for t in (p.q, p.k, p.v, *params.values(), *gates))


# ---------------------------------------------------------------- forward
def forward(p: Problem, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of every row (no autograd inside: the caller is a custom Function)."""
    if p.q.device.type != "cpu" or _FLASH_CPU is None:
        return _engine.forward(p, block_size)
    table = _hankel_table(p)
    if table is None:
        return _masked_forward(p, block_size)
    return _hankel_forward(p, table, block_size)


def _hankel_table(p: Problem) -> torch.Tensor | None:
    """``(H, Lq + Lk - 1)``, column ``t`` = ``F(d_max - t)`` (``-inf`` where causal hides it)."""
    table = _sdpa._toeplitz_table(p)
    return None if table is None else table.flip(-1)


def _hankel_forward(p: Problem, table: torch.Tensor, block_size: int):
    """Blocks of rows against the reversed keys; heads shared out to threads (:func:`_parallel`)."""
    dtype = _dtype(p)
    q = p.q.to(dtype)
    k, v = (t.flip(2).to(dtype) for t in (p.k, p.v))
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:-1])
    workers = _workers(p.q, p.heads)
    bounds = [p.heads * w // workers for w in range(workers + 1)]

    def heads(h0: int, h1: int) -> None:
        for r0 in range(0, p.q_len, block_size):
            r1 = min(r0 + block_size, p.q_len)
            extent = p.extent(r0, r1)
            rows = (slice(None), slice(h0, h1), slice(r0, r1))
            if extent == 0:
                out[rows], lse[rows] = 0.0, torch.finfo(dtype).min
                continue
            mask = _hankel_mask(p, table, r0, r1, extent)[h0:h1][None]
            keys = (slice(None), slice(h0, h1), slice(p.k_len - extent, None))
            o, m = _FLASH_CPU(q[rows], k[keys], v[keys], attn_mask=mask, scale=p.scale)
            out[rows], lse[rows] = o, m

    _parallel([lambda w=w: heads(bounds[w], bounds[w + 1]) for w in range(workers)])
    return out, lse


def _hankel_mask(p: Problem, table: torch.Tensor, r0: int, r1: int, extent: int) -> torch.Tensor:
    """``(H, n, extent)`` bias of rows ``[r0, r1)`` against the keys in reverse order.

    Reversed key ``c`` is key ``j = extent - 1 - c``; with ``table`` column
    ``t`` holding ``F(d_max - t)`` the bias of row ``r`` is column
    ``(Lk - extent) + r0 + r + c``: a Hankel matrix, a view with strides (1, 1).
    """
    base = (p.k_len - extent) + r0
    return table[:, base : base + (r1 - r0) + extent - 1].unfold(-1, extent, 1)


def _masked_forward(p: Problem, block_size: int):
    """Blocks of rows, each with its own masked bias, shared out to threads (round robin)."""
    dtype = _dtype(p)
    out = p.q.new_empty((p.batch, p.heads, p.q_len, p.q.shape[-1]), dtype=dtype)
    lse = p.q.new_empty((p.batch, p.heads, p.q_len), dtype=dtype)
    if _sdpa.gate_rows(p):  # _split_gate_partial: one group of rows per block
        block_size = _gates.CHUNK if _split_gates(p) else _sdpa.gate_block_rows(p, block_size)
        _sdpa.gate_parts(p, 0, 1, 1)  # the call's table, before threads share it
    starts = list(range(0, p.q_len, block_size))
    workers = _workers(p.q, len(starts))
    costs = [p.extent(r0, min(r0 + block_size, p.q_len)) for r0 in starts]

    def rows(share: list[int]) -> None:
        workspace: list = []  # this worker's mask buffer (log_gates)
        for r0 in share:
            r1 = min(r0 + block_size, p.q_len)
            out[:, :, r0:r1], lse[:, :, r0:r1] = _masked_partial(p, r0, r1, workspace)

    shares = _balanced(costs, workers)
    _parallel([lambda w=w: rows([starts[i] for i in shares[w]]) for w in range(workers)])
    return out, lse


def _masked_partial(p: Problem, r0: int, r1: int, workspace: list | None = None):
    extent = p.extent(r0, r1)
    if extent == 0:
        return _partial.empty(p.xp, p.batch, p.heads, r1 - r0, p.q.shape[-1], p.compute)
    if _split_gates(p) and r1 - r0 <= _gates.CHUNK:
        return _split_gate_partial(p, r0, r1, extent)
    if _sdpa.gate_rows(p):
        q, k, v, mask, visible, row = _sdpa.gated_block(p, r0, r1, extent, workspace)
    else:
        q, k, v, mask, visible = _sdpa.masked_block(p, r0, r1, extent)
        row = None
    out, lse = _FLASH_CPU(q, k, v, attn_mask=mask, scale=p.scale)
    if row is not None:  # the gate bias's part constant along each row
        lse = lse + row
    if visible is not None:  # rows that see no key: out 0, lse the lowest float (as the engine)
        seen = visible.any(-1)
        out = torch.where(seen[..., None], out, 0.0)
        lse = torch.where(seen, lse, torch.finfo(_dtype(p)).min)
    return out, lse


def _split_gates(p: Problem) -> bool:
    """Causal ``log_gates`` alone (no positional bias, padding, segments or mask) at an
    integer offset on CPU: :func:`_split_gate_partial` applies."""
    return (
        _sdpa.gate_rows(p)
        and p.bias is None
        and p.key_mask is None
        and p.segment_ids is None
        and p.mask_keep is None
        and isinstance(p.q_offset, int)
        and p.q.device.type == "cpu"
        and _FLASH_CPU is not None
    )


def _split_gate_partial(p: Problem, r0: int, r1: int, extent: int):
    """``(out, lse)`` of one group of at most ``CHUNK`` rows with causal ``log_gates``.

    The keys before the group's first slot are seen by every row, and their gate bias
    is one row of per-key values ``G[a] − G[j]`` (:meth:`posbias._core.gates.Gates.parts`;
    the rows' constants ``G[i] − G[a]`` go into the log-sum-exp): PyTorch's fused
    kernel takes it as a ``(B, H, 1, K)`` mask broadcast over the rows, so no mask of
    the block's size is written. The keys from the first slot on form a small causal
    tile; the two ``(out, lse)`` pairs merge exactly (:mod:`posbias._core.partial`).
    """
    dtype, n = _dtype(p), r1 - r0
    row, keys = _sdpa.gate_parts(p, r0, r1, extent)  # (B, H, n), (B, H, 1, K)
    keys = keys.to(dtype)
    first = p.q_offset + r0  # every row sees keys [0, first); extent = first + n
    q = p.q[:, :, r0:r1].to(dtype)
    k, v = (t[:, :, first:extent].to(dtype) for t in (p.k, p.v))
    mask = keys[..., first:extent].expand(-1, -1, n, -1).clone()
    if extent - first > 1:  # key first + c is after row r's slot first + r when c > r
        mask[..., 1:].masked_fill_(_sdpa.triangle(n, extent - first - 1, p.q.device), -torch.inf)
    out, lse = _FLASH_CPU(q, k, v, attn_mask=mask, scale=p.scale)
    if first > 0:
        k, v = (t[:, :, :first].to(dtype) for t in (p.k, p.v))
        past = _FLASH_CPU(q, k, v, attn_mask=keys[..., :first], scale=p.scale)
        out, lse = _partial.merge(p.xp, (out, lse), past)
    return out, lse + row.to(dtype)


# --------------------------------------------------------------- backward
def backward(
    p: Problem,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: Any,
    block_size: int,
    params: dict[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """``(dq, dk, dv, dparams)`` of :func:`forward`, block by block, in ``p.compute``.

    Blocks of at most :data:`BACKWARD_ROWS` rows are processed a few heads at
    a time (:data:`GROUP_ELEMENTS`), so that a group's probabilities stay in
    cache across its five products. Every block sees its ``K`` keys followed
    by ``n`` zero keys whose bias is ``-inf``: the products then write whole
    contiguous buffers (PyTorch's CPU batched matmul is only fast into
    contiguous results), and ``dS`` ends each row with ``n`` zeros, which is
    what :func:`_skew_sums` reads.

    On the Hankel path (a Toeplitz bias, or none, at slot positions) the head
    groups are independent: up to ``torch.get_num_threads()`` threads take a
    share each and run single-threaded operations (one join, instead of a
    barrier after every operation: CPU cores shared with other work stall
    those). Elsewhere each block runs all groups with PyTorch's own threads,
    then reduces ``dS`` for the bias parameters (a tile's vector-Jacobian
    product needs every head).
    """
    run = _Backward(p, out, lse, dout, dlse, min(block_size, BACKWARD_ROWS), params)
    if run.reverse:
        run.by_heads()
    elif run.gate_heads:
        run.by_gate_heads()
    else:
        run.by_blocks()
    return run.result()


#: query rows per block of the backward pass (at most the forward's block size)
BACKWARD_ROWS = 64
#: float32 elements of one group's probabilities (about 2 MiB: in cache on CPUs)
GROUP_ELEMENTS = 2**19


class _Backward:
    """The tensors of one backward pass, ``(B·H, L, D)``-shaped, and its block loops."""

    def __init__(self, p, out, lse, dout, dlse, rows, params) -> None:
        dtype = _dtype(p)
        self.p, self.rows, self.params = p, rows, params
        self.bias_grad = _engine.BiasGradient(p, params)
        self.table = _hankel_table(p)
        self.reverse = self.table is not None
        heads, dim = p.heads, p.q.shape[-1]
        bh, q_len = p.batch * heads, p.q_len
        # causal log_gates alone: head groups to threads (by_gate_heads), keys unpadded
        self.gate_heads = (
            not self.reverse
            and _sdpa.gate_rows(p)
            and not params
            and p.bias is None
            and rows <= _gates.CHUNK
        )
        self.pad = not self.gate_heads  # zero keys after each block's own
        self.group = _group_size(heads, rows * (p.k_len + rows))
        self.delta = _engine.row_deltas(p.xp, out, dout, dlse, p.compute).reshape(bh, q_len, 1)
        self.dlse = None if dlse is None else dlse.to(dtype).reshape(bh, q_len, 1)
        self.lse = lse.to(dtype).reshape(bh, q_len, 1)
        self.q = p.q.to(dtype).reshape(bh, q_len, dim)
        self.do = dout.to(dtype).contiguous().reshape(bh, q_len, dim)
        if self.gate_heads:  # (B·H, Lk, D) views: no block reads past its extent
            self.k, self.v = (t.to(dtype).reshape(bh, p.k_len, dim) for t in (p.k, p.v))
        else:  # (B·H, Lk + rows, D): the keys (reversed on the Hankel path), then zeros
            self.k, self.v = (_padded_keys(t.to(dtype), self.reverse, rows) for t in (p.k, p.v))
        self.dq = torch.empty_like(self.q)
        self.dk = self.q.new_zeros((bh, p.k_len, dim))
        self.dv = torch.zeros_like(self.dk)
        self.param_grads: dict[str, torch.Tensor] | None = None  # by_blocks: summed per thread

    def blocks(self) -> list[tuple[int, int, int]]:
        """``(r0, r1, extent)`` of every block; rows that see no key get ``dq = 0`` here."""
        p, blocks = self.p, []
        for r0 in range(0, p.q_len, self.rows):
            r1 = min(r0 + self.rows, p.q_len)
            extent = p.extent(r0, r1)
            if extent == 0:
                self.dq[:, r0:r1] = 0.0
            else:
                blocks.append((r0, r1, extent))
        return blocks

    # ------------------------------------------------------------ the loops
    def by_heads(self) -> None:
        """Hankel path: head groups shared out to threads, each over every block."""
        groups = list(range(0, self.p.batch * self.p.heads, self.group))
        workers = _workers(self.q, len(groups))
        blocks = self.blocks()
        tasks = [lambda w=w: self._heads(groups[w::workers], blocks) for w in range(workers)]
        sums = _parallel(tasks)
        if self.params:  # a fixed order: deterministic for a given thread count
            for diagonals in sums:
                self.bias_grad.add_diagonals(self.bias_grad.d_min, diagonals)

    def _heads(self, share: list[int], blocks: list[tuple[int, int, int]]) -> Any:
        p, bias_grad = self.p, self.bias_grad
        work = _Workspace(self, self.dk, self.dv)  # head groups own disjoint rows
        diagonals = None
        if self.params:
            diagonals = self.q.new_zeros((p.heads, bias_grad.d_max - bias_grad.d_min + 1))
        for g0 in share:
            hs = slice(g0 % p.heads, g0 % p.heads + self.group)
            for r0, r1, extent in blocks:
                mask = _hankel_mask(p, self.table, r0, r1, extent)[hs]
                ds = self._group(work, g0, r0, r1, extent, mask, None, work.grads)
                if diagonals is not None:  # anti-diagonal t of reversed keys: d = d_max - t
                    start = bias_grad.block_d_min(r0, r1) - bias_grad.d_min
                    diagonals[hs, start : start + ds.shape[-1] - 1] += _skew_sums(ds).flip(-1)
        return diagonals

    def by_gate_heads(self) -> None:
        """Causal ``log_gates`` without a positional bias: head groups shared out to
        threads, like :meth:`by_heads`. A group's key gradients are its own rows (no
        thread keeps a copy of dk, dv), its ``dS`` is reduced for the gates at once (row
        and column sums), and no block reads keys past its extent (no zero-padded
        copy of K and V): ``O(B·H·L·D)`` memory beside the inputs, gradients and one
        group's workspace per thread."""
        p = self.p
        bh = p.batch * p.heads
        groups = list(range(0, bh, self.group))
        workers = _workers(self.q, len(groups))
        blocks = self.blocks()
        _sdpa.gate_parts(p, 0, 1, 1)  # the call's table, before threads share it
        rows, cols = self.q.new_zeros((bh, p.q_len)), self.q.new_zeros((bh, p.k_len))
        tasks = [
            lambda w=w: self._gate_heads(groups[w::workers], blocks, rows, cols)
            for w in range(workers)
        ]
        _parallel(tasks)
        self.bias_grad.gates.set_sums(
            rows.view(p.batch, p.heads, p.q_len), cols.view(p.batch, p.heads, p.k_len)
        )

    def _gate_heads(self, share: list[int], blocks: list, rows, cols) -> None:
        p, dtype = self.p, _dtype(self.p)
        work = _Workspace(self, self.dk, self.dv)  # head groups own disjoint rows
        for r0, r1, extent in blocks:
            # the block's gate bias: per-key values (B, H, 1, K), the rows' part into lse
            row, keys = _sdpa.gate_parts(p, r0, r1, extent)
            row, keys = row.to(dtype)[..., None], keys.to(dtype)
            visible = p.visible(r0, r1, extent)
            for g0 in share:
                b, h0 = divmod(g0, p.heads)
                hs, g = slice(h0, h0 + self.group), slice(g0, g0 + self.group)
                seen = None if visible is None else visible[b if visible.shape[0] > 1 else 0]
                ds = self._group(
                    work, g0, r0, r1, extent, keys[b, hs], seen, work.grads, row[b, hs]
                )
                rows[g, r0:r1] = ds.sum(-1)
                cols[g, :extent] += ds.sum(-2)

    def by_blocks(self) -> None:
        """Natural key order: blocks shared out to threads (:func:`_balanced`), each block over
        all head groups, then its bias gradient (a tile's vector-Jacobian product needs
        every head). Each thread sums its own key and parameter gradients; they are
        added up in a fixed order (deterministic for a given thread count)."""
        blocks = self.blocks()
        workers = _workers(self.q, len(blocks))
        shares = _balanced([(r1 - r0) * extent for r0, r1, extent in blocks], workers)
        tasks = [
            lambda w=w: self._blocks([blocks[i] for i in shares[w]], w == 0) for w in range(workers)
        ]
        results = _parallel(tasks)
        for dk, dv, _ in results[1:]:
            self.dk += dk
            self.dv += dv
        if results[0][2] is not None:  # bias parameters or gates
            self.param_grads = dict(results[0][2])
            for _, _, grads in results[1:]:
                self.param_grads = {n: g + grads[n] for n, g in self.param_grads.items()}

    def _blocks(self, blocks: list[tuple[int, int, int]], first: bool) -> tuple:
        p, dtype = self.p, _dtype(self.p)
        bh = p.batch * p.heads
        dk = self.dk if first else torch.zeros_like(self.dk)
        dv = self.dv if first else torch.zeros_like(self.dv)
        work = _Workspace(self, dk, dv)
        bias_grad = _engine.BiasGradient(p, self.params)
        grads = self.q.new_empty(bh * self.rows * (p.k_len + self.rows))  # a block's dS
        # causal log_gates (rows <= CHUNK: one group per block): the bias of a block is
        # its keys' values, broadcast over the rows, the rows' part moved into lse
        gated = _sdpa.gate_rows(p) and not self.params and self.rows <= _gates.CHUNK
        if gated:
            _sdpa.gate_parts(p, 0, 1, 1)  # the call's table, before threads share it
        for r0, r1, extent in blocks:
            shift = None
            if gated:
                row, bias = _sdpa.gate_parts(p, r0, r1, extent)  # bias (B, H, 1, K)
                shift = row.to(dtype).reshape(bh, r1 - r0, 1)
                positional = p.positional_tile(r0, r1, extent)
                bias = bias if positional is None else bias + positional
            else:
                bias = bias_grad.values(r0, r1, extent)
            bias = None if bias is None else bias.to(dtype)
            visible = p.visible(r0, r1, extent)
            n = r1 - r0
            block_ds = grads[: bh * n * (extent + n)].view(bh, n, extent + n)
            for g0 in range(0, bh, self.group):
                b, h0 = divmod(g0, p.heads)
                hs = slice(h0, h0 + self.group)
                tile = None if bias is None else (bias[hs] if bias.dim() == 3 else bias[b, hs])
                seen = None if visible is None else visible[b if visible.shape[0] > 1 else 0]
                lower = None if shift is None else shift[g0 : g0 + self.group]
                out = block_ds[g0 : g0 + self.group]
                self._group(work, g0, r0, r1, extent, tile, seen, out, lower)
            if bias_grad.active:
                ds = block_ds.view(p.batch, p.heads, n, extent + n)[..., :extent]
                bias_grad.add(r0, r1, extent, ds)
        return dk, dv, bias_grad.result()

    def _group(self, work, g0, r0, r1, extent, bias, visible, ds_out, shift=None) -> torch.Tensor:
        """Heads ``[g0, g0 + G)`` of one block: add to dq, dk, dv; return ``dS`` (padded).

        ``shift`` ``(G, n, 1)``: a part of the bias constant along each row, not in
        ``bias`` (which may then be ``(G, 1, K)``): taken off the log-sum-exp instead.
        """
        p, scale = self.p, self.p.scale
        group, n, dim = self.group, r1 - r0, self.q.shape[-1]
        width = extent + (n if self.pad else 0)  # the block's keys, then n zero keys (padded)
        first = p.k_len - extent if self.reverse else 0
        g, keys = slice(g0, g0 + group), slice(first, first + width)
        q, do, k, v = self.q[g, r0:r1], self.do[g, r0:r1], self.k[g, keys], self.v[g, keys]
        # P = exp(q·kᵀ·scale + bias - lse); hidden and zero keys give 0
        prob = work.probs[: group * n * width].view(group, n, width)
        real = prob[:, :, :extent]
        if bias is None:
            torch.neg(self.lse[g, r0:r1].expand_as(real), out=real)
        else:
            lse = self.lse[g, r0:r1] if shift is None else self.lse[g, r0:r1] - shift
            torch.sub(bias, lse, out=real)
        prob[:, :, extent:] = float("-inf")
        prob.baddbmm_(q, k.transpose(1, 2), alpha=scale)
        _exp_(prob)
        if visible is not None:
            real.masked_fill_(~visible, 0.0)
        key_grad = work.keys_out[: group * width * dim].view(group, width, dim)
        torch.bmm(prob.transpose(1, 2), do, out=key_grad)
        work.dv[g, first : first + extent] += key_grad[:, :extent]
        # dS = P ∘ (dO·Vᵀ - δ): zero in the n padding columns
        ds = ds_out.reshape(-1)[: group * n * width].view(group, n, width)
        torch.bmm(do, v.transpose(1, 2), out=ds)
        ds.sub_(self.delta[g, r0:r1]).mul_(prob)
        if not self.reverse:  # tile gradients: rows of dS sum to dlse, as they do exactly
            _fix_row_sums_(ds, prob, None if self.dlse is None else self.dlse[g, r0:r1])
        row_grad = work.rows_out[: group * n * dim].view(group, n, dim)
        torch.bmm(ds, k, out=row_grad)
        torch.mul(row_grad, scale, out=self.dq[g, r0:r1])
        torch.bmm(ds.transpose(1, 2), q, out=key_grad)
        work.dk[g, first : first + extent].add_(key_grad[:, :extent], alpha=scale)
        return ds

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        p = self.p
        dq, dk, dv = (
            t.view(p.batch, p.heads, -1, t.shape[-1]) for t in (self.dq, self.dk, self.dv)
        )
        if self.reverse:
            dk, dv = dk.flip(2), dv.flip(2)
        if self.param_grads is not None:
            return dq, dk, dv, self.param_grads
        return dq, dk, dv, self.bias_grad.result()


class _Workspace:
    """Buffers one worker reuses for every block (fresh memory per block costs page faults)."""

    def __init__(self, run: _Backward, dk: torch.Tensor, dv: torch.Tensor) -> None:
        self.dk, self.dv = dk, dv  # where this worker adds its key gradients
        group, rows, k_len, dim = run.group, run.rows, run.p.k_len, run.q.shape[-1]
        self.probs = run.q.new_empty(group * rows * (k_len + rows))
        self.grads = torch.empty_like(self.probs)
        self.rows_out = run.q.new_empty(group * rows * dim)
        self.keys_out = run.q.new_empty(group * (k_len + rows) * dim)


def _group_size(heads: int, per_head: int) -> int:
    """The largest divisor of ``heads`` whose group holds at most :data:`GROUP_ELEMENTS`."""
    fits = [g for g in range(1, heads + 1) if heads % g == 0 and g * per_head <= GROUP_ELEMENTS]
    return max(fits, default=1)


def _workers(like: torch.Tensor, tasks: int) -> int:
    """Threads for ``tasks`` independent pieces of work on ``like``'s device."""
    if like.device.type != "cpu":  # a GPU runs one stream of kernels anyway
        return 1
    return max(1, min(torch.get_num_threads(), tasks))


def _balanced(costs: list[int], workers: int) -> list[list[int]]:
    """Indices of ``costs`` shared out to ``workers``: the costliest first, each to the
    least loaded worker (the lowest index on ties), then in order within a share.

    Causal blocks cost in proportion to their keys, so a round robin leaves one
    thread with more work (10% on 8 blocks). Fixed for given costs and worker
    count, so each thread's sums, added in a fixed order, are bit-identical run to
    run.
    """
    loads, shares = [0] * workers, [[] for _ in range(workers)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        w = loads.index(min(loads))
        loads[w] += costs[i]
        shares[w].append(i)
    return [sorted(share) for share in shares]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _parallel(tasks: list) -> list:
    """Run ``tasks`` (callables), each in a thread with single-threaded PyTorch operations.

    PyTorch's thread count is per thread (OpenMP, MKL), but a thread's first
    parallel operation initialises it from the last value *any* thread set. So
    each task reads the count first (that initialisation, done before its own
    ``set_num_threads(1)``), and only the caller sets the count back, once every
    task has finished: a task never runs with another task's or the caller's
    count, which would change how reductions are split and the gradients' last
    bits from one call to the next.
    """
    if len(tasks) == 1:
        return [tasks[0]()]
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()

    def alone(task):
        torch.get_num_threads()  # a new thread's lazy initialisation, before the 1 below
        torch.set_num_threads(1)  # this thread's operations (and new threads' default)
        with torch.set_grad_enabled(grad):  # grad mode is per thread too
            return task()

    pool = _POOLS.get(len(tasks))
    if pool is None:  # one pool per size, kept: threads start once per process
        pool = _POOLS[len(tasks)] = ThreadPoolExecutor(len(tasks), "posbias-backward")
    futures = [pool.submit(alone, task) for task in tasks]
    try:
        wait(futures)
    finally:  # threads started later copy the last value set: the caller's again
        torch.set_num_threads(threads)
    return [f.result() for f in futures]


def _padded_keys(t: torch.Tensor, reverse: bool, rows: int) -> torch.Tensor:
    """``(B·H, Lk + rows, D)``: the keys (reversed for the Hankel layout), then zeros."""
    batch, heads, length, dim = t.shape
    out = t.new_zeros((batch * heads, length + rows, dim))
    out[:, :length] = (t.flip(2) if reverse else t).reshape(batch * heads, length, dim)
    return out


def _skew_sums(ds: torch.Tensor) -> torch.Tensor:
    """``(G, n + K - 1)``: column ``t`` sums ``ds[:, r, t - r]`` (the anti-diagonals).

    ``ds`` ``(G, n, K + n)`` holds ``dS`` in its first ``K`` columns and zeros
    after. Read with row stride ``K + n - 1``, row ``r`` column ``t`` is
    ``dS[r, t - r]`` or a zero of the padding: a column sum of a strided view,
    no copy, no scatter.
    """
    g, n, width = ds.shape
    return ds.reshape(g, n * width)[:, : n * (width - 1)].view(g, n, width - 1).sum(1)


# ------------------------------------------------------------------ helpers
#: exp of arguments below this underflows past float32's normal range; PyTorch's
#: vectorised exp takes a slow path there (ALiBi's far keys: 10-30x slower)
_EXP_FLOOR = -87.0
_TINY = float(torch.finfo(torch.float32).tiny)


def _fix_row_sums_(ds: torch.Tensor, prob: torch.Tensor, dlse: Any) -> torch.Tensor:
    """``dS - P·(rowsum(dS) - dlse)`` in place: each row of ``dS`` sums to its exact value.

    Exactly, a row of ``dS = P ∘ (dP - δ) + P·dlse`` sums to ``dlse`` (0 for
    plain attention). Rounding leaves about ``1e-7·|δ|`` more (``δ`` comes from
    the forward's output, ``P`` from its log-sum-exp). Where a bias gradient is
    a sum along rows (a tile's vector-Jacobian product: a parameter that
    shifts whole rows, like FIRE's output bias, has gradient 0) that residue
    would be all of it; projected out, the gradients agree with float32
    autograd through the textbook formula.
    """
    excess = ds.sum(-1, keepdim=True)
    if dlse is not None:
        excess = excess - dlse
    return torch.addcmul(ds, prob, excess, value=-1.0, out=ds)


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """``exp`` in place, with results below float32's smallest normal number set to 0."""
    if x.dtype != torch.float32:
        return x.exp_()
    return F.threshold_(x.clamp_(min=_EXP_FLOOR).exp_(), _TINY, 0.0)


def _dtype(p: Problem) -> torch.dtype:
    return getattr(torch, p.compute)
