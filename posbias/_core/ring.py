"""Sequence-parallel (ring) attention, framework-free: what every device computes.

Both distributed engines — :func:`posbias.jax.sharded_attention` (inside
``jax.shard_map``) and :func:`posbias.torch.distributed.ring_attention` (one
process per rank) — run :func:`attend_on_ring` on their local blocks. The
framework enters only through a :class:`Ring`: how to pass key/value blocks
to the next device, gather a few integers, reduce decoding statistics, branch
on a (possibly traced) chunk relation and checkpoint a tile.

What a device does, for its queries ``q`` ``(B, H, L_local, D)``:

* **layout ring** (no masks, no explicit positions): its key/value block goes
  round the ring (``n - 1`` shifts); each (query chunk, key chunk) pair is a
  tile of :func:`posbias._core.partial.tile`, merged exactly by log-sum-exp;
  under causal masking, hidden chunk pairs are skipped (:mod:`layouts`);
* **explicit ring** (padding, packed segments or explicit positions): every
  tile is computed and masked; keys travel with their slots, bias positions,
  segment ids and padding mask;
* **decoding** (fewer queries than keys, the queries replicated): one tile
  against the local cache block, merged over devices with one max and two
  sums.

Padding means the same as on one device (:mod:`posbias._core.conventions`):
the bias positions of a padded batch are the *global* ``cumsum(key_mask) - 1``,
found by an exclusive scan of per-chunk counts (:func:`mask_positions`: one
all-gather of ``B × chunks`` integers), so sharded equals single-device for
every bias, shift-invariant or not.

Forget gates (``log_gates=``, :mod:`posbias._core.gates`) work the same way:
each device holds the gates of its own key slots, and a tile between query
chunk ``I`` and key chunk ``J < I`` adds ``Σ_{s=j+1..i} g[s]`` as three sums
that are never differences of large cumulative sums — the gates after ``j``
in chunk ``J`` (travelling with the keys), the gates up to ``i`` in chunk
``I``, and the totals of the chunks strictly between, from one exchange of
per-chunk totals (:class:`RingGates`).
"""

from __future__ import annotations

from typing import Any

import einops
import numpy as np

from ..errors import InvalidArgumentError
from . import backward as _backward
from . import conventions, layouts
from . import gates as _gates
from . import partial as _partial
from . import problem as _problem


class Ring:
    """A framework's collectives along the ring of sequence shards (subclassed per engine).

    Attributes:
        xp: the backend of the local blocks.
        n: devices on the ring.
        me: this device's index: a Python int (PyTorch ranks) or a traced scalar (JAX).
        static: ``me`` is a Python int, so chunk relations are known before running.
    """

    xp: Any
    n: int
    me: Any
    static: bool = True

    def shift(self, blocks: tuple) -> tuple:
        """Send ``blocks`` to the next device and return the previous device's."""
        raise NotImplementedError

    def gather(self, x: Any) -> Any:
        """``(n, *x.shape)``: a small integer tensor from every device, in device order."""
        raise NotImplementedError

    def total(self, x: Any) -> Any:
        """The sum of an integer tensor over the ring (no gradient)."""
        raise NotImplementedError

    def top(self, x: Any) -> Any:
        """The maximum of ``x`` over the ring, without gradient (a shift for the merge)."""
        raise NotImplementedError

    def sum(self, x: Any) -> Any:
        """The sum of ``x`` over the ring, differentiable."""
        raise NotImplementedError

    def switch(self, which: Any, branches: list, operand: Any) -> Any:
        """``branches[which](operand)``; ``which`` is an int or a traced scalar."""
        if isinstance(which, (int, np.integer)):
            return branches[int(which)](operand)
        raise NotImplementedError

    def checkpoint(self, fn: Any) -> Any:
        """``fn``, recomputed in the backward pass instead of keeping its activations."""
        return fn

    def keep(self, out: Any, blocks: tuple) -> Any:
        """``out``, keeping the last received ``blocks`` in the autograd graph (PyTorch)."""
        return out


