"""Turn lengths, offsets and position arrays into global integer positions.

Convention (docs/contract.md, "Positions and alignment"): query ``i`` and
key ``j`` are global integer positions. When only lengths are given, keys sit
at ``k_offset + [0, k_len)`` (``k_offset`` defaults to 0) and queries are
aligned **bottom-right**: query ``r`` sits at ``k_offset + k_len - q_len + r``,
as in KV-cache decoding and FlashAttention. Explicit offsets or position arrays override that.

Offsets are non-negative Python ints, or native integer tensors of shape ``()``
or ``(B,)`` (per-sequence offsets, e.g. per-sequence cache lengths; these are
not range-checked because they may be traced under ``jit``).
Position arrays are native integer arrays of shape ``(L,)`` or ``(B, L)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._core import conventions
from ._core.checks import MAX_POSITION, check_int, is_int
from .backends import Backend, check_framework
from .errors import InvalidArgumentError, InvalidTypeError


def integer_array(xp: Backend, name: str, value: Any, max_ndim: int) -> Any:
    """Convert ``value`` to a native integer tensor of ndim <= ``max_ndim``, checked.

    NumPy arrays, lists and scalars are converted (and range-checked); tensors of this
    framework must hold integers and sit on its device; another framework's is an error.
    """
    kind = check_framework(xp, name, value)
    if kind in (None, "numpy"):
        try:
            value = np.asarray(value)
        except ValueError as exc:  # ragged nested lists
            raise InvalidTypeError(f"{name} must be a rectangular integer array: {exc}") from exc
        if value.size == 0 and value.dtype.kind == "f":  # an empty list
            value = value.astype(np.int64)
        if not np.issubdtype(value.dtype, np.integer):
            raise InvalidTypeError(
                f"{name} must hold integers, got dtype {value.dtype}; positions are "
                f"integer token indices, e.g. {name}=np.arange(L)."
            )
        check_range(xp, name, value)
        value = xp.from_numpy(value.astype(np.int64, copy=False))
    elif not xp.is_integer(value):
        raise InvalidTypeError(
            f"{name} must hold integers, got a {xp.name} tensor of dtype {value.dtype}; "
            f"positions are integer token indices (cast with .long()/astype(int))."
        )
    elif xp.max_position < MAX_POSITION and xp.is_concrete(value):
        check_range(xp, name, xp.to_numpy(value))  # 32-bit integers wrap near 2^31
    ndim = len(xp.shape(value))
    if ndim > max_ndim or (name.endswith("_pos") and ndim == 0):
        allowed = "(L,) or (B, L)" if max_ndim == 2 else "() or (B,)"
        raise InvalidArgumentError(
            f"{name} must have shape {allowed}, got shape {xp.shape(value)}."
        )
    return xp.as_int(value)


def _hint(xp: Backend) -> str:
    return xp.position_limit_hint[0].upper() + xp.position_limit_hint[1:] + "."


def check_range(xp: Backend, name: str, values: Any) -> None:
    """Raise when integer ``values`` (NumPy, or ints) leave ``[-max_position, max_position]``."""
    array = np.asarray(values)
    if array.size == 0:
        return
    low, high = int(array.min()), int(array.max())
    if max(abs(low), abs(high)) > xp.max_position:
        raise InvalidArgumentError(
            f"{name} holds values in [{low}, {high}], beyond ±{xp.max_position}: "
            f"{xp.position_limit_hint}."
        )


def _side(
    xp: Backend, side: str, length: Any, pos: Any, offset: Any
) -> tuple[Any | None, int | None, Any]:
    """Return ``(positions or None, length, offset or None)`` for one side."""
    if pos is not None:
        if offset is not None:
            raise InvalidArgumentError(
                f"give either {side}_pos or {side}_offset, not both: explicit positions "
                "already say where every token sits."
            )
        pos = integer_array(xp, f"{side}_pos", pos, 2)
        actual = xp.shape(pos)[-1]
        if length is not None:
            length = check_int(f"{side}_len", length, maximum=xp.max_position, hint=_hint(xp))
            if actual is not None and length != actual:
                raise InvalidArgumentError(
                    f"{side}_len={length} does not match {side}_pos of length {actual}; "
                    f"drop {side}_len or pass matching positions."
                )
        return pos, actual, None
    if length is None:
        raise InvalidArgumentError(
            f"give {side}_len (an int) or {side}_pos (an integer array) for the "
            f"{'queries' if side == 'q' else 'keys'}."
        )
    length = check_int(f"{side}_len", length, maximum=xp.max_position, hint=_hint(xp))
    if offset is not None:
        if is_int(offset) or isinstance(offset, (bool, float, str)):
            offset = check_int(
                f"{side}_offset", offset, maximum=xp.max_position - length, hint=_hint(xp)
            )
        else:
            offset = integer_array(xp, f"{side}_offset", offset, 1)
    return None, length, offset


def _from_offset(xp: Backend, offset: Any, length: int) -> Any:
    positions = xp.arange(length)
    if is_int(offset):
        return positions + offset if offset else positions
    return offset[..., None] + positions


def resolve(
    xp: Backend,
    *,
    q_len: Any = None,
    k_len: Any = None,
    q_pos: Any = None,
    k_pos: Any = None,
    q_offset: Any = None,
    k_offset: Any = None,
) -> tuple[Any, Any]:
    """Global integer positions ``(q, k)``, each of shape ``(Lq,)``/``(B, Lq)``.

    Example:
        >>> from posbias.backends import load
        >>> xp = load("numpy")()
        >>> q, k = resolve(xp, q_len=2, k_len=5)
        >>> q.tolist(), k.tolist()
        ([3, 4], [0, 1, 2, 3, 4])
    """
    q_pos, q_len, q_offset = _side(xp, "q", q_len, q_pos, q_offset)
    keys_explicit = k_pos is not None
    k_pos, k_len, k_offset = _side(xp, "k", k_len, k_pos, k_offset)
    if not keys_explicit:
        k_offset = 0 if k_offset is None else k_offset
        k_pos = _from_offset(xp, k_offset, k_len)
    if q_pos is None:
        if q_offset is None:
            if keys_explicit:
                raise InvalidArgumentError(
                    "with explicit k_pos, give q_pos or q_offset too: the default "
                    "bottom-right alignment is defined for keys given by k_len."
                )
            # bottom-right, may be < 0 if q_len > k_len
            q_offset = conventions.default_q_offset(q_len, k_len, k_offset)
        q_pos = _from_offset(xp, q_offset, q_len)
    q_shape, k_shape = xp.shape(q_pos), xp.shape(k_pos)
    if len(q_shape) == 2 and len(k_shape) == 2:
        bq, bk = q_shape[0], k_shape[0]
        if bq is not None and bk is not None and bq != bk:
            raise InvalidArgumentError(
                f"batched query and key positions disagree on the batch size: "
                f"{bq} vs {bk}; give both as (B, L) with the same B (or one as (L,))."
            )
    return q_pos, k_pos


#: 2-D points (row, col) travel through the 1-D machinery as row * POINT_BASE + col.
POINT_BASE = 1 << 20


def encode_points(xp: Backend, name: str, points: Any) -> Any:
    """``(..., L, 2)`` integer (row, col) points → ``(..., L)`` codes (None passes)."""
    if points is None:
        return None
    array = integer_array(xp, name, points, 3)
    shape = xp.shape(array)
    if len(shape) < 2 or shape[-1] != 2:
        raise InvalidArgumentError(
            f"{name} of a 2-D bias must be (row, col) points of shape (L, 2) or (B, L, 2), "
            f"got shape {shape}."
        )
    if isinstance(points, (np.ndarray, list, tuple)) or xp.is_concrete(array):
        values = (
            np.asarray(points)
            if isinstance(points, (np.ndarray, list, tuple))
            else (xp.to_numpy(array))
        )
        rows = xp.max_position // POINT_BASE  # the codes of every row must fit the backend
        if values.size and (values.min() < 0 or values[..., 1].max() >= POINT_BASE
                            or values[..., 0].max() >= rows):  # fmt: skip
            raise InvalidArgumentError(
                f"{name} must hold (row, col) points with 0 <= row < {rows} and "
                f"0 <= col < {POINT_BASE}, got values in [{values.min()}, {values.max()}]"
                f"{'' if rows > 1 << 16 else f' ({xp.position_limit_hint})'}."
            )
    return array[..., 0] * POINT_BASE + array[..., 1]


def points_from_index(index: Any, width: int) -> Any:
    """Token indices of a row-major grid of ``width`` columns → point codes."""
    return (index // width) * POINT_BASE + index % width


def index_points(xp: Backend, index: Any, width: int) -> Any:
    """Token indices ``(..., L)`` of a row-major grid ``width`` wide → ``(..., L, 2)`` points."""
    return xp.stack([index // width, index % width], -1)


def decode_points(codes: Any) -> tuple[Any, Any]:
    """Point codes → ``(row, col)`` integer tensors."""
    row = codes // POINT_BASE
    return row, codes - row * POINT_BASE
