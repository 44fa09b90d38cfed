"""Data-dependent forget gates: ``log_gates=`` (FoX, CABLE, data-dependent ALiBi).

Per-token log-gates ``g[b, h, s] <= 0`` (one per query head and key slot)
add, on top of any positional bias,

    bias[b, h, i, j] = G[i] − G[j] = Σ_{s = j+1 .. i} g[s]         (j <= i)
    G[t] = Σ_{s <= t} g[s]

for the query's own slot ``i`` (bottom-right aligned like every slot) and key
slot ``j``: a decay whose slope each token chooses (Forgetting Transformer,
Lin et al. 2025, arXiv:2503.02130; CABLE; x-transformers ``DataDependentAlibi``).
Bidirectional attention takes a second set ``g'`` (``log_gates_after``) for the
keys after the query: ``bias = Σ_{s = i+1 .. j} g'[s]`` for ``j > i``.
Padded keys (``key_mask`` False) contribute 0.

**Precision.** ``G`` grows like ``L·|g|``: at ``L = 32768`` and ``g ≈ −0.05``
it reaches ``−1638``, where float32 steps are ``1.2e-4``, so ``G[i] − G[j]``
of two large sums would lose every digit of a nearby pair's bias (``≈ −0.05``).
Nothing here subtracts two large sums. The slots are cut into chunks of
:data:`CHUNK`; ``l`` is the cumulative sum *within* each chunk (at most
``CHUNK`` terms) and ``T[c]`` each chunk's total, and

    Σ_{s=j+1..i} g[s] = (l[i] − l[j]) + Σ_{c = chunk(j) .. chunk(i) − 1} T[c]

where the sum of whole chunks is accumulated from the query's chunk down to
the key's (a reverse cumulative sum per query row, ``O(n · L / CHUNK)`` per
block). The only cancellation left is ``l[i] − l[j]`` of at most ``CHUNK``
terms: the error of a pair's bias is about ``CHUNK · 2⁻²⁴ · |g|``, i.e. within
``4e-6`` relative of the nearest pair's value (tested at ``L = 32768``).

**Gradients** (used by :mod:`posbias._core.backward`), from the score
gradient ``dS`` of each block, never an ``Lq × Lk`` tensor: ``dG[i] += Σ_j
dS[i, j]``, ``dG[j] −= Σ_i dS[i, j]`` (for ``j <= i``; the mirror image for
``g'``), then ``dg[s] = Σ_{t >= s} dG[t]`` (a reverse cumulative sum).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import einops
import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError

#: slots per chunk of the two-level cumulative sums (see the module docstring)
CHUNK = 64
#: the names of the two gate sets: the keyword arguments and their gradients' keys
NAMES = ("log_gates", "log_gates_after")


@dataclasses.dataclass
class Gates:
    """The log-gates of one attention call, ``(B, H, Lk)`` in the compute dtype, and the
    chunked cumulative sums every block reads (built once per call)."""

    before: Any  # g: keys at or before the query
    after: Any  # g' (bidirectional attention) or None
    local: Any = None  # (B, H, Lk) cumulative sums within each chunk of g
    totals: Any = None  # (B, H, C) chunk totals of g
    local_after: Any = None
    totals_after: Any = None
    #: tables a framework's kernels derive from the gates once per call, by name (e.g.
    #: PyTorch's float64 cumulative sums as a float32 hi/lo pair)
    kernel_tables: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, xp, before: Any, after: Any = None) -> Gates:
        """Gates ``before`` (and ``after``) with their chunked sums."""
        local, totals = chunk_sums(xp, before)
        local_after = totals_after = None
        if after is not None:
            local_after, totals_after = chunk_sums(xp, after)
        return cls(before, after, local, totals, local_after, totals_after)

    def inputs(self) -> list[Any]:
        """The differentiable tensors, in :data:`NAMES` order."""
        return [self.before] if self.after is None else [self.before, self.after]

    def tile(self, xp, q_slot: Any, extent: int, causal: bool) -> Any:
        """``(B, H, n, K)``: the gate bias of queries at slots ``q_slot`` and keys ``[0, K)``.

        ``q_slot`` ``(n,)`` or ``(B, n)`` integer slots inside ``[0, Lk)``.
        """
        row, keys = self.parts(xp, q_slot, extent)
        lower = expand_rows(xp, row, keys)
        if causal or self.after is None:
            return lower
        rows = slot_rows(xp, q_slot)
        chunk = rows // CHUNK
        n_chunks = -(-extent // CHUNK)
        ids = xp.arange(n_chunks)
        # keys after the query: Σ_{s = i+1..j} g'[s] = l'[j] − l'[i] + Σ_{c = c_i}^{c_j − 1} T'[c]
        at_or_after = ids[None, None, :] >= chunk[:, :, None]
        sums = xp.where(at_or_after[:, None], self.totals_after[:, :, None, :n_chunks], 0.0)
        sums = xp.cumsum(sums, -1)
        sums = xp.pad_last(sums[..., :-1], 1, 0)  # exclusive: whole chunks before c_j
        l_i = _at_slots(xp, self.local_after, rows)
        upper = self.local_after[:, :, None, :extent] - l_i[..., None] + _per_key(sums, extent)
        later = xp.arange(extent)[None, None, :] > rows[:, :, None]  # (B|1, n, K)
        return xp.where(later[:, None], upper, lower)

    def parts(self, xp, q_slot: Any, extent: int) -> tuple[Any, Any]:
        """``(row, keys)`` with ``G[i] − G[j] = row[b, h, r] + keys[b, h, r // CHUNK, j]``
        for every key ``j`` at or before the query's slot ``i = q_slot[r]``.

        Rows are taken in groups of :data:`CHUNK`, each anchored at its last row's slot
        ``a``: ``row = G[i] − G[a]`` (``a − i < CHUNK`` gates, ``(B, H, n)``) and
        ``keys = G[a] − G[j]`` (``(B, H, ceil(n / CHUNK), K)``, from the chunked sums).
        Neither subtracts two large sums, so the precision is that of the module
        docstring; a tile is one broadcast addition (:func:`expand_rows`), and a
        softmax can take ``keys`` alone and move ``row`` (constant along a row) into
        its log-sum-exp.
        """
        rows = slot_rows(xp, q_slot)  # (B|1, n)
        n = xp.shape(rows)[-1]
        groups = -(-n // CHUNK)
        # the position (in q_slot) of each group's anchor, and of each row's anchor
        last = xp.minimum(xp.arange(groups) * CHUNK + (CHUNK - 1), n - 1)
        mine = xp.minimum((xp.arange(n) // CHUNK) * CHUNK + (CHUNK - 1), n - 1)
        anchors = xp.take_last(rows, last)  # (B|1, m)
        at = xp.take_last(rows, mine)  # (B|1, n)
        keys = self._before(xp, anchors, extent)
        # G[i] − G[a] = −Σ_{s=i+1..a} g[s] = l[i] − l[a] − (T[c_i] if a is in the next chunk)
        chunk = rows // CHUNK
        crossed = xp.where((at // CHUNK > chunk)[:, None], _at_slots(xp, self.totals, chunk), 0.0)
        row = _at_slots(xp, self.local, rows) - _at_slots(xp, self.local, at) - crossed
        return row, keys

    def _before(self, xp, rows: Any, extent: int) -> Any:
        """``(B, H, n, K)``: ``G[i] − G[j]`` for slots ``i = rows`` ``(B|1, n)`` and keys
        ``j <= i`` (keys after ``i``: not this value)."""
        chunk = rows // CHUNK  # (B|1, n)
        n_chunks = -(-extent // CHUNK)
        ids = xp.arange(n_chunks)
        l_i = _at_slots(xp, self.local, rows)  # (B, H, n)
        # whole chunks from the key's up to (not including) the query's: Σ_{c = c_j}^{c_i − 1}
        below = ids[None, None, :] < chunk[:, :, None]  # (B|1, n, C)
        sums = xp.where(below[:, None], self.totals[:, :, None, :n_chunks], 0.0)
        sums = reverse_cumsum(xp, sums, -1)
        return l_i[..., None] - self.local[:, :, None, :extent] + _per_key(sums, extent)


def slot_rows(xp, q_slot: Any) -> Any:
    """``(B|1, n)``: query slots ``(n,)`` (the same for every sequence) or ``(B, n)``."""
    return q_slot if len(xp.shape(q_slot)) == 2 else q_slot[None]


def expand_rows(xp, row: Any, keys: Any) -> Any:
    """``(B, H, n, K)``: ``row[b, h, r] + keys[b, h, r // CHUNK, j]`` (see :meth:`Gates.parts`)."""
    n = xp.shape(row)[-1]
    groups = xp.shape(keys)[2]
    pad = groups * CHUNK - n
    if pad:
        row = xp.pad_last(row, 0, pad)
    grouped = (
        einops.rearrange(row, "b h (m r) -> b h m r", r=CHUNK)[..., None] + keys[:, :, :, None]
    )
    tile = einops.rearrange(grouped, "b h m r k -> b h (m r) k")
    return tile[:, :, :n] if pad else tile


def chunk_sums(xp, g: Any) -> tuple[Any, Any]:
    """``(local, totals)``: cumulative sums of ``g`` ``(B, H, L)`` within chunks of
    :data:`CHUNK` slots ``(B, H, L)``, and each chunk's total ``(B, H, ceil(L / CHUNK))``."""
    length = xp.shape(g)[-1]
    pad = -length % CHUNK
    if pad:
        g = xp.pad_last(g, 0, pad)
    local = xp.cumsum(einops.rearrange(g, "b h (c s) -> b h c s", s=CHUNK), -1)
    totals = local[..., -1]
    local = einops.rearrange(local, "b h c s -> b h (c s)")[..., :length]
    return local, totals


def reverse_cumsum(xp, x: Any, axis: int) -> Any:
    """``out[..., s] = Σ_{t >= s} x[..., t]`` along ``axis`` (summed from the far end)."""
    return xp.flip(xp.cumsum(xp.flip(x, axis), axis), axis)


def _per_key(sums: Any, extent: int) -> Any:
    """``(B, H, n, C)`` per-chunk values repeated over each chunk's keys: ``(B, H, n, K)``."""
    return einops.repeat(sums, "b h n c -> b h n (c s)", s=CHUNK)[..., :extent]


def _at_slots(xp, values: Any, slots: Any) -> Any:
    """``values[b, h, slots[b, r]]`` for ``values`` ``(B, H, Lk)`` and ``slots`` ``(B|1, n)``
    (no batch size needed: it may be unknown while tracing)."""
    if xp.shape(slots)[0] == 1:  # the same slots for every sequence
        return xp.take_last(values, slots[0])
    heads = xp.shape(values)[1]
    index = einops.repeat(slots, "b n -> (b h) n", h=heads)
    flat = einops.rearrange(values, "b h l -> (b h) l")
    return einops.rearrange(xp.gather_last(flat, index), "(b h) n -> b h n", h=heads)


def place_rows(xp, rows: Any, q_offset: Any, k_len: int) -> Any:
    """``(B, H, Lk)``: per-query values ``rows`` ``(B, H, Lq)`` moved to their key slots
    ``q_offset + r`` (0 at slots no query holds)."""
    q_len = xp.shape(rows)[-1]
    if isinstance(q_offset, int):  # 0 <= q_offset <= Lk - Lq (gates.read)
        return xp.pad_last(rows, q_offset, k_len - q_offset - q_len)
    index = xp.arange(k_len)[None, :] - q_offset[:, None]  # (B, Lk): the query of each slot
    inside = (index >= 0) & (index < q_len)
    index = xp.minimum(xp.maximum(index, 0), max(q_len - 1, 0))
    return xp.where(inside[:, None], _at_slots(xp, rows, index), 0.0)


# ----------------------------------------------------------------- reading
def read(
    xp,
    log_gates: Any,
    log_gates_after: Any,
    *,
    layout: str,
    batch: int,
    heads: int,
    k_len: int,
    q_len: int,
    causal: bool,
    q_offset: Any,
    key_mask: Any,
    segment_ids: Any,
    compute: str,
    native: Any,
) -> Gates | None:
    """``log_gates`` and ``log_gates_after`` read and checked once (see :func:`prepare`).

    Raises:
        InvalidTypeError: non-floating gates.
        InvalidArgumentError: a wrong shape, positive or non-finite values (checked
            where values are known; while tracing a positive gate makes the output
            NaN instead, as does a traced ``q_offset`` outside ``[0, Lk − Lq]``),
            ``log_gates_after`` without ``log_gates`` or with
            ``causal=True``, ``causal=False`` without ``log_gates_after``, queries
            whose slots are not key slots, or segments that are not contiguous.
    """
    if log_gates is None:
        if log_gates_after is not None:
            raise InvalidArgumentError(
                "log_gates_after= (the gates of keys after the query) needs log_gates= "
                "(the gates of keys at or before it) too."
            )
        return None
    if causal and log_gates_after is not None:
        raise InvalidArgumentError(
            "log_gates_after= gates the keys after the query, which causal=True hides: "
            "pass causal=False (bidirectional) or drop log_gates_after."
        )
    if not causal and log_gates_after is None:
        raise InvalidArgumentError(
            "causal=False with log_gates= needs log_gates_after= for the keys after the query "
            "(bias Σ_{s=i+1..j} g'[s], x-transformers' bidirectional form); pass the same "
            "tensor for a symmetric decay."
        )
    if isinstance(q_offset, int):
        if q_offset < 0 or q_offset + q_len > k_len:
            raise InvalidArgumentError(
                f"log_gates= sums the gates between a query's own key slot and each key, so "
                f"every query needs a key slot: q_offset must be in [0, Lk - Lq] = "
                f"[0, {k_len - q_len}], got {q_offset}."
            )
    elif xp.is_concrete(q_offset):
        offsets = xp.to_numpy(q_offset)
        if (offsets < 0).any() or (offsets + q_len > k_len).any():
            raise InvalidArgumentError(
                f"log_gates= needs every query at a key slot: q_offset must be in "
                f"[0, Lk - Lq] = [0, {k_len - q_len}], got {offsets.tolist()}."
            )
    if segment_ids is not None and xp.is_concrete(segment_ids):
        _check_contiguous(xp.to_numpy(segment_ids))
    gates = [
        _read_one(xp, name, g, layout, batch, heads, k_len, key_mask, compute, native)
        for name, g in zip(NAMES, (log_gates, log_gates_after), strict=True)
        if g is not None
    ]
    if not isinstance(q_offset, int) and not xp.is_concrete(q_offset):
        # values unknown while tracing: a sequence whose queries are not at key slots
        # gets NaN outputs (loud), never gates read from the wrong slots
        outside = (q_offset < 0) | (q_offset + q_len > k_len)
        gates = [xp.where(outside[:, None, None], float("nan"), g) for g in gates]
    return Gates.build(xp, *gates)


def _read_one(xp, name, g, layout, batch, heads, k_len, key_mask, compute, native) -> Any:
    g = native(xp, name, g)
    shape = tuple(xp.shape(g))
    want, words = (
        ((batch, heads, k_len), "(B, H, Lk)")
        if layout == "bhld"
        else ((batch, k_len, heads), "(B, Lk, H)")
    )
    dtype = xp.dtype_name(g.dtype)
    if dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise InvalidTypeError(
            f"{name} must be a floating tensor of log-gates (<= 0), got dtype {dtype or g.dtype}."
        )
    if shape != want:
        raise InvalidArgumentError(
            f"{name} must have shape {words} = {want} (one log-gate per query head and key "
            f"slot), got {shape}."
        )
    if layout != "bhld":
        g = einops.rearrange(g, "b l h -> b h l")
    g = xp.cast(g, compute)
    if xp.is_concrete(g):
        values = xp.to_numpy(g).astype(np.float64)
        if not np.isfinite(values).all():
            raise InvalidArgumentError(
                f"{name} must be finite log-gates, got {int((~np.isfinite(values)).sum())} "
                "NaN or infinite values (a closed gate is a large negative number, not -inf)."
            )
        if (values > 0).any():
            raise InvalidArgumentError(
                f"{name} must be log-gates <= 0 (log of a gate in (0, 1]: logsigmoid or "
                f"-softplus), got {int((values > 0).sum())} positive values (max "
                f"{values.max():.4g})."
            )
    else:  # values unknown while tracing: a positive gate makes the output NaN (loud)
        g = xp.where(g > 0, float("nan"), g)
    if key_mask is not None:
        g = xp.where(key_mask[:, None, :], g, 0.0)
    return g


def _check_contiguous(segments: np.ndarray) -> None:
    for row, ids in enumerate(segments):
        starts = ids[np.r_[True, ids[1:] != ids[:-1]]]
        if len(np.unique(starts)) != len(starts):
            raise InvalidArgumentError(
                f"log_gates= with segment_ids needs each segment in one contiguous run (the "
                f"gates between two tokens are summed); sequence {row} has segment ids "
                f"{ids.tolist()}."
            )