def make_tile(
    xp,
    bias_fn: Any,
    *,
    scale: float,
    compute: str,
    kv_group: int,
    ring: Ring,
    bias: Any = None,
    own_backward: bool = False,
    gates: bool = False,
):
    """``tile(q, k, v, q_slot, k_slot, causal, masks=(q_seg, k_seg, k_real), q_pos, k_pos,
    gate=None)``.

    One tile ``(out, lse)`` of :func:`posbias._core.partial.tile`. With
    ``own_backward`` and ``bias`` (the read ``bias=``, or None for no bias) on a
    framework with automatic differentiation, a tile is one block of
    :mod:`posbias._core.backward`: its
    backward pass recomputes the tile's probabilities from ``(out, lse)`` and
    reduces ``dS`` for the bias parameters, like single-device attention.
    Otherwise (a plain callable or a 2-D bias, a bias chosen per device by a
    traced head index, ``checkpoint_tiles=False``) the framework's autodiff goes
    through the tile, checkpointed by the ring's framework.

    ``gates``: the call has ``log_gates``; each tile then gets ``gate=``, the
    pieces of :meth:`RingGates.pieces`, and adds their bias (the framework's
    autodiff differentiates it, checkpointed like any tile).
    """

    def fn(q, k, v, q_slot, k_slot, visible, q_pos, k_pos, gate, causal):
        add = bias_fn
        if gate is not None:

            def add(q_pos, k_pos, dtype):
                decay = gate_bias(xp, gate, causal)
                return decay if bias_fn is None else bias_fn(q_pos, k_pos, dtype) + decay

        return _partial.tile(
            xp,
            q,
            k,
            v,
            scale=scale,
            bias_fn=add,
            q_slot=q_slot,
            k_slot=k_slot,
            causal=causal,
            compute=compute,
            visible=visible,
            kv_group=kv_group,
            q_pos=q_pos,
            k_pos=k_pos,
        )

    causal_fn, plain_fn = (ring.checkpoint(lambda *a, c=c: fn(*a, causal=c)) for c in (True, False))
    own = (
        own_backward
        and not gates
        and xp.autodiff
        and getattr(ring, "checkpoint_tiles", True)
        and (bias is None or (bias.spec is not None and not bias.points))
    )

    def tile(
        q,
        k,
        v,
        q_slot,
        k_slot,
        causal,
        masks=(None, None, None),
        q_pos=None,
        k_pos=None,
        gate=None,
    ):
        if own:
            return _own_tile(xp, q, k, v, q_slot, k_slot, causal, masks, q_pos, k_pos)
        run = causal_fn if causal else plain_fn
        visible = _partial.key_visibility(*masks)
        return run(q, k, v, q_slot, k_slot, visible, q_pos, k_pos, gate)

    def _own_tile(xp, q, k, v, q_slot, k_slot, causal, masks, q_pos, k_pos):
        if kv_group > 1:  # K/V travel un-repeated; the repeat's gradient sums the group
            k, v = (einops.repeat(t, "b h l d -> b (h g) l d", g=kv_group) for t in (k, v))
        q_seg, k_seg, k_real = masks
        batch, heads, q_len, _ = xp.shape(q)
        p = _problem.Problem(
            xp=xp,
            q=q,
            k=k,
            v=v,
            batch=batch,
            heads=heads,
            q_len=q_len,
            k_len=xp.shape(k)[2],
            scale=scale,
            compute=compute,
            in_dtype=xp.dtype_name(q.dtype),
            causal=causal,
            q_offset=None,  # slots are explicit: no static causal extent
            q_slot=q_slot,
            k_slot=k_slot,
            key_mask=k_real,
            q_segment=q_seg,
            segment_ids=k_seg,
            bias=bias,
            q_pos=q_slot if q_pos is None else q_pos,
            k_pos=k_slot if k_pos is None else k_pos,
            slot_positions=False,
            points=False,
        )
        return _backward.attention(p, q_len)  # a tile is one block

    return tile


def gate_bias(xp, pieces: Any, causal: bool) -> Any:
    """``(B, H, n, K)``: the forget-gate bias of a tile from its :meth:`RingGates.pieces`.

    A piece is ``(rows, cols, None)`` for a pair of different chunks (the bias
    ``rows[i] + cols[j]``: every term a sum of gates of one sign, nothing
    cancels) or ``(None, None, (g, g'))`` for a chunk against itself
    (:meth:`posbias._core.gates.Gates.tile` on the chunk's own gates).
    """
    blocks = []
    for row in pieces:
        parts = []
        for rows, cols, chunk in row:
            if chunk is None:
                parts.append(rows[..., :, None] + cols[..., None, :])
            else:
                size = xp.shape(chunk[0])[-1]
                own = _gates.Gates.build(xp, *chunk)
                parts.append(own.tile(xp, xp.arange(size), size, causal))
        blocks.append(parts[0] if len(parts) == 1 else xp.concat(parts, -1))
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, -2)


