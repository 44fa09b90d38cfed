"""Partial attention: one tile's output *and* log-sum-exp, and the exact merge of tiles.

Sequence-parallel (ring) attention splits the keys across devices. Each device
computes, for its queries and one block of keys,

    out_t = softmax_t(s) · v_t        lse_t = log Σ_j∈t exp(s_j)
    s     = q·kᵀ·scale + bias[h, i, j]     (masked keys excluded)

and two tiles over disjoint key sets merge exactly:

    lse = log(exp(lse_a) + exp(lse_b))
    out = (exp(lse_a - lse)·out_a + exp(lse_b - lse)·out_b)

so merging every key block gives the single-device softmax. The bias must be
in its relative form (``-m·|i - j|``), computed from *global* positions: a
key-only shortcut (``+m·j``) would shift each tile's ``lse`` differently.

A row that sees no key in a tile has ``out = 0`` and ``lse`` = the most
negative finite number of the compute dtype (never ``-inf``, so neither the
merge nor its gradient produces NaN): it has weight 0 in every merge with a
tile that has keys, and a row that sees no key at all still outputs 0.

Layout ``(B, H, L, D)``; positions ``(L,)`` or ``(B, L)`` integers. Written
against the backend op vocabulary, so one code path serves every framework.

    >>> import numpy as np, posbias
    >>> from posbias._core import partial
    >>> from posbias.backends.numpy import NumpyBackend
    >>> xp = NumpyBackend(compute_dtype="float64")
    >>> q, k, v = np.random.default_rng(0).normal(size=(3, 1, 2, 6, 4))
    >>> bias = posbias.get("alibi", num_heads=2).bias
    >>> pos = np.arange(6)
    >>> tile = lambda a, b: partial.tile(
    ...     xp, q, k[:, :, a:b], v[:, :, a:b], scale=0.5, bias_fn=bias,
    ...     q_slot=pos, k_slot=pos[a:b], causal=True, compute="float64")
    >>> out, _ = partial.merge(xp, tile(0, 3), tile(3, 6))
    >>> full, _ = tile(0, 6)
    >>> bool(np.allclose(out, full))
    True
"""

from __future__ import annotations

from typing import Any

import einops

from . import conventions

Partial = tuple[Any, Any]  # (out (B, H, Lq, D), lse (B, H, Lq))


def probabilities(xp, scores: Any, visible: Any, compute: str) -> tuple[Any, Any]:
    """``softmax(scores)`` over the visible keys and each row's log-sum-exp.

    The one softmax rule of every path: a row that sees no key gets
    probabilities 0 (never NaN) and ``lse`` = the lowest finite value.

    Args:
        xp: the backend.
        scores: ``(B, H, Lq, Lk)`` scaled scores plus bias, in ``compute``.
        visible: ``(B|1, 1, Lq, Lk)`` bool, or None when every key is visible.
        compute: the compute dtype name.

    Returns:
        ``(probabilities (B, H, Lq, Lk), lse (B, H, Lq))`` in ``compute``.
    """
    lowest = xp.finfo_min(compute)
    if visible is not None:
        scores = xp.where(visible, scores, lowest)
    # the shift cancels exactly (probabilities and lse do not depend on it): no gradient.
    # Differentiating the max would route it through reduce_max's rule, ct·(s == max)/count,
    # whose equality test XLA may evaluate on a recomputed copy of the scores (fused
    # differently, rounded differently): count 0 gives inf, then NaN (sharded log_gates).
    top = xp.stop_gradient(xp.amax(scores, -1, keepdims=True))
    shifted = xp.exp(scores - top)
    if visible is not None:
        shifted = xp.where(visible, shifted, 0.0)
    total = xp.sum_keepdims(shifted, -1)  # >= 1 on a row that sees a key (its max gives 1)
    # a row that sees no key has total 0: divide by 1 instead (its probabilities stay 0 and
    # its lse is top = lowest). Not max(total, tiny): 1/tiny² overflows in the backward
    # pass, and a max would split the gradient at a tie.
    denom = xp.where(total > 0, total, 1.0)
    lse = top + xp.log(denom)
    return shifted / denom, lse[..., 0]


