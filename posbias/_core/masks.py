"""Keras-style masks, read once into posbias's ``key_mask`` and query rows.

Keras' ``MultiHeadAttention`` combines up to five masks into one ``(B, Lq, Lk)``
boolean matrix: the propagated masks of the query ``(B, Lq)``, the value and
the key ``(B, Lk)`` (``Embedding(mask_zero=True)``, ``Masking``), an explicit
``attention_mask`` ``(B, Lq, Lk)`` and the causal mask. posbias never builds
that matrix; it takes

* ``key_mask`` ``(B, Lk)``: True for a real key (Keras' polarity), which also
  sets the bias positions ``cumsum(key_mask) - 1`` (a padded sequence gets the
  bias of the unpadded one);
* query rows ``(B, Lq)``: a masked query attends to nothing and outputs 0
  (posbias's rule for a row that sees no key; Keras would average all values);
* ``causal``.

So a combined mask must be *expressible* as ``rows ⊗ keys`` (∧ causal). The
propagated masks always are. An explicit ``attention_mask`` is read as its
rows (a query is real if it may see any key) and its keys (a key is real if
any query may see it) and then checked: a mask that is not a padding pattern
(a block-diagonal, sliding-window or — without ``use_causal_mask=True`` — a
causal matrix) would silently mean something else, so eagerly it raises
:class:`~posbias.errors.InvalidArgumentError`. While tracing (``jax.jit``,
``tf.function``, ``torch.compile``) values cannot raise: the sequences whose
mask is not expressible are reported in :attr:`ReadMasks.expressible`, and
the layer turns their outputs into NaN — loud, never silently different.

Masks may be boolean or integer (nonzero = attend), as Keras casts them;
floating masks are refused: an additive mask (0 = attend, -inf = hide) cast
to bool would mean the opposite.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import InvalidArgumentError, InvalidTypeError
from . import conventions
from .problem import native


class ReadMasks(NamedTuple):
    """What the masks of one attention call mean.

    Attributes:
        key_mask: ``(B, Lk)`` bool, True for a real key, or None (all real).
        rows: ``(B, Lq)`` bool, True for a query that attends, or None (all).
        expressible: ``(B,)`` bool while tracing when an ``attention_mask`` was
            given (False: that sequence's mask is not a padding pattern), else None.
    """

    key_mask: Any
    rows: Any
    expressible: Any


def boolean(xp, name: str, mask: Any, shapes: tuple[tuple[int, ...], ...]) -> Any:
    """``mask`` as a bool tensor of ``xp`` with one of ``shapes`` (integers: nonzero = True)."""
    mask = native(xp, name, mask)
    dtype = xp.dtype_name(mask.dtype) or str(mask.dtype)
    if dtype != "bool":
        if not xp.is_integer(mask):
            raise InvalidTypeError(
                f"{name} must be boolean (True = attend / a real token) or integer 0/1, got "
                f"dtype {dtype}; a floating mask may be additive (0 = attend, -inf = hide), "
                "which means the opposite: convert it to bool first."
            )
        mask = mask != 0
    shape = xp.shape(mask)
    if shape not in shapes:
        raise InvalidArgumentError(
            f"{name} must have shape {' or '.join(map(str, shapes))}, got {shape}."
        )
    return mask


def _and(a: Any, b: Any) -> Any:
    return b if a is None else (a if b is None else a & b)


def read_keras_masks(
    xp,
    batch: int,
    q_len: int,
    k_len: int,
    *,
    query_mask: Any = None,
    value_mask: Any = None,
    key_mask: Any = None,
    attention_mask: Any = None,
    causal: bool = False,
) -> ReadMasks:
    """Read Keras' masks of one call (see the module docstring).

    Args:
        xp: the backend of the call's tensors.
        batch, q_len, k_len: ``B``, ``Lq``, ``Lk``.
        query_mask: ``(B, Lq)``; value_mask, key_mask: ``(B, Lk)``; True = real token.
        attention_mask: ``(B, Lq, Lk)``, ``(1, Lq, Lk)`` or ``(Lq, Lk)``, True = may attend.
        causal: the call's causal flag (``use_causal_mask``), part of the combined mask.

    Returns:
        :class:`ReadMasks`.

    Raises:
        InvalidTypeError: a floating or non-numeric mask.
        InvalidArgumentError: a mask of the wrong shape; eagerly, an
            ``attention_mask`` that is not ``rows ⊗ keys`` (∧ causal).
    """
    rows = None
    if query_mask is not None:
        rows = boolean(xp, "query_mask", query_mask, ((batch, q_len),))
    keys = None
    for name, mask in (("value_mask", value_mask), ("key_mask", key_mask)):
        if mask is not None:
            keys = _and(keys, boolean(xp, name, mask, ((batch, k_len),)))
    if attention_mask is None:
        return ReadMasks(keys, rows, None)

    shapes = ((batch, q_len, k_len), (1, q_len, k_len), (q_len, k_len))
    full = boolean(xp, "attention_mask", attention_mask, shapes)
    if len(xp.shape(full)) == 2:
        full = full[None]
    every_row = xp.zeros((batch, q_len), "int32") == 0  # all True
    every_key = xp.zeros((batch, k_len), "int32") == 0
    full = full & _and(every_row, rows)[:, :, None] & _and(every_key, keys)[:, None, :]
    order = None
    if causal:
        q_slot = xp.arange(q_len) + conventions.default_q_offset(q_len, k_len)
        order = conventions.causal_visible(q_slot, xp.arange(k_len))[None]
        full = full & order
    rows, keys = xp.any(full, -1), xp.any(full, -2)  # (B, Lq), (B, Lk)
    rebuilt = rows[:, :, None] & keys[:, None, :]
    if order is not None:
        rebuilt = rebuilt & order
    differs = xp.any(xp.any(rebuilt != full, -1), -1)  # (B,)
    if xp.is_concrete(differs):
        bad = [int(b) for b in xp.to_numpy(differs).nonzero()[0]]
        if bad:
            hint = "" if causal else " If it is a causal mask, pass use_causal_mask=True instead."
            raise InvalidArgumentError(
                f"attention_mask of sequence{'s' * (len(bad) > 1)} {bad} is not a padding "
                "pattern: posbias reads it as query rows ⊗ real keys"
                f"{' ∧ causal' if causal else ''} (a key is real if any query may see it, and "
                "its bias position counts the real keys before it), and this mask hides keys "
                f"per query.{hint} Arbitrary (Lq, Lk) masks are not supported yet; express "
                "padding with Keras masks or a (B, Lk) mask."
            )
        return ReadMasks(keys, rows, None)
    return ReadMasks(keys, rows, ~differs)