def prefix_sums(xp, g: Any) -> Any:
    """``out[..., i] = Σ_{s <= i} g[..., s]`` of ``(B, H, S)``, chunked like
    :func:`posbias._core.gates.chunk_sums` (within-chunk sums plus earlier chunks' totals)."""
    local, totals = _gates.chunk_sums(xp, g)
    zero = xp.zeros((*xp.shape(totals)[:-1], 1), xp.dtype_name(g.dtype))
    before = xp.concat([zero, xp.cumsum(totals, -1)[..., :-1]], -1)  # earlier chunks' totals
    per_slot = einops.repeat(before, "b h c -> b h (c s)", s=_gates.CHUNK)
    return local + per_slot[..., : xp.shape(g)[-1]]


def suffix_sums(xp, g: Any) -> Any:
    """``out[..., j] = Σ_{s > j} g[..., s]`` of ``(B, H, S)`` (0 at the last slot)."""
    inclusive = xp.flip(prefix_sums(xp, xp.flip(g, -1)), -1)
    zero = xp.zeros((*xp.shape(g)[:-1], 1), xp.dtype_name(g.dtype))
    return xp.concat([inclusive[..., 1:], zero], -1)


class RingGates:
    """This device's forget gates (``log_gates=``, ``log_gates_after=``) on the ring.

    Each device holds ``g`` (and ``g'``) of its own key slots ``(B, H, L_local)``,
    read, checked and masked by :func:`posbias._core.gates.read`. For a tile of
    query chunk ``I`` against key chunk ``J < I`` the bias of query ``i`` and
    key ``j`` is

        Σ_{s=j+1..i} g[s] = cols[j] + T(J < c < I) + rows[i]

    with ``cols[j] = Σ_{s in J, s > j} g[s]`` (computed by the keys' owner, it
    travels with the keys), ``rows[i] = Σ_{s in I, s <= i} g[s]`` and
    ``T(J < c < I)`` the totals of the chunks strictly between: one exchange of
    per-chunk totals (``B·H`` scalars per chunk, differentiable) gives every
    device every total. All three terms have the sign of the gates, so the sum
    is exact to a few float32 roundings of the *bias* (no difference of two
    large cumulative sums). Keys after the query (``causal=False``) are the
    mirror image with ``g'``; a chunk against itself is
    :meth:`posbias._core.gates.Gates.tile` on its own gates.
    """

    def __init__(self, ring: Ring, order: str, before: Any, after: Any = None) -> None:
        xp = self.xp = ring.xp
        per = layouts.chunks_per_device(order)
        self.size = size = xp.shape(before)[-1] // per
        self.ids = layouts.chunk_ids(order, ring.n, ring.me)

        def cut(g):
            return (
                [None] * per
                if g is None
                else [g[..., a * size : (a + 1) * size] for a in range(per)]
            )

        self.chunks = list(zip(cut(before), cut(after), strict=True))
        self.rows = [
            (prefix_sums(xp, b), None if a is None else suffix_sums(xp, a)) for b, a in self.chunks
        ]
        cols = [
            (suffix_sums(xp, b), None if a is None else prefix_sums(xp, a)) for b, a in self.chunks
        ]
        #: what travels with the keys: ``(cols of g, cols of g')``, ``(B, H, L_local)`` each
        self.keys = tuple(
            None if parts[0] is None else parts[0] if per == 1 else xp.concat(list(parts), -1)
            for parts in zip(*cols, strict=True)
        )
        self.totals = [
            None if g is None else _every_total(ring, order, cut(g)) for g in (before, after)
        ]

    def between(self, low: Any, high: Any, which: int) -> Any:
        """``(B, H)``: the totals of the chunks strictly between chunk ``low`` and ``high``."""
        xp, totals = self.xp, self.totals[which]
        ids = xp.arange(xp.shape(totals)[-1])
        inside = (ids > low) & (ids < high)
        return xp.sum(xp.where(inside, totals, 0.0), -1)

    def piece(self, a: int, b: int, keys: tuple, k_chunk: Any, own: bool, causal: bool) -> tuple:
        """The piece of query chunk ``a`` (local index) against chunk ``b`` of the key
        block ``keys`` (what travelled: :attr:`keys`), global chunk ``k_chunk``;
        ``own``: the key block is this device's."""
        if own and a == b:
            return (None, None, self.chunks[a])
        xp, size = self.xp, self.size
        cols = [None if t is None else t[..., b * size : (b + 1) * size] for t in keys]
        q_chunk = self.ids[a]
        rows, rows_after = self.rows[a]
        earlier = (rows + self.between(k_chunk, q_chunk, 0)[..., None], cols[0])
        if causal or rows_after is None:  # keys of later chunks are hidden
            return (*earlier, None)
        later = (rows_after + self.between(q_chunk, k_chunk, 1)[..., None], cols[1])
        before = k_chunk < q_chunk
        if isinstance(before, (bool, np.bool_)):
            return (*(earlier if before else later), None)
        return (*(xp.where(before, e, x) for e, x in zip(earlier, later, strict=True)), None)

    def pieces(self, keys: tuple, k_ids: list, own: bool, causal: bool) -> list:
        """Every query chunk of this device against every chunk of a key block."""
        return [
            [self.piece(a, b, keys, k_ids[b], own, causal) for b in range(len(k_ids))]
            for a in range(len(self.ids))
        ]


