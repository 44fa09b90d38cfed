"""One attention call, read and normalised: :class:`Problem` and :func:`prepare`.

One implementation, written against the backend op vocabulary and einops,
serves :func:`posbias.numpy.attention` (float64 reference), the PyTorch, JAX
and TensorFlow ``attention`` functions and the ``MultiHeadAttention`` layers:

    out = softmax(q·kᵀ·scale + bias[h, i, j] + mask) · v

Internally the layout is ``(B, H, L, D)``; JAX and TensorFlow callers use
``(B, L, H, D)`` and are rearranged with einops. Scores, the bias and the
softmax statistics are float32 (float64 for float64 inputs); the output has
the input dtype. Grouped-query attention repeats K/V heads with einops; the
bias is per query head.

Masks and positions, in *slot* coordinates (index along the key axis), by the
rules of :mod:`posbias._core.conventions`:

* query ``r`` sits in slot ``q_offset + r`` (default ``Lk - Lq``: bottom-right);
* ``causal``: key slot ``j`` is visible to query slot ``i`` iff ``j <= i``;
* ``key_mask`` ``(B, Lk)`` bool, True for a real key, hides padded keys;
* ``segment_ids`` ``(B, Lk)``: queries see keys of their own segment only;
* ``attn_mask`` broadcastable to ``(B, H, Lq, Lk)`` (every layout): bool, True
  for a pair that takes part, or floating, added to the scores (``-inf``
  entries hide the pair, exactly like False); it changes no bias position;
* bias positions default to the slots; with a key mask they are
  ``cumsum(key_mask) - 1`` and with segments they restart at 0 in every segment,
  so padded or packed sequences get exactly the bias of the unpadded one.
* ``log_gates`` ``(B, H, Lk)`` (``(B, Lk, H)`` in the ``blhd`` layout): data-
  dependent forget gates, ``Σ_{s=j+1..i} g[s]`` added to the bias of key slot
  ``j <= i`` (:mod:`posbias._core.gates`), with ``log_gates_after`` for keys
  after the query when bidirectional.
* A query row with no visible key outputs zeros (never NaN).

Every argument is read here once; every path (functions, layers, distributed)
uses this reading.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import einops
import numpy as np

from .. import backends as _backends
from .. import positions as _positions
from ..errors import InvalidArgumentError, InvalidTypeError
from . import conventions
from . import gates as _gates
from .bias_arg import BiasArg, read_bias
from .checks import check_int, is_int
from .gates import Gates

LAYOUTS = {"bhld": "b h l d", "blhd": "b l h d"}
FLOATS = ("float16", "bfloat16", "float32", "float64")


class KVCache(NamedTuple):
    """Decoding state of one attention layer (native tensors of one framework).

    Attributes:
        k, v: ``(B, H_kv, capacity, D)`` cached keys and values.
        valid: ``(B, capacity)`` bool, True for slots holding a real token.
        length: ``(B,)`` int, slots filled so far per sequence.
        overflow: ``(B,)`` bool, True once a sequence was decoded past the capacity
            (or had a negative length): that step's and every later output of the
            sequence is invalid. Eagerly this is an error; under ``jax.jit`` /
            ``nnx.jit``, ``tf.function`` or ``torch.compile`` values cannot raise,
            so check ``cache.overflow`` (docs/layers.md).
        log_gates: ``(B, H, capacity)`` float32 per-slot log-gates ``g`` of a layer
            with a forget gate (``gate=``), None otherwise. The cache keeps ``g``,
            not its cumulative sum ``G``: attention sums it chunkwise, which keeps
            float32 precision at any length (:mod:`posbias._core.gates`).
    """

    k: Any
    v: Any
    valid: Any
    length: Any
    overflow: Any = None
    log_gates: Any = None


def native(xp, name: str, x: Any) -> Any:
    """``x`` as a tensor of ``xp``'s framework (NumPy arrays and lists convert; others: error)."""
    if _backends.check_framework(xp, name, x) == xp.name:
        return x
    try:
        array = np.asarray(x)
    except ValueError as exc:  # ragged nested lists
        raise InvalidTypeError(f"{name} must be a rectangular numeric array: {exc}") from exc
    if array.dtype == object or array.dtype.kind in "USV":
        raise InvalidTypeError(
            f"{name} must be a numeric array, got {type(x).__name__} of dtype {array.dtype}."
        )
    return xp.from_numpy(array)


