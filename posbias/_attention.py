"""Framework-free attention with an additive positional bias.

One implementation, written against the backend op vocabulary and einops,
serves :func:`posbias.numpy.attention` (float64 reference), the PyTorch, JAX
and TensorFlow ``attention`` functions and the ``MultiHeadAttention`` layers:

    out = softmax(q·kᵀ·scale + bias[h, i, j] + mask) · v

Internally the layout is ``(B, H, L, D)``; JAX and TensorFlow callers use
``(B, L, H, D)`` and are rearranged with einops. Scores, the bias and the
softmax statistics are float32 (float64 for float64 inputs); the output has
the input dtype. Grouped-query attention repeats K/V heads with einops; the
bias is per query head.

Masks and positions, in *slot* coordinates (index along the key axis):

* query ``r`` sits in slot ``q_offset + r`` (default ``Lk - Lq``: bottom-right);
* ``causal``: key slot ``j`` is visible to query slot ``i`` iff ``j <= i``;
* ``key_padding_mask`` ``(B, Lk)``, True for real tokens, hides padded keys;
* ``segment_ids`` ``(B, Lk)``: queries see keys of their own segment only;
* bias positions default to the slots; with a padding mask they are
  ``cumsum(mask) - 1`` and with segments they restart at 0 in every segment,
  so padded or packed sequences get exactly the bias of the unpadded one.
* A query row with no visible key outputs zeros (never NaN).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import einops
import numpy as np

from . import backends as _backends
from .errors import InvalidArgumentError, InvalidTypeError
from .registry import get
from .spec import BiasSpec

LAYOUTS = {"bhld": "b h l d", "blhd": "b l h d"}


class KVCache(NamedTuple):
    """Decoding state of one attention layer (native tensors of one framework).

    Attributes:
        k, v: ``(B, H_kv, capacity, D)`` cached keys and values.
        valid: ``(B, capacity)`` bool, True for slots holding a real token.
        length: ``(B,)`` int, slots filled so far per sequence.
    """

    k: Any
    v: Any
    valid: Any
    length: Any


def resolve_bias(bias: Any, num_heads: int) -> Any:
    """A callable ``(q_pos=, k_pos=, dtype=) -> tensor`` or None."""
    if bias is None:
        return None
    if isinstance(bias, str):
        bias = get(bias, num_heads=num_heads)
    if isinstance(bias, BiasSpec):
        if bias.num_heads != num_heads:
            raise InvalidArgumentError(
                f"the bias has num_heads={bias.num_heads} but the queries have {num_heads} "
                "heads; the bias is per query head (also under grouped-query attention)."
            )
        return bias.bias
    if callable(bias):
        return bias
    raise InvalidTypeError(
        f"bias must be a registered name, a BiasSpec, a PositionalBias module or None, "
        f"got {type(bias).__name__}."
    )


def _shape4(xp, name: str, x: Any) -> tuple[int, ...]:
    shape = xp.shape(x)
    if len(shape) != 4:
        raise InvalidArgumentError(f"{name} must be 4-D, got shape {shape}.")
    return shape


def _check_qkv(xp, q, k, v, layout: str) -> tuple[int, int, int, int, int]:
    qs, ks, vs = _shape4(xp, "q", q), _shape4(xp, "k", k), _shape4(xp, "v", v)
    names = "(B, H, L, D)" if layout == "bhld" else "(B, L, H, D)"
    if layout == "blhd":
        qs, ks, vs = ((s[0], s[2], s[1], s[3]) for s in (qs, ks, vs))
    if not (qs[0] == ks[0] == vs[0]):
        raise InvalidArgumentError(
            f"q, k, v disagree on the batch size: {qs[0]}, {ks[0]}, {vs[0]}."
        )
    if ks[:3] != vs[:3]:
        raise InvalidArgumentError(
            f"k and v must have the same batch, heads and length {names}; got {ks} and {vs}."
        )
    if qs[3] != ks[3]:
        raise InvalidArgumentError(f"q and k head dims differ: {qs[3]} vs {ks[3]}.")
    if ks[1] == 0 or qs[1] % ks[1]:
        raise InvalidArgumentError(
            f"grouped-query attention needs the query heads ({qs[1]}) to be a multiple of "
            f"the key/value heads ({ks[1]})."
        )
    return qs[0], qs[1], ks[1], qs[2], ks[2]


def _check_mask(xp, name: str, mask: Any, batch: int, length: int, *, boolean: bool) -> Any:
    if _backends.detect(mask) in (None, "numpy") and xp.name != "numpy":
        mask = xp.from_numpy(np.asarray(mask))
    shape = xp.shape(mask)
    if shape != (batch, length):
        raise InvalidArgumentError(
            f"{name} must have shape (B, Lk) = ({batch}, {length}), got {shape}."
        )
    dtype = xp.dtype_name(mask.dtype) or str(mask.dtype)
    if boolean and dtype != "bool":
        raise InvalidTypeError(
            f"{name} must be boolean (True for real tokens), got dtype {dtype}; "
            "convert with mask.bool() / mask.astype(bool)."
        )
    if not boolean and not xp.is_integer(mask):
        raise InvalidTypeError(f"{name} must hold integers, got dtype {dtype}.")
    return mask


def _select(xp, values: Any, slots: Any, k_slot: Any) -> Any:
    """``values[b, slots[b, r]]`` for ``values`` ``(B, Lk)``, by a one-hot sum (jit-safe)."""
    hit = k_slot == slots[..., :, None]
    return xp.sum(xp.where(hit, values[..., None, :], 0), -1)


def attend(
    xp,
    q: Any,
    k: Any,
    v: Any,
    bias: Any = None,
    *,
    layout: str = "bhld",
    causal: bool = False,
    q_offset: Any = None,
    key_padding_mask: Any = None,
    segment_ids: Any = None,
    scale: float | None = None,
    q_pos: Any = None,
    k_pos: Any = None,
    compute_dtype: str | None = None,
) -> Any:
    """Attention with an additive bias; see the module docstring for the rules."""
    batch, heads, kv_heads, q_len, k_len = _check_qkv(xp, q, k, v, layout)
    bias_fn = resolve_bias(bias, heads)
    in_dtype = xp.dtype_name(q.dtype)
    compute = compute_dtype or ("float64" if in_dtype == "float64" else "float32")
    if causal and q_offset is None and q_len > k_len:
        raise InvalidArgumentError(
            f"causal=True with a query longer than the keys ({q_len} > {k_len}): the first "
            "queries would see no key. Pass q_offset= to place the queries explicitly."
        )
    if (q_pos is None) != (k_pos is None):
        raise InvalidArgumentError("give both q_pos and k_pos, or neither.")
    pattern = LAYOUTS[layout]
    if layout != "bhld":
        q, k, v = (einops.rearrange(t, f"{pattern} -> b h l d") for t in (q, k, v))
    if kv_heads != heads:
        k, v = (einops.repeat(t, "b h l d -> b (h g) l d", g=heads // kv_heads) for t in (k, v))

    k_slot = xp.arange(k_len)
    if q_offset is None:
        q_offset = k_len - q_len
    elif not isinstance(q_offset, int) and _backends.detect(q_offset) in (None, "numpy"):
        q_offset = xp.from_numpy(np.asarray(q_offset, dtype=np.int64))
    if isinstance(q_offset, int):
        q_slot = xp.arange(q_len) + q_offset
    else:
        q_slot = xp.as_int(q_offset)[..., None] + xp.arange(q_len)

    visible = None
    if causal:
        visible = k_slot <= q_slot[..., :, None]
    real = None
    if key_padding_mask is not None:
        real = _check_mask(xp, "key_padding_mask", key_padding_mask, batch, k_len, boolean=True)
        visible = real[:, None, :] if visible is None else visible & real[:, None, :]
    if segment_ids is not None:
        segment_ids = _check_mask(xp, "segment_ids", segment_ids, batch, k_len, boolean=False)
        q_segment = _select(xp, segment_ids, q_slot, k_slot)
        same = q_segment[..., :, None] == segment_ids[:, None, :]
        visible = same if visible is None else visible & same

    if bias_fn is not None and q_pos is None:
        if segment_ids is not None:
            earlier = (k_slot <= k_slot[:, None]) & (
                segment_ids[:, :, None] == segment_ids[:, None, :]
            )
            if real is not None:
                earlier = earlier & real[:, None, :]
            k_pos = xp.sum(xp.as_int(earlier), -1) - 1
        elif real is not None:
            k_pos = xp.cumsum(xp.as_int(real), -1) - 1
        if k_pos is None:
            q_pos, k_pos = q_slot, k_slot
        else:
            q_pos = _select(xp, k_pos, q_slot, k_slot)

    scores = xp.einsum("bhqd,bhkd->bhqk", xp.cast(q, compute), xp.cast(k, compute))
    scale = float(xp.shape(q)[-1]) ** -0.5 if scale is None else float(scale)
    scores = scores * scale
    if bias_fn is not None:
        scores = scores + bias_fn(q_pos=q_pos, k_pos=k_pos, dtype=compute)
    if visible is not None:
        visible = visible[..., None, :, :]  # one mask for every head
        scores = xp.where(visible, scores, xp.finfo_min(compute))
    shifted = xp.exp(scores - xp.amax(scores, -1, keepdims=True))
    if visible is not None:
        shifted = xp.where(visible, shifted, 0.0)
    denom = xp.sum_keepdims(shifted, -1)
    probs = shifted / xp.maximum(denom, xp.finfo_tiny(compute))  # rows with no key: 0
    out = xp.einsum("bhqk,bhkd->bhqd", probs, xp.cast(v, compute))
    if layout != "bhld":
        out = einops.rearrange(out, f"b h l d -> {pattern}")
    return xp.cast(out, in_dtype)


def functional(backend: str, layout: str):
    """Build a framework's ``attention(q, k, v, bias=None, *, ...)`` function."""

    def attention(
        q: Any,
        k: Any,
        v: Any,
        bias: Any = None,
        *,
        causal: bool = False,
        q_offset: Any = None,
        key_padding_mask: Any = None,
        segment_ids: Any = None,
        scale: float | None = None,
        q_pos: Any = None,
        k_pos: Any = None,
    ) -> Any:
        xp = _backends.load(backend)(_device_of(backend, q))
        return attend(
            xp,
            _native(xp, q),
            _native(xp, k),
            _native(xp, v),
            bias,
            layout=layout,
            causal=causal,
            q_offset=q_offset,
            key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
            scale=scale,
            q_pos=q_pos,
            k_pos=k_pos,
        )

    return attention


def _device_of(backend: str, x: Any) -> Any:
    if _backends.detect(x) == backend:
        return _backends.load(backend)().device_of(x)
    return None


def _native(xp, x: Any) -> Any:
    kind = _backends.detect(x)
    if kind == xp.name:
        return x
    if kind in (None, "numpy"):
        return xp.from_numpy(np.asarray(x))
    raise InvalidTypeError(
        f"posbias.{xp.name}.attention got a {kind} tensor; pass {xp.name} tensors "
        f"(or use posbias.{kind}.attention)."
    )
