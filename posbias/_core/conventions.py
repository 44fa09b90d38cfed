"""The conventions of the bias contract, each written once (docs/contract.md).

Every path — ``spec.bias``, single-device attention, the kernels, the layers,
FlexAttention hooks, sequence- and head-parallel attention — asks these
functions instead of restating the rule:

* **bottom-right alignment**: with lengths only, query ``r`` sits at slot
  ``k_offset + Lk - Lq + r`` (:func:`default_q_offset`);
* **causal visibility**: key ``j`` is visible to query ``i`` iff ``j <= i``
  (:func:`causal_visible`), i.e. iff the diagonal ``d = j - i <= 0``
  (:func:`diagonal_visible`);
* **diagonals**: a Toeplitz bias of queries ``[q0, q0 + Lq)`` and keys
  ``[k0, k0 + Lk)`` takes the values ``F(d)`` for ``d = j - i`` in
  :func:`diagonal_range`;
* **padding**: ``key_mask`` is ``(B, Lk)`` bool, True for a real key (Keras,
  Flax and Hugging Face polarity); bias positions of a padded batch are
  ``cumsum(key_mask) - 1`` (:func:`positions_from_mask`), so a left-padded
  sequence gets exactly the bias of the unpadded one;
* **scale** defaults to ``1/sqrt(D)`` (:func:`resolve_scale`), added before the
  bias: ``softmax(q·kᵀ·scale + bias + mask)``;
* **compute dtype**: float32 (float64 for float64 inputs) (:func:`compute_dtype`);
* **positions** come both or neither (:func:`both_or_neither`).

Written against plain Python and the backend op vocabulary, so it serves ints,
NumPy arrays and every framework's tensors alike.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError
from .checks import check_bool  # noqa: F401  (the strict bool reader, re-exported)


def default_q_offset(q_len: int, k_len: int, k_offset: Any = 0) -> Any:
    """Slot of the first query under bottom-right alignment: ``k_offset + Lk - Lq``.

    Example:
        >>> default_q_offset(2, 5)      # keys 0..4, queries at 3, 4
        3
    """
    return k_offset + (k_len - q_len)


def causal_visible(q_pos: Any, k_pos: Any) -> Any:
    """``(..., Lq, Lk)`` bool: key ``j`` visible to query ``i`` iff ``j <= i``.

    ``q_pos`` ``(..., Lq)`` and ``k_pos`` ``(..., Lk)`` are slots or global
    positions (integer tensors of one framework, or NumPy).
    """
    return k_pos[..., None, :] <= q_pos[..., :, None]


def diagonal_visible(d: Any) -> Any:
    """Causal visibility of a diagonal ``d = j - i``: ``d <= 0``."""
    return d <= 0


def diagonal_range(q_first: int, q_len: int, k_first: int, k_len: int) -> tuple[int, int]:
    """``(d_min, d_max)`` of ``d = j - i`` over queries ``[q_first, q_first + Lq)`` and keys
    ``[k_first, k_first + Lk)``; a Toeplitz bias of that block has ``Lq + Lk - 1`` values.

    Example:
        >>> diagonal_range(3, 2, 0, 5)   # queries 3, 4 against keys 0..4
        (-4, 1)
    """
    return k_first - (q_first + q_len - 1), k_first + k_len - 1 - q_first


def causal_extent(q_first: int, q_end: int, k_len: int) -> int:
    """Keys ``[0, K)`` that causal query slots ``[q_first, q_end)`` can see (``K <= Lk``)."""
    return max(0, min(k_len, q_end))


def positions_from_mask(xp: Any, key_mask: Any, segment_ids: Any = None) -> Any:
    """Bias positions ``(B, Lk)`` of the keys of a padded (and packed) batch.

    ``cumsum(key_mask) - 1``: each real key's index among the real keys, so
    padding never shifts the bias; a padded slot repeats its predecessor's
    position (it is hidden anyway). With ``segment_ids`` the count restarts in
    every segment (it counts the earlier keys of the same segment).
    """
    if segment_ids is None:
        return xp.cumsum(xp.as_int(key_mask), -1) - 1
    slots = xp.arange(xp.shape(segment_ids)[-1])
    earlier = causal_visible(slots, slots)[None] & (
        segment_ids[:, :, None] == segment_ids[:, None, :]
    )
    if key_mask is not None:
        earlier = earlier & key_mask[:, None, :]
    return xp.sum(xp.as_int(earlier), -1) - 1


def compute_dtype(in_dtype: str) -> str:
    """Scores, softmax and bias dtype for inputs of ``in_dtype``: float64 or float32."""
    return "float64" if in_dtype == "float64" else "float32"


def resolve_scale(scale: Any, head_dim: int) -> float:
    """The score scale: ``1/sqrt(head_dim)`` by default, else a finite positive real.

    Raises:
        InvalidTypeError: ``scale`` is not a real number (a string, a bool, a tensor).
        InvalidArgumentError: ``scale`` is NaN, infinite, zero or negative.
    """
    if scale is None:
        return float(head_dim) ** -0.5
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise InvalidTypeError(
            f"scale must be a real number (the factor of q·kᵀ), got {scale!r} of type "
            f"{type(scale).__name__}; pass e.g. scale=0.125 or leave it None for 1/sqrt(D)."
        )
    value = float(scale)
    if not math.isfinite(value) or value <= 0 or value > _FLOAT32_MAX:
        raise InvalidArgumentError(
            f"scale must be finite and > 0 (and at most {_FLOAT32_MAX:.3g}: scores are "
            f"float32), got {value}; leave it None for 1/sqrt(D)."
        )
    return value


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def both_or_neither(q_pos: Any, k_pos: Any, bias: Any = True) -> None:
    """Explicit positions come in pairs, and only with a bias (they set its positions only:
    causal visibility follows the slots on every path)."""
    if q_pos is not None and k_pos is not None and bias is None:
        raise InvalidArgumentError(
            "q_pos/k_pos set the bias positions, but bias=None: they would have no effect. "
            "Drop them, or pass the bias they are meant for (causal visibility follows the "
            "slots, not these positions)."
        )
    if (q_pos is None) != (k_pos is None):
        given = "q_pos" if q_pos is not None else "k_pos"
        raise InvalidArgumentError(
            f"{given} was given alone; give both q_pos and k_pos (explicit bias positions of "
            "queries and keys), or neither."
        )


#: what a removed keyword means now, for :func:`reject_unknown`
_RENAMED = {
    "key_padding_mask": (
        "posbias calls the padding mask key_mask: (B, Lk) bool, True for a REAL key (the "
        "Keras, Flax and Hugging Face attention_mask polarity). PyTorch's "
        "nn.MultiheadAttention key_padding_mask has the opposite meaning (True = ignore); "
        "pass key_mask=~key_padding_mask."
    ),
}


def reject_unknown(function: str, kwargs: Mapping[str, Any], known: Iterable[str]) -> None:
    """Raise a posbias error for keywords ``function`` does not take (none: return).

    A renamed keyword says what replaced it; a misspelt one gets the closest names.
    """
    if not kwargs:
        return
    name = next(iter(kwargs))
    if name in _RENAMED:
        raise InvalidTypeError(f"{function}() got key_padding_mask=: {_RENAMED[name]}")
    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise InvalidTypeError(f"{function}() got an unexpected keyword argument {name!r}.{hint}")