def _shape4(xp, name: str, x: Any) -> tuple[int, ...]:
    shape = xp.shape(x)
    if len(shape) != 4:
        raise InvalidArgumentError(f"{name} must be 4-D, got shape {shape}.")
    dtype = xp.dtype_name(x.dtype)
    if dtype not in FLOATS:
        raise InvalidTypeError(
            f"{name} must be a floating tensor ({', '.join(FLOATS)}), got dtype "
            f"{dtype or x.dtype}; cast it first (integer, bool and complex inputs are not "
            "attention inputs)."
        )
    return shape


def check_qkv(xp, q, k, v, layout: str) -> tuple[int, int, int, int, int]:
    """``(B, H, H_kv, Lq, Lk)`` of floating ``q``, ``k``, ``v`` in ``layout``, checked."""
    qs, ks, vs = _shape4(xp, "q", q), _shape4(xp, "k", k), _shape4(xp, "v", v)
    dtypes = [xp.dtype_name(t.dtype) for t in (q, k, v)]
    if len(set(dtypes)) > 1:
        raise InvalidTypeError(
            f"q, k, v must share one dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}; cast them "
            "to one (the output has q's dtype, scores are float32 or float64)."
        )
    names = "(B, H, L, D)" if layout == "bhld" else "(B, L, H, D)"
    given = f"q {qs}, k {ks}, v {vs}"
    k_given, v_given = ks, vs  # as the caller laid them out, for messages
    if layout == "blhd":
        qs, ks, vs = ((s[0], s[2], s[1], s[3]) for s in (qs, ks, vs))
    if None in (*qs[1:], *ks[1:], *vs[1:]):
        raise InvalidArgumentError(
            f"q, k, v need known heads, lengths and head dims {names} while tracing, got "
            f"{given} (None: unknown; only the batch size may be): posbias "
            "lays out its blocks when the function is traced. Give tf.function no "
            "input_signature (it traces once per shape) or one with fixed lengths, or pad "
            "sequences to a few fixed lengths."
        )
    if not (qs[0] == ks[0] == vs[0]):
        raise InvalidArgumentError(
            f"q, k, v disagree on the batch size: {qs[0]}, {ks[0]}, {vs[0]}."
        )
    if ks[:3] != vs[:3]:
        raise InvalidArgumentError(
            f"k and v must have the same batch, heads and length {names}; got {k_given} "
            f"and {v_given}."
        )
    if qs[3] != ks[3]:
        raise InvalidArgumentError(f"q and k head dims differ: {qs[3]} vs {ks[3]}.")
    if qs[3] == 0 or vs[3] == 0:
        raise InvalidArgumentError(
            f"the head dim D must be >= 1, got q/k of D={qs[3]} and v of D={vs[3]}."
        )
    if ks[1] == 0 or qs[1] % ks[1]:
        raise InvalidArgumentError(
            f"grouped-query attention needs the query heads ({qs[1]}) to be a multiple of "
            f"the key/value heads ({ks[1]})."
        )
    return qs[0], qs[1], ks[1], qs[2], ks[2]


def check_mask(xp, name: str, mask: Any, batch: int, length: int, *, boolean: bool) -> Any:
    """A ``(B, L)`` bool mask (``boolean``) or integer ids as a tensor of ``xp``, checked."""
    mask = native(xp, name, mask)
    shape = xp.shape(mask)
    if shape != (batch, length):
        raise InvalidArgumentError(
            f"{name} must have shape (B, Lk) = ({batch}, {length}), got {shape}."
        )
    dtype = xp.dtype_name(mask.dtype) or str(mask.dtype)
    if boolean and dtype != "bool":
        raise InvalidTypeError(
            f"{name} must be boolean (True for a real key), got dtype {dtype}; "
            "convert with mask.bool() / mask.astype(bool)."
        )
    if not boolean and not xp.is_integer(mask):
        raise InvalidTypeError(f"{name} must hold integers, got dtype {dtype}.")
    return mask


