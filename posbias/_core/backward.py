"""Blockwise attention with its own backward pass (FlashAttention-2 style), framework-free.

The forward pass keeps, per query row, only the output and the log-sum-exp
``lse`` of its scores; nothing of size ``Lq × Lk`` outlives a block. The
backward pass recomputes each block's probabilities from ``(q, k, bias tile,
lse)``:

    P   = exp(S − lse)           S = q·kᵀ·scale + bias, visible keys only
    dV += Pᵀ·dO
    dP  = dO·Vᵀ
    dS  = P ∘ (dP − δ)           δ = rowsum(dO ∘ O) − dlse
    dQ  = dS·K·scale,   dK += dSᵀ·Q·scale

``dlse`` is the gradient that reaches the log-sum-exp itself: zero for plain
attention, non-zero where tiles are merged (a ring of devices).

Bias parameters get their gradient by reducing ``dS``, never from an
``Lq × Lk`` tensor, in a fixed order (no atomics: the same inputs give the
same bits):

* a Toeplitz bias at slot positions (``F(j − i)``: ALiBi and its learned
  slopes, T5 buckets, KERPLE, Sandwich): ``dS`` summed over the batch and
  along each diagonal into ``G`` ``(H, Lq + Lk − 1)`` (:func:`diagonal_sums`),
  then pulled back through the variant's own per-diagonal values (one small
  vector-Jacobian product of ``compute`` on ``Lq + Lk − 1`` positions: for T5
  a scatter-add into buckets, for ALiBi slopes a distance-weighted sum);
* any other bias (FIRE, 2-D tables, ``alibi_2d``, padded, packed or explicit
  positions): the vector-Jacobian product of each block's bias tile with that
  block's ``dS``.

A framework enters through two backend words: ``xp.custom_gradient`` (a
``torch.autograd.Function``, ``jax.custom_vjp`` or ``tf.custom_gradient``)
and ``xp.vjp`` (the framework's own autodiff, used on bias tiles and
diagonals only). A framework may pass faster block loops (PyTorch does:
``posbias/torch/_backward.py``); they share :class:`BiasGradient`.

    >>> import numpy as np, posbias
    >>> from posbias._core import backward, problem
    >>> from posbias.backends.numpy import NumpyBackend
    >>> xp = NumpyBackend(compute_dtype="float64")
    >>> q, k, v = np.random.default_rng(0).normal(size=(3, 1, 2, 6, 4))
    >>> p = problem.prepare(xp, q, k, v, "alibi", causal=True)
    >>> out, lse = backward.forward(p, block_size=4)
    >>> dq, dk, dv, _ = backward.backward(p, out, lse, np.ones_like(out), None, 4)
    >>> dq.shape, dk.shape
    ((1, 2, 6, 4), (1, 2, 6, 4))
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import einops

from . import conventions
from . import gates as _gates
from .problem import Problem
from .reference import SEQUENCED, blockwise, reference_partial, sequenced

Params = Mapping[str, Any]


def forward(p: Problem, block_size: int) -> tuple[Any, Any]:
    """``(out, lse)``: ``(B, H, Lq, D)`` and ``(B, H, Lq)`` in ``p.compute``, block by block."""
    return blockwise(p, reference_partial, block_size)


def learnable_params(p: Problem) -> dict[str, Any] | None:
    """The native learnable parameters of ``p``'s bias (None: nothing to differentiate)."""
    if p.bias is None or p.bias.spec is None or not p.bias.spec.learnable:
        return None
    params = p.bias.current_params()
    return dict(params) if params else None


def supported(p: Problem) -> bool:
    """Whether :func:`attention` can differentiate ``p``: a plain callable bias may close
    over trainable tensors it cannot see, so it keeps the framework's own autodiff."""
    return p.bias is None or p.bias.fn is None


