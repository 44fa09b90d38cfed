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

import dataclasses
from typing import Any, NamedTuple

import einops
import numpy as np

from .. import backends as _backends
from ..errors import InvalidArgumentError, InvalidTypeError
from ..registry import get
from ..spec import BiasSpec
from .bias_arg import resolve_bias, spec_of

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
    """``values[b, slots[b, r]]`` for ``values`` ``(B, Lk)`` (0 outside ``[0, Lk)``)."""
    k_len = xp.shape(values)[-1]
    slots = xp.as_int(values[:, :1] * 0) + slots  # (B, Lq)
    inside = (slots >= 0) & (slots < k_len)
    index = xp.minimum(xp.maximum(slots, 0), k_len - 1)
    return xp.where(inside, xp.gather_last(values, index), 0)


@dataclasses.dataclass
class Problem:
    """One attention call, normalised: ``(B, H, L, D)`` tensors and per-row/per-key data.

    Everything a kernel needs to compute any block of query rows ``[r0, r1)``
    without building anything of size ``Lq × Lk``: the key extent a block can
    see, its visibility mask and its bias tile. ``k``/``v`` already have ``H``
    heads (grouped-query heads repeated).
    """

    xp: Any
    q: Any
    k: Any
    v: Any
    batch: int
    heads: int
    q_len: int
    k_len: int
    scale: float
    compute: str
    in_dtype: str
    causal: bool
    q_offset: Any  # int, or a (B,) tensor
    q_slot: Any
    k_slot: Any
    real: Any  # (B, Lk) bool or None
    q_segment: Any
    segment_ids: Any
    bias_fn: Any
    spec: BiasSpec | None  # the bias's spec when it has one
    q_pos: Any
    k_pos: Any
    slot_positions: bool  # bias positions are the slots themselves (Toeplitz-friendly)
    points: bool  # explicit (row, col) positions of a 2-D bias: rows along axis -2

    def _rows(self, pos: Any, r0: int, r1: int) -> Any:
        if self.points:
            return pos[..., r0:r1, :]
        return pos[..., r0:r1]

    def extent(self, r0: int, r1: int) -> int:
        """Keys ``[0, K)`` that rows ``[r0, r1)`` may see (causal with a static offset)."""
        if self.causal and isinstance(self.q_offset, int):
            return max(0, min(self.k_len, self.q_offset + r1))
        return self.k_len

    def visible(self, r0: int, r1: int, extent: int) -> Any:
        """``(B|1, n, K)`` bool of visible keys, or None when every key is visible."""
        xp, k_slot = self.xp, self.k_slot[:extent]
        q_slot = self.q_slot[..., r0:r1]
        visible = None
        if self.causal:
            visible = k_slot <= q_slot[..., :, None]
            if len(xp.shape(visible)) == 2:
                visible = visible[None]
        if self.real is not None:
            real = self.real[:, None, :extent]
            visible = real if visible is None else visible & real
        if self.segment_ids is not None:
            same = self.q_segment[:, r0:r1, None] == self.segment_ids[:, None, :extent]
            visible = same if visible is None else visible & same
        return visible

    def bias_tile(self, r0: int, r1: int, extent: int) -> Any:
        """The bias of rows ``[r0, r1)`` and keys ``[0, K)``, or None without a bias."""
        if self.bias_fn is None:
            return None
        return self.bias_fn(
            q_pos=self._rows(self.q_pos, r0, r1),
            k_pos=self._rows(self.k_pos, 0, extent),
            dtype=self.compute,
        )


def prepare(
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
) -> Problem:
    """Check the inputs and derive slots, masks and bias positions (no ``Lq × Lk`` work)."""
    batch, heads, kv_heads, q_len, k_len = _check_qkv(xp, q, k, v, layout)
    if isinstance(bias, str):
        bias = get(bias, num_heads=heads)
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
    if layout != "bhld":
        q, k, v = (einops.rearrange(t, f"{LAYOUTS[layout]} -> b h l d") for t in (q, k, v))
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
        q_offset = xp.as_int(q_offset)
        q_slot = q_offset[..., None] + xp.arange(q_len)

    real = q_segment = None
    if key_padding_mask is not None:
        real = _check_mask(xp, "key_padding_mask", key_padding_mask, batch, k_len, boolean=True)
    if segment_ids is not None:
        segment_ids = _check_mask(xp, "segment_ids", segment_ids, batch, k_len, boolean=False)
        q_segment = _select(xp, segment_ids, q_slot, k_slot)

    slot_positions = q_pos is None and real is None and segment_ids is None
    explicit = q_pos is not None
    spec = spec_of(bias, heads)
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
    elif q_pos is not None:
        q_pos, k_pos = (
            xp.from_numpy(np.asarray(x)) if _backends.detect(x) in (None, "numpy") else x
            for x in (q_pos, k_pos)
        )

    return Problem(
        xp=xp,
        q=q,
        k=k,
        v=v,
        batch=batch,
        heads=heads,
        q_len=q_len,
        k_len=k_len,
        scale=float(xp.shape(q)[-1]) ** -0.5 if scale is None else float(scale),
        compute=compute,
        in_dtype=in_dtype,
        causal=causal,
        q_offset=q_offset,
        q_slot=q_slot,
        k_slot=k_slot,
        real=real,
        q_segment=q_segment,
        segment_ids=segment_ids,
        bias_fn=bias_fn,
        spec=spec,
        q_pos=q_pos,
        k_pos=k_pos,
        slot_positions=slot_positions,
        points=explicit and spec is not None and spec.position_dims == 2,
    )