def read_attn_mask(xp, mask: Any, shape: tuple[int, int, int, int], compute: str) -> tuple:
    """``(add, keep)`` of an ``attn_mask``: 4-D tensors broadcastable to ``shape``, or None.

    ``shape`` is ``(B, H, Lq, Lk)``. A bool mask gives ``keep`` (True: the pair
    takes part) only; a floating one gives ``add`` (its finite values in
    ``compute``, 0 where it is ``-inf``) and, when it holds ``-inf`` (or cannot
    be inspected while tracing), ``keep = mask > -inf``: a ``-inf`` entry is
    exactly a False, so a row it hides completely outputs 0, not NaN. Eagerly,
    NaN and ``+inf`` entries are errors.
    """
    mask = native(xp, "attn_mask", mask)
    dtype = xp.dtype_name(mask.dtype) or str(mask.dtype)
    if dtype != "bool" and dtype not in FLOATS:
        raise InvalidTypeError(
            f"attn_mask must be boolean (True: the query/key pair takes part) or floating "
            f"(added to the scores), got dtype {dtype}; convert with mask.bool() / "
            "mask.astype(bool) or cast it to a float dtype."
        )
    got = xp.shape(mask)
    padded = (1,) * (4 - len(got)) + tuple(got)
    if len(got) > 4 or any(n not in (1, want) for n, want in zip(padded, shape, strict=True)):
        raise InvalidArgumentError(
            f"attn_mask must be broadcastable to (B, H, Lq, Lk) = {tuple(shape)} (each "
            f"dimension that size or 1, at most 4 dimensions, in every layout), got shape "
            f"{tuple(got)}."
        )
    mask = mask[(None,) * (4 - len(got))] if len(got) < 4 else mask
    if dtype == "bool":
        return None, mask
    # a constant on every path: the blockwise backward passes return no mask gradient,
    # so none returns one (rather than zeros on some paths and values on others)
    mask = xp.stop_gradient(mask)
    if xp.is_concrete(mask):
        values = xp.to_numpy(mask).astype(np.float64)
        bad = np.isnan(values).any() or np.isposinf(values).any()
        if bad:
            raise InvalidArgumentError(
                "attn_mask must not hold NaN or +inf (a float mask is added to the scores; "
                "use -inf or a bool mask to hide a pair)."
            )
        if not np.isneginf(values).any():
            return xp.cast(mask, compute), None
    # -inf hides a pair; NaN or +inf (unseen while tracing) stay in the scores: NaN
    # outputs, loud, never a pair hidden by guess
    keep = mask != float("-inf")
    return xp.cast(xp.where(keep, mask, 0.0), compute), keep


def read_q_offset(xp, q_offset: Any, batch: int) -> Any:
    """``q_offset``: None, an int, or an integer tensor of shape ``()`` / ``(B,)``."""
    if q_offset is None or is_int(q_offset) or isinstance(q_offset, (bool, float, str)):
        if q_offset is None:
            return None
        limit = xp.max_position
        hint = xp.position_limit_hint
        return check_int(
            "q_offset", q_offset, minimum=-limit, maximum=limit, hint=hint[0].upper() + hint[1:]
        )
    offset = _positions.integer_array(xp, "q_offset", q_offset, 1)
    shape = xp.shape(offset)
    if shape not in ((), (batch,)):
        raise InvalidArgumentError(
            f"q_offset must be an int or an integer tensor of shape () or (B,) = ({batch},), "
            f"got shape {shape}."
        )
    return offset


def read_positions(xp, name: str, pos: Any, batch: int, length: int, points: bool) -> Any:
    """Explicit bias positions: ``(L,)``/``(B, L)`` integers, or ``(L, 2)``/``(B, L, 2)`` points."""
    pos = _positions.integer_array(xp, name, pos, 3 if points else 2)
    shape = xp.shape(pos)
    tail = (length, 2) if points else (length,)
    if shape not in (tail, (batch, *tail)):
        allowed = " or ".join(str(s) for s in (tail, (batch, *tail)))
        raise InvalidArgumentError(
            f"{name} must have shape {allowed} (one position per "
            f"{'query' if name == 'q_pos' else 'key'}), got {shape}."
        )
    return pos


def _select(xp, values: Any, slots: Any) -> Any:
    """``values[b, slots[b, r]]`` for ``values`` ``(B, Lk)`` (0 outside ``[0, Lk)``)."""
    k_len = xp.shape(values)[-1]
    slots = xp.as_int(values[:, :1] * 0) + slots  # (B, Lq)
    inside = (slots >= 0) & (slots < k_len)
    index = xp.minimum(xp.maximum(slots, 0), k_len - 1)
    return xp.where(inside, xp.gather_last(values, index), 0)


