"""Attention *with* its probabilities: the exact path that materialises them.

Keras' ``return_attention_scores=True`` and Hugging Face's
``output_attentions=True`` ask for the ``(B, H, Lq, Lk)`` attention
probabilities, which the blockwise kernels never hold. This path computes them
by the textbook formula, with the same problem reading
(:func:`posbias._core.problem.prepare`: alignment, causality, padding, bias
positions) and the same softmax rule (:func:`posbias._core.partial.probabilities`:
a query that sees no key has probabilities 0 and outputs 0) as every other
path, so its outputs equal theirs to float rounding. It needs
``O(B·H·Lq·Lk)`` memory: use it only when the probabilities are wanted.

    >>> import numpy as np
    >>> from posbias._core.weights import attend_with_weights
    >>> from posbias.backends.numpy import NumpyBackend
    >>> q = k = v = np.ones((1, 2, 3, 4))
    >>> out, probs = attend_with_weights(NumpyBackend(), q, k, v, "alibi", causal=True)
    >>> out.shape, probs.shape
    ((1, 2, 3, 4), (1, 2, 3, 3))
    >>> probs[0, 0].round(3).tolist()   # causal rows sum to 1 over the visible keys
    [[1.0, 0.0, 0.0], [0.484, 0.516, 0.0], [0.313, 0.333, 0.354]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import einops

from . import partial
from .problem import LAYOUTS, prepare


def attend_with_weights(
    xp,
    q: Any,
    k: Any,
    v: Any,
    bias: Any = None,
    *,
    out_dtype: str | None = None,
    dropout: Callable[[Any], Any] | None = None,
    **options: Any,
) -> tuple[Any, Any]:
    """Attention and its probabilities; ``options`` are :func:`~posbias._core.problem.prepare`'s.

    ``out = softmax(q·kᵀ·scale + bias + mask)·v`` and ``probs = softmax(...)``.
    With ``dropout`` (attention dropout, training only), ``probs =
    dropout(softmax(...))`` — the framework's own inverted dropout (zeroes
    each probability with the layer's rate and scales the others by
    ``1 / (1 - rate)``, so ``E[probs]`` is the softmax) with the framework's
    RNG — and ``out = probs·v``: the weights returned are those applied.

    Args:
        xp: the backend of ``q``, ``k``, ``v``.
        q, k, v: as for :func:`posbias._core.dispatch.attend` (``layout=`` option).
        bias: any ``bias=`` form (:func:`posbias._core.bias_arg.read_bias`).
        out_dtype: dtype of both results (default: the queries' dtype).
        dropout: ``dropout(probs)`` → dropped and rescaled probabilities (same
            shape, ``p.compute``), or None for none.

    Returns:
        ``(out, probs)``: ``out`` in ``q``'s layout; ``probs`` ``(B, H, Lq, Lk)``.
        Rows of queries that see no key are 0 in both.

    Raises:
        The errors of :func:`~posbias._core.problem.prepare` for bad arguments.
    """
    p = prepare(xp, q, k, v, bias, **options)
    dtype = out_dtype or p.in_dtype
    if p.q_len == 0 or p.k_len == 0:
        out = xp.zeros((p.batch, p.heads, p.q_len, xp.shape(p.v)[-1]), dtype)
        probs = xp.zeros((p.batch, p.heads, p.q_len, p.k_len), dtype)
    else:
        qc, kc, vc = (xp.cast(t, p.compute) for t in (p.q, p.k, p.v))
        scores = xp.einsum("bhqd,bhkd->bhqk", qc, kc) * p.scale
        tile = p.bias_tile(0, p.q_len, p.k_len)
        if tile is not None:
            scores = scores + tile
        scores, visible = p.masked_scores(scores, 0, p.q_len, p.k_len)
        probs, _ = partial.probabilities(xp, scores, visible, p.compute)
        if dropout is not None:
            probs = dropout(probs)
        out = xp.einsum("bhqk,bhkd->bhqd", probs, vc)
        out, probs = xp.cast(out, dtype), xp.cast(probs, dtype)
    layout = options.get("layout", "bhld")
    if layout != "bhld":
        out = einops.rearrange(out, f"b h l d -> {LAYOUTS[layout]}")
    return out, probs