def attention(
    p: Problem,
    block_size: int,
    *,
    forward_fn: Callable[[Problem, int], tuple[Any, Any]] = forward,
    backward_fn: Callable[..., tuple[Any, Any, Any, Any]] | None = None,
) -> tuple[Any, Any]:
    """``(out, lse)`` of ``p`` as one differentiable function of q, k, v and the bias parameters.

    The framework's custom-gradient mechanism (``xp.custom_gradient``) calls
    ``forward_fn`` and, for the gradient, ``backward_fn`` (default
    :func:`backward`) with the saved ``(q, k, v, out, lse)`` only.
    """
    xp = p.xp
    backward_fn = backward_fn or backward
    params = learnable_params(p)
    names = sorted(params) if params else []
    gates = [] if p.gates is None else p.gates.inputs()
    gate_names = _gates.NAMES[: len(gates)]
    # every tensor goes in as an input (JAX's custom_vjp must not close over tracers)
    aux = [
        f for f in _AUX_FIELDS if getattr(p, f) is not None and not isinstance(getattr(p, f), int)
    ]
    count = 3 + len(names)
    differentiable = count + len(gates)

    def rebuild(inputs):
        q, k, v = inputs[:3]
        values = dict(zip(names, inputs[3:count], strict=True))
        bias = p.bias.with_params(values) if names else p.bias
        fields = dict(zip(aux, inputs[differentiable:], strict=True))
        if gates:
            fields["gates"] = _gates.Gates.build(xp, *inputs[count:differentiable])
        return dataclasses.replace(p, q=q, k=k, v=v, bias=bias, **fields), values

    def fwd(*inputs):
        out, lse = forward_fn(rebuild(inputs)[0], block_size)
        return (out, lse), (*inputs, out, lse)

    def bwd(saved, cotangents):
        *inputs, out, lse = saved
        dout, dlse = cotangents
        prob, values = rebuild(inputs)
        dq, dk, dv, dparams = backward_fn(prob, out, lse, dout, dlse, block_size, values or None)
        grads = [
            xp.cast(g, xp.dtype_name(t.dtype)) for g, t in zip((dq, dk, dv), inputs, strict=False)
        ]
        grads += [xp.cast(dparams[n], xp.dtype_name(values[n].dtype)) for n in names]
        grads += [
            xp.cast(dparams[n], xp.dtype_name(t.dtype))
            for n, t in zip(gate_names, inputs[count:differentiable], strict=True)
        ]
        return (*grads, *(None for _ in aux))

    def textbook(*inputs):  # the same function in plain operations, for higher derivatives
        return forward(rebuild(inputs)[0], block_size)

    inputs = (p.q, p.k, p.v, *(params[n] for n in names), *gates, *(getattr(p, f) for f in aux))
    return xp.custom_gradient(fwd, bwd, recompute=textbook)(*inputs)


#: the non-differentiable tensors of a Problem
_AUX_FIELDS = (
    "q_offset",
    "q_slot",
    "k_slot",
    "key_mask",
    "q_segment",
    "segment_ids",
    "q_pos",
    "k_pos",
    "mask_add",
    "mask_keep",
)


def row_deltas(xp, out: Any, dout: Any, dlse: Any, compute: str) -> Any:
    """``δ = rowsum(dO ∘ O) − dlse``, ``(B, H, Lq)`` in ``compute``."""
    delta = xp.sum(xp.cast(dout, compute) * xp.cast(out, compute), -1)
    return delta if dlse is None else delta - xp.cast(dlse, compute)


