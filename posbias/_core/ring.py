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
"""

from __future__ import annotations

from typing import Any

import einops
import numpy as np

from ..errors import InvalidArgumentError
from . import backward as _backward
from . import conventions, layouts
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
):
    """``tile(q, k, v, q_slot, k_slot, causal, masks=(q_seg, k_seg, k_real), q_pos, k_pos)``.

    One tile ``(out, lse)`` of :func:`posbias._core.partial.tile`. With
    ``own_backward`` and ``bias`` (the read ``bias=``, or None for no bias) on a
    framework with automatic differentiation, a tile is one block of
    :mod:`posbias._core.backward`: its
    backward pass recomputes the tile's probabilities from ``(out, lse)`` and
    reduces ``dS`` for the bias parameters, like single-device attention.
    Otherwise (a plain callable or a 2-D bias, a bias chosen per device by a
    traced head index, ``checkpoint_tiles=False``) the framework's autodiff goes
    through the tile, checkpointed by the ring's framework.
    """

    def fn(q, k, v, q_slot, k_slot, visible, q_pos, k_pos, causal):
        return _partial.tile(
            xp,
            q,
            k,
            v,
            scale=scale,
            bias_fn=bias_fn,
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
        and xp.autodiff
        and getattr(ring, "checkpoint_tiles", True)
        and (bias is None or (bias.spec is not None and not bias.points))
    )

    def tile(q, k, v, q_slot, k_slot, causal, masks=(None, None, None), q_pos=None, k_pos=None):
        if own:
            return _own_tile(xp, q, k, v, q_slot, k_slot, causal, masks, q_pos, k_pos)
        run = causal_fn if causal else plain_fn
        visible = _partial.key_visibility(*masks)
        return run(q, k, v, q_slot, k_slot, visible, q_pos, k_pos)

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
    """
    xp = ring.xp
    q_len, k_len = xp.shape(q)[2], xp.shape(k)[2]
    k_slot = local_slots(ring, order, k_len)
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
        return _layout_ring(ring, tile, q, k, v, causal=causal, order=order, compute=compute)
    q_slot = k_slot
    if q_pos is not None:
        q_bias, k_bias = q_pos, k_pos
    else:
        q_bias = k_bias = k_slot if key_mask is None else mask_positions(ring, key_mask, order)
    return _explicit_ring(
        ring, tile, q, k, v, causal, compute, q_slot, k_slot, q_bias, k_bias, segment_ids, key_mask
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
    ring, tile, q, k, v, causal, compute, q_slot, k_slot, q_bias, k_bias, q_seg, k_real
):
    """Every tile computed and masked; keys travel with their slots, positions and masks."""
    xp = ring.xp
    batch, heads, length, dim = xp.shape(q)
    acc = _partial.empty(xp, batch, heads, length, dim, compute)
    keys = (k, v, k_slot, k_bias, q_seg, k_real)
    for step in range(ring.n):
        k, v, k_slot, k_bias, k_seg, k_real = keys
        part = tile(q, k, v, q_slot, k_slot, causal, (q_seg, k_seg, k_real), q_bias, k_bias)
        acc = _partial.merge(xp, acc, part)
        if step < ring.n - 1:
            keys = ring.shift(keys)
    return ring.keep(acc[0], keys[:2])


def _layout_ring(ring: Ring, tile, q, k, v, *, causal: bool, order: str, compute: str):
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

    for step in range(n):
        k_ids = layouts.chunk_ids(order, n, (ring.me - step) % n)
        for a in range(per):
            for b in range(per):
                kb, vb = k[:, :, b * size : (b + 1) * size], v[:, :, b * size : (b + 1) * size]

                def add(acc_a, diagonal, qa=rows[a], kb=kb, vb=vb, qc=q_ids[a], kc=k_ids[b]):
                    part = tile(qa, kb, vb, slots(qc), slots(kc), diagonal)
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
            k, v = ring.shift((k, v))
    out = xp.concat([out for out, _ in acc], 2)
    return ring.keep(out, (k, v))