def _every_total(ring: Ring, order: str, chunks: list) -> Any:
    """``(B, H, n·chunks)``: the gate total of every chunk of the ring, in sequence order.

    One differentiable all-reduce of ``(n, B, H, chunks)`` (each device fills its row).
    """
    xp = ring.xp
    mine = xp.stack([xp.sum(c, -1) for c in chunks], -1)  # (B, H, per)
    if ring.n == 1:
        table = mine[None]
    else:
        me = xp.cast(xp.arange(ring.n) == ring.me, xp.dtype_name(mine.dtype))
        table = ring.sum(me[:, None, None, None] * mine[None])
    owner = {
        c: (d, a) for d in range(ring.n) for a, c in enumerate(layouts.chunk_ids(order, ring.n, d))
    }
    return xp.stack([table[owner[c][0], ..., owner[c][1]] for c in sorted(owner)], -1)


def local_slots(ring: Ring, order: str, length: int) -> Any:
    """``(L_local,)`` global slots of this device's tokens in ``order``."""
    xp = ring.xp
    per = layouts.chunks_per_device(order)
    size = length // per
    ids = layouts.chunk_ids(order, ring.n, ring.me)
    return xp.concat([xp.arange(size) + c * size for c in ids], 0)


def mask_positions(ring: Ring, key_mask: Any, order: str) -> Any:
    """``(B, L_local)`` bias positions of this device's keys: the global ``cumsum - 1``.

    Each device counts the real keys of its chunks, all devices gather those
    ``B × chunks`` counts, and each chunk starts from the count of real keys in
    every chunk before it in the global order (an exclusive scan).
    """
    xp = ring.xp
    per = layouts.chunks_per_device(order)
    size = xp.shape(key_mask)[-1] // per
    chunks = [key_mask[:, a * size : (a + 1) * size] for a in range(per)]
    counts = xp.stack([xp.sum(xp.as_int(c), -1) for c in chunks], -1)  # (B, per)
    everyone = ring.gather(counts)  # (n, B, per)
    ids = xp.from_numpy(
        np.array([layouts.chunk_ids(order, ring.n, d) for d in range(ring.n)], np.int64)
    )  # (n, per): the global chunk index of every device's chunks
    parts = []
    for a, mine in enumerate(layouts.chunk_ids(order, ring.n, ring.me)):
        earlier = xp.as_int(ids < mine)[:, None, :]  # (n, 1, per)
        prefix = xp.sum(xp.sum(everyone * earlier, 0), -1)  # (B,)
        parts.append(conventions.positions_from_mask(xp, chunks[a]) + prefix[:, None])
    return xp.concat(parts, -1)