def backward(
    p: Problem,
    out: Any,
    lse: Any,
    dout: Any,
    dlse: Any,
    block_size: int,
    params: Params | None = None,
) -> tuple[Any, Any, Any, dict[str, Any] | None]:
    """``(dq, dk, dv, dparams)`` of :func:`forward`'s rows, block by block (any backend).

    ``dq`` ``(B, H, Lq, D)``, ``dk``/``dv`` ``(B, H, Lk, D)`` in ``p.compute``;
    ``dparams`` maps each name of ``params`` (the bias's native parameters, or
    None for none to differentiate) to its gradient.
    """
    xp = p.xp
    delta = row_deltas(xp, out, dout, dlse, p.compute)
    dout = xp.cast(dout, p.compute)
    dlse = None if dlse is None else xp.cast(dlse, p.compute)
    bias_grad = BiasGradient(p, params)
    dim = xp.shape(p.q)[-1]
    extents = [p.extent(r0, min(r0 + block_size, p.q_len)) for r0 in range(0, p.q_len, block_size)]
    dk, dv = (KeyRows(xp, extents, p.k_len) for _ in "kv")
    dqs, done, first = [], None, p
    for r0 in range(0, p.q_len, block_size):
        r1 = min(r0 + block_size, p.q_len)
        if done:  # one block's scores alive at a time: every result of the last one first
            p = sequenced(first, done, SEQUENCED)
        extent = p.extent(r0, r1)
        if extent == 0:
            dqs.append(xp.zeros((p.batch, p.heads, r1 - r0, dim), p.compute))
            continue
        bias = bias_grad.values(r0, r1, extent, p)
        rows = (slice(None), slice(None), slice(r0, r1))
        dq_b, dk_b, dv_b, ds = tile_backward(
            p, r0, r1, extent, bias, lse[rows], delta[rows], dout[rows], _rows(dlse, rows)
        )
        # tie the next block to the running sums, not to this block's terms: a compiler
        # could otherwise keep every block's dk, dv alive and add them up at the end
        done = [dq_b, *dk.add(dk_b), *dv.add(dv_b), *bias_grad.add(r0, r1, extent, ds)]
        dqs.append(dq_b)
    dk, dv = (acc.result((p.batch, p.heads, dim), p.compute) for acc in (dk, dv))
    dq = dqs[0] if len(dqs) == 1 else xp.concat(dqs, 2)
    return dq, dk, dv, bias_grad.result()