def softmax_rows(xp, scores: Any, visible: Any, v: Any, compute: str) -> Partial:
    """``softmax(scores)·v`` over the visible keys and each row's log-sum-exp.

    Args:
        xp: the backend.
        scores: ``(B, H, Lq, Lk)`` scaled scores plus bias, in ``compute``.
        visible: ``(B|1, 1, Lq, Lk)`` bool, or None when every key is visible.
        v: ``(B, H, Lk, D)`` values in ``compute``.
        compute: the compute dtype name.
    """
    weights, lse = probabilities(xp, scores, visible, compute)
    return xp.einsum("bhqk,bhkd->bhqd", weights, v), lse


def key_visibility(q_segment: Any, k_segment: Any, k_real: Any) -> Any:
    """``(B, Lq, Lk)`` bool from segment ids and a key padding mask, or None for neither.

    ``q_segment`` ``(B, Lq)`` and ``k_segment`` ``(B, Lk)``: a query sees keys of
    its own segment; ``k_real`` ``(B, Lk)``: True for real (not padded) keys.
    """
    visible = None
    if q_segment is not None:
        visible = q_segment[:, :, None] == k_segment[:, None, :]
    if k_real is not None:
        real = k_real[:, None, :]
        visible = real if visible is None else visible & real
    return visible


def tile(
    xp,
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: float,
    bias_fn: Any,
    q_slot: Any,
    k_slot: Any,
    causal: bool,
    compute: str,
    visible: Any = None,
    kv_group: int = 1,
    q_pos: Any = None,
    k_pos: Any = None,
) -> Partial:
    """Attention of ``q`` against one key block, as ``(out, lse)`` in ``compute``.

    Args:
        xp: the backend.
        q: ``(B, H, Lq, D)`` queries.
        k: ``(B, H / kv_group, Lk, D)`` keys of this block.
        v: ``(B, H / kv_group, Lk, D)`` values of this block.
        scale: the score scale (``1/√D`` by default upstream).
        bias_fn: ``bias_fn(q_pos=, k_pos=, dtype=)`` → ``(H, Lq, Lk)`` or
            ``(B, H, Lq, Lk)``, or None for no bias.
        q_slot: ``(Lq,)`` or ``(B, Lq)`` global query slots (causal order).
        k_slot: ``(Lk,)`` or ``(B, Lk)`` global key slots.
        causal: hide keys at later slots than the query.
        compute: compute dtype name (``"float32"`` or ``"float64"``).
        visible: an extra ``(B|1, Lq, Lk)`` bool mask ANDed with the causal one.
        kv_group: query heads per key/value head (grouped-query attention): ``k``
            and ``v`` have ``H / kv_group`` heads and are repeated here, per tile,
            so that what travels between devices is the small un-repeated block.
        q_pos: bias positions of the queries (default: the slots; a padded batch
            has ``cumsum(key_mask) - 1``, see :mod:`posbias._core.conventions`).
        k_pos: bias positions of the keys (default: the slots).
    """
    if kv_group > 1:
        k, v = (einops.repeat(t, "b h l d -> b (h g) l d", g=kv_group) for t in (k, v))
    q, k, v = (xp.cast(t, compute) for t in (q, k, v))
    scores = xp.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if bias_fn is not None:
        q_pos = q_slot if q_pos is None else q_pos
        k_pos = k_slot if k_pos is None else k_pos
        scores = scores + bias_fn(q_pos=q_pos, k_pos=k_pos, dtype=compute)
    if causal:
        order = conventions.causal_visible(q_slot, k_slot)
        visible = order if visible is None else visible & order
    if visible is not None:
        if len(xp.shape(visible)) == 2:
            visible = visible[None]
        visible = visible[:, None]  # one mask for every head
    return softmax_rows(xp, scores, visible, v, compute)


def merge(xp, a: Partial, b: Partial) -> Partial:
    """Merge two tiles over disjoint key sets into the tile over their union."""
    out_a, lse_a = a
    out_b, lse_b = b
    top = xp.maximum(lse_a, lse_b)
    w_a, w_b = xp.exp(lse_a - top), xp.exp(lse_b - top)
    total = w_a + w_b  # >= 1: no division by zero
    out = (out_a * w_a[..., None] + out_b * w_b[..., None]) / total[..., None]
    return out, top + xp.log(total)


def empty(xp, batch: int, heads: int, length: int, dim: int, compute: str) -> Partial:
    """The tile of no keys: ``out = 0``, ``lse`` = the lowest finite value."""
    out = xp.zeros((batch, heads, length, dim), compute)
    return out, xp.zeros((batch, heads, length), compute) + xp.finfo_min(compute)