def query_positions(ring: Ring, key_mask: Any, k_slot: Any, q_slot: Any) -> Any:
    """``(B, Lq)`` bias positions of replicated queries at ``q_slot`` against sharded keys.

    The position of a query slot is the number of real keys at or before it,
    minus 1 — :func:`posbias._core.conventions.positions_from_mask` read at the
    query's slot — summed over the devices that hold the keys.
    """
    xp = ring.xp
    before = conventions.causal_visible(q_slot, k_slot)  # (Lq, Lk_local)
    local = xp.sum(xp.as_int(before[None] & key_mask[:, None, :]), -1)  # (B, Lq)
    return ring.total(local) - 1


def attend_on_ring(
    ring: Ring,
    tile: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool,
    order: str,
    compute: str,
    q_pos: Any = None,
    k_pos: Any = None,
    segment_ids: Any = None,
    key_mask: Any = None,
    log_gates: tuple | None = None,
) -> Any:
    """This device's output rows ``(B, H, Lq_local, D)`` in ``compute``.

    Args:
        ring: the framework's collectives.
        tile: from :func:`make_tile`.
        q: ``(B, H, Lq_local, D)``; the same queries on every device when fewer
            than the keys (decoding against a sequence-sharded cache).
        k: ``(B, H_kv, L_local, D)`` this device's keys.
        v: ``(B, H_kv, L_local, D)`` this device's values.
        causal: hide keys at later slots.
        order: the layout of the shards (:mod:`posbias._core.layouts`).
        compute: the compute dtype.
        q_pos: explicit bias positions of the queries, or None (from ``key_mask``, else
            the slots). As on one device they set the bias only: causal
            visibility follows the slots (the layout; bottom-right when decoding).
        k_pos: the same for the keys.
        segment_ids: ``(B, L_local)`` ids of packed documents, or None.
        key_mask: ``(B, L_local)`` bool, True for a real key, or None.
        log_gates: ``(g, g')`` this device's log-gates ``(B, H, L_local)`` as
            :func:`posbias._core.gates.read` returns them (``g'`` None unless
            bidirectional), or None; the ``tile`` must come from
            :func:`make_tile` with ``gates=True``.
    """
    xp = ring.xp
    q_len, k_len = xp.shape(q)[2], xp.shape(k)[2]
    k_slot = local_slots(ring, order, k_len)
    gates = None
    if log_gates is not None:
        if q_len != k_len:
            raise InvalidArgumentError(DECODE_GATES)
        gates = RingGates(ring, order, *log_gates)
    if q_len != k_len:  # decoding: replicated queries, bottom-right of the whole cache
        q_slot = xp.arange(q_len) + conventions.default_q_offset(q_len, k_len * ring.n)
        q_bias, k_bias = q_slot, k_slot
        if q_pos is not None:
            q_bias, k_bias = q_pos, k_pos
        elif key_mask is not None:
            k_bias = mask_positions(ring, key_mask, order)
            q_bias = query_positions(ring, key_mask, k_slot, q_slot)
        part = tile(q, k, v, q_slot, k_slot, causal, (None, None, key_mask), q_bias, k_bias)
        return _merge_over_ring(ring, part)
    if q_pos is None and segment_ids is None and key_mask is None:
        return _layout_ring(
            ring, tile, q, k, v, causal=causal, order=order, compute=compute, gates=gates
        )
    q_slot = k_slot
    if q_pos is not None:
        q_bias, k_bias = q_pos, k_pos
    else:
        q_bias = k_bias = k_slot if key_mask is None else mask_positions(ring, key_mask, order)
    return _explicit_ring(
        ring,
        tile,
        q,
        k,
        v,
        causal,
        compute,
        q_slot,
        k_slot,
        q_bias,
        k_bias,
        segment_ids,
        key_mask,
        gates,
        order,
    )


#: the error for forget gates against a sequence-sharded KV cache
DECODE_GATES = (
    "log_gates= with fewer queries than keys (decoding against a sequence-sharded KV cache) "
    "is not supported by the sharded paths: decode with posbias attention on the gathered "
    "cache, or pass queries and keys of the same length."
)


def check_segment_bias(bias: Any, segment_ids: Any, q_pos: Any) -> None:
    """Sharded packed sequences: bias positions restart per segment only up to a shift.

    On one device, positions restart at 0 in every segment. The ring places
    each key by its (global, padding-aware) position instead: the same bias up
    to a per-segment shift, which a Toeplitz bias (``d = j - i`` only) does not
    see. Other biases need the per-document positions explicitly.
    """
    if segment_ids is not None and q_pos is None and bias is not None and not bias.toeplitz:
        name = bias.spec.name if bias.spec is not None else "a callable bias"
        raise InvalidArgumentError(
            f"segment_ids with {name} (not a function of j - i alone) needs the per-document "
            "positions: pass q_pos/k_pos (positions restarting at 0 in every document), "
            "so that every shard places the bias as one device would."
        )