def _block(mask: Any, r0: int, r1: int, extent: int) -> Any:
    """Rows ``[r0, r1)`` and keys ``[0, extent)`` of a 4-D mask (broadcast axes kept)."""
    rows = slice(r0, r1) if mask.shape[2] != 1 else slice(None)
    keys = slice(0, extent) if mask.shape[3] != 1 else slice(None)
    return mask[:, :, rows, keys]


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
    key_mask: Any  # (B, Lk) bool or None
    q_segment: Any
    segment_ids: Any
    bias: BiasArg | None
    q_pos: Any
    k_pos: Any
    slot_positions: bool  # bias positions are the slots themselves (Toeplitz-friendly)
    points: bool  # explicit (row, col) positions of a 2-D bias: rows along axis -2
    mask_add: Any = None  # attn_mask's finite values (B|1, H|1, Lq|1, Lk|1) in compute, or None
    mask_keep: Any = None  # attn_mask's visible pairs (B|1, H|1, Lq|1, Lk|1) bool, or None
    gates: Gates | None = None  # log_gates= (data-dependent forget gates), or None

    @property
    def has_attn_mask(self) -> bool:
        """Whether an ``attn_mask`` was given (kernels without one must refuse or fall back)."""
        return self.mask_add is not None or self.mask_keep is not None

    def _rows(self, pos: Any, r0: int, r1: int) -> Any:
        if self.points:
            return pos[..., r0:r1, :]
        return pos[..., r0:r1]

    def extent(self, r0: int, r1: int) -> int:
        """Keys ``[0, K)`` that rows ``[r0, r1)`` may see (causal with a static offset)."""
        if self.causal and isinstance(self.q_offset, int):
            return conventions.causal_extent(self.q_offset + r0, self.q_offset + r1, self.k_len)
        return self.k_len

    def visible(self, r0: int, r1: int, extent: int) -> Any:
        """``(B|1, n, K)`` bool of visible keys, or None when every key is visible."""
        xp = self.xp
        visible = None
        if self.causal:
            visible = conventions.causal_visible(self.q_slot[..., r0:r1], self.k_slot[..., :extent])
            if len(xp.shape(visible)) == 2:
                visible = visible[None]
        if self.key_mask is not None:
            real = self.key_mask[:, None, :extent]
            visible = real if visible is None else visible & real
        if self.segment_ids is not None:
            same = self.q_segment[:, r0:r1, None] == self.segment_ids[:, None, :extent]
            visible = same if visible is None else visible & same
        return visible

    def keep(self, r0: int, r1: int, extent: int) -> Any:
        """``(B|1, H|1, n, K)`` bool: :meth:`visible` and ``attn_mask``'s pairs (None: all)."""
        visible = self.visible(r0, r1, extent)
        if visible is not None:
            visible = visible[:, None]  # one mask for every head
        if self.mask_keep is not None:
            keep = _block(self.mask_keep, r0, r1, extent)
            visible = keep if visible is None else visible & keep
        return visible

    def masked_scores(self, scores: Any, r0: int, r1: int, extent: int) -> tuple[Any, Any]:
        """``(scores + attn_mask's values, keep)`` of rows ``[r0, r1)``, keys ``[0, K)``.

        ``scores`` ``(B, H, n, K)`` already hold ``q·kᵀ·scale + bias``; ``keep``
        is :meth:`keep`: what every path's softmax sees.
        """
        if self.mask_add is not None:
            scores = scores + _block(self.mask_add, r0, r1, extent)
        return scores, self.keep(r0, r1, extent)

    @property
    def has_bias(self) -> bool:
        """Whether scores get an additive bias (a positional bias or ``log_gates``)."""
        return self.bias is not None or self.gates is not None

    def bias_tile(self, r0: int, r1: int, extent: int) -> Any:
        """The bias of rows ``[r0, r1)`` and keys ``[0, K)`` (a positional bias plus the
        ``log_gates`` decay), or None without either."""
        tile = self.positional_tile(r0, r1, extent)
        if self.gates is None:
            return tile
        gate = self.gates.tile(self.xp, self.q_slot[..., r0:r1], extent, self.causal)
        return gate if tile is None else tile + gate

    def positional_tile(self, r0: int, r1: int, extent: int) -> Any:
        """The positional bias of rows ``[r0, r1)`` and keys ``[0, K)``, or None."""
        if self.bias is None:
            return None
        q_pos, k_pos = self._rows(self.q_pos, r0, r1), self._rows(self.k_pos, 0, extent)
        if self.bias.points and not self.points:  # token indices of a row-major grid
            # padding's position is cumsum(key_mask) - 1 = -1: a hidden token, put on (0, 0)
            width, xp = self.bias.spec.grid_width(), self.xp
            q_pos, k_pos = (
                _positions.index_points(xp, xp.maximum(t, 0), width) for t in (q_pos, k_pos)
            )
        return self.bias.tile(self.xp, q_pos, k_pos, self.compute, batch=self.batch)


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
    key_mask: Any = None,
    segment_ids: Any = None,
    scale: Any = None,
    q_pos: Any = None,
    k_pos: Any = None,
    attn_mask: Any = None,
    log_gates: Any = None,
    log_gates_after: Any = None,
    compute_dtype: str | None = None,
) -> Problem:
    """Read and check every argument; derive slots, masks and bias positions.

    No ``Lq × Lk`` work happens here (but for packed ``segment_ids``, whose
    per-segment positions count earlier keys of the same segment).
    """
    q, k, v = (native(xp, n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    batch, heads, kv_heads, q_len, k_len = check_qkv(xp, q, k, v, layout)
    arg = read_bias(bias, heads)
    causal = conventions.check_bool("causal", causal)
    scale = conventions.resolve_scale(scale, xp.shape(q)[-1])
    in_dtype = xp.dtype_name(q.dtype)
    compute = compute_dtype or conventions.compute_dtype(in_dtype)
    q_offset = read_q_offset(xp, q_offset, batch)
    if causal and q_offset is None and q_len > k_len:
        raise InvalidArgumentError(
            f"causal=True with a query longer than the keys ({q_len} > {k_len}): the first "
            "queries would see no key. Pass q_offset= to place the queries explicitly."
        )
    conventions.both_or_neither(q_pos, k_pos, arg)
    points = arg is not None and arg.points
    explicit = q_pos is not None
    if explicit:
        q_pos = read_positions(xp, "q_pos", q_pos, batch, q_len, points)
        k_pos = read_positions(xp, "k_pos", k_pos, batch, k_len, points)
    if layout != "bhld":
        q, k, v = (einops.rearrange(t, f"{LAYOUTS[layout]} -> b h l d") for t in (q, k, v))
    if kv_heads != heads:
        k, v = (einops.repeat(t, "b h l d -> b (h g) l d", g=heads // kv_heads) for t in (k, v))

    k_slot = xp.arange(k_len)
    if q_offset is None:
        q_offset = conventions.default_q_offset(q_len, k_len)
    if isinstance(q_offset, int):
        q_slot = xp.arange(q_len) + q_offset
    else:
        q_offset = xp.as_int(q_offset)
        q_slot = q_offset[..., None] + xp.arange(q_len)

    q_segment = None
    if key_mask is not None:
        key_mask = check_mask(xp, "key_mask", key_mask, batch, k_len, boolean=True)
    if segment_ids is not None:
        segment_ids = check_mask(xp, "segment_ids", segment_ids, batch, k_len, boolean=False)
        q_segment = _select(xp, segment_ids, q_slot)

    mask_add = mask_keep = None
    if attn_mask is not None:
        mask_add, mask_keep = read_attn_mask(xp, attn_mask, (batch, heads, q_len, k_len), compute)

    gates = _gates.read(
        xp,
        log_gates,
        log_gates_after,
        layout=layout,
        batch=batch,
        heads=heads,
        k_len=k_len,
        q_len=q_len,
        causal=causal,
        q_offset=q_offset,
        key_mask=key_mask,
        segment_ids=segment_ids,
        compute=compute,
        native=native,
    )

    slot_positions = q_pos is None and key_mask is None and segment_ids is None
    if arg is not None and q_pos is None:
        if slot_positions:
            q_pos, k_pos = q_slot, k_slot
        else:
            k_pos = conventions.positions_from_mask(xp, key_mask, segment_ids)
            q_pos = _select(xp, k_pos, q_slot)

    return Problem(
        xp=xp,
        q=q,
        k=k,
        v=v,
        batch=batch,
        heads=heads,
        q_len=q_len,
        k_len=k_len,
        scale=scale,
        compute=compute,
        in_dtype=in_dtype,
        causal=causal,
        q_offset=q_offset,
        q_slot=q_slot,
        k_slot=k_slot,
        key_mask=key_mask,
        q_segment=q_segment,
        segment_ids=segment_ids,
        bias=arg,
        q_pos=q_pos,
        k_pos=k_pos,
        slot_positions=slot_positions,
        points=points and explicit,
        mask_add=mask_add,
        mask_keep=mask_keep,
        gates=gates,
    )