def tile_backward(
    p: Problem,
    r0: int,
    r1: int,
    extent: int,
    bias: Any,
    lse: Any,
    delta: Any,
    dout: Any,
    dlse: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """One block's ``(dq, dk, dv, dS)``: rows ``[r0, r1)`` against keys ``[0, extent)``."""
    xp = p.xp
    q = xp.cast(p.q[:, :, r0:r1], p.compute)
    k = xp.cast(p.k[:, :, :extent], p.compute)
    v = xp.cast(p.v[:, :, :extent], p.compute)
    scores = xp.einsum("bhqd,bhkd->bhqk", q, k) * p.scale
    if bias is not None:
        scores = scores + bias
    scores, visible = p.masked_scores(scores, r0, r1, extent)
    shifted = scores - lse[..., None]
    if visible is not None:  # hidden keys (and rows that see none: lse = the lowest float)
        # get exp(lowest) = 0, so no exp overflows (jax_debug_infs, detect_anomaly stay quiet)
        shifted = xp.where(visible, shifted, xp.finfo_min(p.compute))
    prob = xp.exp(shifted)
    dv = xp.einsum("bhqk,bhqd->bhkd", prob, dout)
    ds = prob * (xp.einsum("bhqd,bhkd->bhqk", dout, v) - delta[..., None])
    # Rows of dS sum to dlse exactly (0 for plain attention); rounding leaves about
    # 1e-7·|δ|, which would be all the gradient of a parameter that shifts whole
    # rows (FIRE's output bias): project it out.
    excess = xp.sum_keepdims(ds, -1)
    if dlse is not None:
        excess = excess - dlse[..., None]
    ds = ds - prob * excess
    dq = xp.einsum("bhqk,bhkd->bhqd", ds, k) * p.scale
    dk = xp.einsum("bhqk,bhqd->bhkd", ds, q) * p.scale
    return dq, dk, dv, ds


def _rows(x: Any, rows: tuple) -> Any:
    return None if x is None else x[rows]


class KeyRows:
    """Sums of per-block key gradients ``(B, H, K, D)`` that cover keys ``[0, K)``.

    Kept as one piece per interval between block extents, each added to in
    place of padding every block to ``Lk`` (a compiler may keep every padded
    block alive: ``O(Lq/block · Lk)`` memory instead of ``O(Lk)``).
    """

    def __init__(self, xp, extents: list[int], length: int) -> None:
        self.xp, self.length = xp, length
        self.bounds = sorted({0, *(e for e in extents if e > 0)})
        self.pieces: list[Any] = [None] * (len(self.bounds) - 1)

    def add(self, block: Any) -> list[Any]:
        """Add ``block`` (keys ``[0, K)``); the running sums it changed."""
        extent, changed = self.xp.shape(block)[2], []
        for i, (a, b) in enumerate(itertools.pairwise(self.bounds)):
            if b > extent:
                break
            part = block[:, :, a:b]
            self.pieces[i] = part if self.pieces[i] is None else self.pieces[i] + part
            changed.append(self.pieces[i])
        return changed

    def result(self, lead: tuple[int, int, int], dtype: str) -> Any:
        batch, heads, dim = lead
        xp, parts = self.xp, []
        for (a, b), piece in zip(itertools.pairwise(self.bounds), self.pieces, strict=True):
            parts.append(xp.zeros((batch, heads, b - a, dim), dtype) if piece is None else piece)
        if self.bounds[-1] < self.length:  # keys no row sees
            parts.append(xp.zeros((batch, heads, self.length - self.bounds[-1], dim), dtype))
        return parts[0] if len(parts) == 1 else xp.concat(parts, 2)


def diagonal_sums(xp, ds: Any) -> Any:
    """``(..., n + K - 1)``: column ``t`` sums ``ds[..., r, c]`` over ``c - r = t - (n - 1)``.

    ``ds`` ``(..., n, K)``; column ``t`` is the diagonal ``d = c - r`` from
    ``-(n - 1)`` (bottom-left corner) to ``K - 1`` (top-right). Each row is
    shifted by padding and a reshape (no gather, no scatter): ``O(n·(n + K))``.

    Example:
        >>> import numpy as np
        >>> from posbias.backends.numpy import NumpyBackend
        >>> diagonal_sums(NumpyBackend(), np.arange(6.0).reshape(2, 3)).tolist()
        [3.0, 4.0, 6.0, 2.0]
    """
    *lead, n, k = xp.shape(ds)
    dtype = xp.dtype_name(ds.dtype)
    # left-pad every row with n zeros: row r, column c sits at r·(K + n) + n + c;
    # read with row stride K + n + 1 from offset 1, row r column t is
    # r·(K + n) + r + t + 1 = column c = t + r - (n - 1) of row r (zeros otherwise)
    padded = xp.concat([xp.zeros((*lead, n, n), dtype), ds], -1)
    flat = einops.rearrange(padded, "... n w -> ... (n w)")
    flat = xp.concat([flat, xp.zeros((*lead, n + 1), dtype)], -1)
    width = k + n + 1
    rows = einops.rearrange(flat[..., 1 : 1 + n * width], "... (n w) -> ... n w", n=n)
    return xp.sum(rows[..., : n + k - 1], -2)


class BiasGradient:
    """The bias of each block and the gradient of its parameters, reduced from ``dS``.

    ``values(r0, r1, K)`` gives a block's bias tile; ``add(r0, r1, K, dS)``
    (or ``add_diagonals`` for callers that sum diagonals themselves) reduces
    that block's score gradient; ``result()`` gives ``{name: gradient}``.
    """

    def __init__(self, p: Problem, params: Params | None) -> None:
        self.p = p
        self.params = dict(params) if params else None
        self.gates = None if p.gates is None else GateGradient(p)
        self.diagonal = self.params is not None and toeplitz_at_slots(p)
        self._pullback: Any = None
        self._tile_dims = 0
        self._grads: dict[str, Any] | None = None
        self._diagonals: list[tuple[int, Any]] = []
        if self.diagonal:
            self.d_min, self.d_max = conventions.diagonal_range(p.q_offset, p.q_len, 0, p.k_len)

    def values(self, r0: int, r1: int, extent: int, p: Problem | None = None) -> Any:
        """The bias tile of rows ``[r0, r1)`` and keys ``[0, extent)`` (None: no bias).

        ``p``: this block's problem (its inputs tied to the previous block), default
        the whole one.
        """
        p = p or self.p
        if self.params is None or self.diagonal:
            return p.bias_tile(r0, r1, extent)
        tile, self._pullback = p.xp.vjp(
            lambda prm: dataclasses.replace(p, bias=p.bias.with_params(dict(prm))).positional_tile(
                r0, r1, extent
            ),
            self.params,
        )
        self._tile_dims = len(p.xp.shape(tile))
        if p.gates is not None:
            tile = tile + p.gates.tile(p.xp, p.q_slot[..., r0:r1], extent, p.causal)
        return tile

    @property
    def active(self) -> bool:
        """Whether there is anything to reduce ``dS`` for (bias parameters or gates)."""
        return self.params is not None or self.gates is not None

    def add(self, r0: int, r1: int, extent: int, ds: Any) -> list[Any]:
        """Reduce one block's ``dS`` ``(B, H, n, extent)``; the reductions made (to sequence)."""
        done = [] if self.gates is None else self.gates.add(r0, r1, extent, ds)
        if self.params is None:
            return done
        xp = self.p.xp
        if self.diagonal:
            sums = diagonal_sums(xp, xp.sum(ds, 0))
            self.add_diagonals(self.block_d_min(r0, r1), sums)
            return [*done, sums]
        if self._tile_dims == 3:  # one tile for every sequence of the batch
            ds = xp.sum(ds, 0)
        grads = self._pullback(ds)
        self._accumulate(grads)
        self._pullback = None
        return [*done, *grads.values()]

    def block_d_min(self, r0: int, r1: int) -> int:
        """The first diagonal ``d = j - i`` of rows ``[r0, r1)`` against keys ``[0, ...)``."""
        return -(self.p.q_offset + r1 - 1)

    def add_diagonals(self, d_first: int, sums: Any) -> None:
        """Add per-diagonal sums ``(H, n)`` of ``dS`` for ``d = d_first .. d_first + n - 1``."""
        self._diagonals.append((d_first - self.d_min, sums))

    def result(self) -> dict[str, Any] | None:
        """``{name: gradient}`` of the parameters and of the gates (their names in
        :data:`posbias._core.gates.NAMES`); None when there are neither."""
        gates = {} if self.gates is None else self.gates.result()
        if self.params is None:
            return gates or None
        if self.diagonal:
            self._accumulate(self._pull_diagonals())
        if self._grads is None:  # no block saw a key
            xp = self.p.xp
            zeros = {n: xp.zeros(xp.shape(v), self.p.compute) for n, v in self.params.items()}
            return {**zeros, **gates}
        return {**self._grads, **gates}

    # ---------------------------------------------------------------- internals
    def _pull_diagonals(self) -> dict[str, Any]:
        xp, p = self.p.xp, self.p
        width = self.d_max - self.d_min + 1
        dtype = p.compute
        total = None
        for start, sums in self._diagonals:  # fixed order: deterministic
            n = xp.shape(sums)[-1]
            parts = [xp.zeros((p.heads, start), dtype)] if start else []
            parts.append(sums)
            if start + n < width:
                parts.append(xp.zeros((p.heads, width - start - n), dtype))
            full = parts[0] if len(parts) == 1 else xp.concat(parts, -1)
            total = full if total is None else total + full
        if total is None:
            total = xp.zeros((p.heads, width), dtype)
        _, pullback = xp.vjp(
            lambda prm: p.bias.with_params(dict(prm)).diagonals(xp, self.d_min, self.d_max, dtype),
            self.params,
        )
        return pullback(total)

    def _accumulate(self, grads: Mapping[str, Any]) -> None:
        if self._grads is None:
            self._grads = dict(grads)
        else:
            self._grads = {n: self._grads[n] + grads[n] for n in self._grads}


class GateGradient:
    """The gradients of ``log_gates`` (and ``log_gates_after``) reduced from ``dS``.

    For ``j <= i`` the bias is ``G[i] − G[j]``: a block adds its row sums of
    ``dS`` to ``dG`` at the queries' slots and subtracts its column sums at the
    keys'; for ``j > i`` (``log_gates_after``) the bias is ``G'[j] − G'[i]``,
    the mirror image. ``dg = Σ_{t >= s} dG[t]`` (:func:`gates.reverse_cumsum`).
    """

    def __init__(self, p: Problem) -> None:
        self.p = p
        self.bidirectional = p.gates.after is not None
        self.rows: list[tuple[int, tuple[Any, Any]]] = []  # per block: (B, H, n) row sums
        self.cols: list[Any] = [None, None]  # running (B, H, Lk) column sums: j <= i, j > i

    def add(self, r0: int, r1: int, extent: int, ds: Any) -> list[Any]:
        """Reduce one block's ``dS`` ``(B, H, n, extent)``; the sums made (to sequence)."""
        p, xp = self.p, self.p.xp
        if self.bidirectional:
            later = (
                xp.arange(extent)[None, None, :]
                > _gates.slot_rows(xp, p.q_slot[..., r0:r1])[:, :, None]
            )
            upper = xp.where(later[:, None], ds, 0.0)
            parts = (ds - upper, upper)
        else:
            parts = (ds,)
        sums = tuple(xp.sum(part, -1) for part in parts)
        for index, part in enumerate(parts):
            cols = xp.sum(part, -2)
            if extent < p.k_len:
                cols = xp.pad_last(cols, 0, p.k_len - extent)
            total = self.cols[index]
            self.cols[index] = cols if total is None else total + cols
        self.rows.append((r0, sums))
        return [*sums, *(c for c in self.cols if c is not None)]

    def set_sums(self, rows: Any, cols: Any) -> None:
        """The call's row sums ``(B, H, Lq)`` and column sums ``(B, H, Lk)`` of a causal
        ``dS``, from a caller that reduced ``dS`` itself (instead of :meth:`add`)."""
        self.rows, self.cols = [(0, (rows,))], [cols, None]

    def result(self) -> dict[str, Any]:
        """``{"log_gates": dg}`` (and ``"log_gates_after"``), ``(B, H, Lk)`` in ``p.compute``."""
        p, xp = self.p, self.p.xp
        grads = {}
        for index, name in enumerate(_gates.NAMES[: 1 + self.bidirectional]):
            cols = self.cols[index]
            if cols is None:
                cols = xp.zeros((p.batch, p.heads, p.k_len), p.compute)
            at_slots = _gates.place_rows(xp, self._row_sums(index), p.q_offset, p.k_len)
            d_big_g = at_slots - cols if index == 0 else cols - at_slots
            grads[name] = _gates.reverse_cumsum(xp, d_big_g, -1)
        return grads

    def _row_sums(self, index: int) -> Any:
        p, xp = self.p, self.p.xp
        if not self.rows:  # no block saw a key
            return xp.zeros((p.batch, p.heads, p.q_len), p.compute)
        parts, filled = [], 0
        for r0, sums in self.rows:  # blocks of rows in order; rows that see no key: 0
            parts.append(xp.pad_last(sums[index], r0 - filled, 0))
            filled = r0 + xp.shape(sums[index])[-1]
        rows = parts[0] if len(parts) == 1 else xp.concat(parts, -1)
        return xp.pad_last(rows, 0, p.q_len - filled)


def toeplitz_at_slots(p: Problem) -> bool:
    """The bias is ``F(j − i)`` at slot positions with one static offset: diagonals apply."""
    return (
        p.bias is not None and p.bias.toeplitz and p.slot_positions and isinstance(p.q_offset, int)
    )