def _merge_over_ring(ring: Ring, part: Any) -> Any:
    """Merge every device's partial result of the same queries (decoding)."""
    out, lse = part
    if ring.n == 1:
        return out
    xp = ring.xp
    top = ring.top(lse)  # a shift: the result does not depend on it
    weight = xp.exp(lse - top)
    total = ring.sum(weight)  # >= 1 on every row
    return ring.sum(out * weight[..., None]) / total[..., None]


def _explicit_ring(
    ring,
    tile,
    q,
    k,
    v,
    causal,
    compute,
    q_slot,
    k_slot,
    q_bias,
    k_bias,
    q_seg,
    k_real,
    gates=None,
    order="contiguous",
):
    """Every tile computed and masked; keys travel with their slots, positions and masks."""
    xp = ring.xp
    batch, heads, length, dim = xp.shape(q)
    acc = _partial.empty(xp, batch, heads, length, dim, compute)
    gate_keys = () if gates is None else gates.keys
    keys = (k, v, k_slot, k_bias, q_seg, k_real, *gate_keys)
    for step in range(ring.n):
        k, v, k_slot, k_bias, k_seg, k_real = keys[:6]
        gate = None
        if gates is not None:
            k_ids = layouts.chunk_ids(order, ring.n, (ring.me - step) % ring.n)
            gate = gates.pieces(keys[6:], k_ids, step == 0, causal)
        masks = (q_seg, k_seg, k_real)
        part = tile(q, k, v, q_slot, k_slot, causal, masks, q_bias, k_bias, gate=gate)
        acc = _partial.merge(xp, acc, part)
        if step < ring.n - 1:
            keys = ring.shift(keys)
    totals = () if gates is None else gates.totals
    return ring.keep(acc[0], (*keys[:2], *keys[6:], *totals))


def _layout_ring(ring: Ring, tile, q, k, v, *, causal: bool, order: str, compute: str, gates=None):
    """Ring over key blocks of a contiguous/zigzag layout, skipping hidden chunk pairs."""
    xp = ring.xp
    n, per = ring.n, layouts.chunks_per_device(order)
    batch, heads, length, dim = xp.shape(q)
    size = length // per
    q_ids = layouts.chunk_ids(order, n, ring.me)
    rows = [q[:, :, a * size : (a + 1) * size] for a in range(per)]
    acc = [_partial.empty(xp, batch, heads, size, dim, compute)] * per

    def slots(chunk):
        return xp.arange(size) + chunk * size

    gate_keys = () if gates is None else gates.keys
    for step in range(n):
        k_ids = layouts.chunk_ids(order, n, (ring.me - step) % n)
        for a in range(per):
            for b in range(per):
                kb, vb = k[:, :, b * size : (b + 1) * size], v[:, :, b * size : (b + 1) * size]
                gate = None
                if gates is not None:
                    gate = [[gates.piece(a, b, gate_keys, k_ids[b], step == 0, causal)]]

                def add(
                    acc_a, diagonal, qa=rows[a], kb=kb, vb=vb, qc=q_ids[a], kc=k_ids[b], gate=gate
                ):
                    part = tile(qa, kb, vb, slots(qc), slots(kc), diagonal, gate=gate)
                    return _partial.merge(xp, acc_a, part)

                if not causal:
                    which = layouts.FULL
                elif step == 0:  # own chunks, in increasing order: a static relation
                    which = layouts.relation(a, b)
                else:
                    which = layouts.relation(q_ids[a], k_ids[b], None if ring.static else xp)
                branches = [
                    lambda acc_a, add=add: add(acc_a, False),
                    lambda acc_a, add=add: add(acc_a, True),
                    lambda acc_a: acc_a,
                ]
                acc[a] = ring.switch(which, branches, acc[a])
        if step < n - 1:
            k, v, *gate_keys = ring.shift((k, v, *gate_keys))
    out = xp.concat([out for out, _ in acc], 2)
    totals = () if gates is None else gates.totals
    return ring.keep(out, (k, v, *gate_keys, *totals))
