"""The pipeline behind :meth:`posbias.BiasSpec.bias`.

backend, device and dtype → global integer positions (:mod:`posbias.positions`)
→ the memory guard → the variant's ``compute`` (one value per diagonal and a
strided copy for Toeplitz biases) → the cast to the requested dtype, last.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from . import backends as _backends
from . import positions as _positions
from ._core import conventions
from ._core.checks import check_heads
from .errors import BackendError, InvalidArgumentError, InvalidTypeError, ResourceError

if TYPE_CHECKING:
    from .spec import BiasSpec


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


#: Read once at import: a bias larger than the machine's memory is refused.
_MEMORY_LIMIT = _physical_memory()


def evaluate(
    spec: BiasSpec,
    q_len: int | None = None,
    k_len: int | None = None,
    *,
    q_pos: Any = None,
    k_pos: Any = None,
    q_offset: Any = None,
    k_offset: Any = None,
    heads: Any = None,
    dtype: Any = "float32",
    backend: str | None = None,
    device: Any = None,
    params: Mapping[str, Any] | None = None,
) -> Any:
    """``spec``'s bias as a native tensor; see :meth:`posbias.BiasSpec.bias`."""
    name = _resolve_backend(
        backend, q_pos=q_pos, k_pos=k_pos, q_offset=q_offset, k_offset=k_offset, params=params
    )
    backend_cls = _backends.load(name)
    if device is not None:
        device = backend_cls.check_device(device)
    else:
        for value in (q_pos, k_pos, q_offset, k_offset):
            if value is not None and _backends.detect(value) == name:
                device = backend_cls().device_of(value)
                break
    out_dtype = backend_cls(device).float_dtype(dtype, "bias dtype")
    xp = backend_cls(device, "float64" if out_dtype == "float64" else "float32")
    head_index = check_heads(heads, spec.num_heads)
    explicit = (q_pos is not None, k_pos is not None)
    if spec.position_dims == 2:
        q_pos, k_pos = (
            _positions.encode_points(xp, n, p) for n, p in (("q_pos", q_pos), ("k_pos", k_pos))
        )
    q, k = _positions.resolve(
        xp,
        q_len=q_len,
        k_len=k_len,
        q_pos=q_pos,
        k_pos=k_pos,
        q_offset=q_offset,
        k_offset=k_offset,
    )
    if spec.position_dims == 2 and not all(explicit):  # token index -> (row, col)
        width = spec.grid_width()
        q, k = (
            p if given else _positions.points_from_index(p, width)
            for p, given in zip((q, k), explicit, strict=True)
        )
    _check_size(xp, q, k, len(head_index), out_dtype)
    native_params = _native_params(spec, xp, params)
    if _toeplitz_applies(spec, xp, q, k, explicit, q_offset, k_offset):
        # one value per diagonal d = k - q, then a strided copy (memory-bound, like a fill)
        q_len, k_len = xp.shape(q)[-1], xp.shape(k)[-1]
        k_first = k_offset or 0
        q_first = (
            conventions.default_q_offset(q_len, k_len, k_first) if q_offset is None else q_offset
        )
        d_min, _ = conventions.diagonal_range(q_first, q_len, k_first, k_len)
        d = xp.arange(q_len + k_len - 1) + d_min
        diagonals = _compute(spec, xp, d[:1] * 0, d, head_index, native_params)
        values = xp.toeplitz(xp.float(diagonals)[..., 0, :], q_len, k_len)
    else:
        values = _compute_in_chunks(spec, xp, q, k, head_index, native_params)
    return xp.cast_output(xp.float(values), out_dtype)


#: bytes of temporaries one chunk of ``compute`` may hold (MLP hidden layers, angles, ...)
CHUNK_BYTES = 256 << 20


def _compute_in_chunks(spec: BiasSpec, xp: Any, q: Any, k: Any, heads: Any, params: Any) -> Any:
    """``compute`` over blocks of query rows, so that its temporaries stay bounded.

    A variant declares how many floats of temporaries it holds per bias entry
    (:meth:`BiasSpec.temporaries_per_entry`) and per (query, key) pair
    (:meth:`BiasSpec.temporaries_per_pair`: FIRE's MLP, Swin V2's CPB, Sandwich's
    angles); the rows are split so that a block needs at most :data:`CHUNK_BYTES`.
    Tiles concatenate exactly, so the result is the same as one call.
    """
    q_len, k_len = xp.shape(q)[-1], xp.shape(k)[-1]
    batches = [s[0] for s in (xp.shape(q), xp.shape(k)) if len(s) == 2] or [1]
    batch = None if None in batches else max(batches)
    if q_len is None or k_len is None or batch is None:  # unknown while tracing
        return _compute(spec, xp, q, k, heads, params)
    per_pair = max(1, _temporaries(spec, "entry")) * len(heads) + _temporaries(spec, "pair")
    per_row = 4 * per_pair * k_len * batch
    if per_row == 0:  # no keys or no rows: nothing to bound
        return _compute(spec, xp, q, k, heads, params)
    _check_memory(per_row, f"one query row of {spec.name or type(spec).__name__}")
    rows = max(1, CHUNK_BYTES // per_row)
    if q_len <= rows:
        return _compute(spec, xp, q, k, heads, params)
    parts = [
        _compute(spec, xp, q[..., r : r + rows], k, heads, params) for r in range(0, q_len, rows)
    ]
    return xp.concat(parts, -2)


def _temporaries(spec: BiasSpec, kind: str) -> int:
    """``spec.temporaries_per_<kind>()``, checked: a non-negative ``int``."""
    value = getattr(spec, f"temporaries_per_{kind}")()
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise InvalidTypeError(
            f"{spec.name or type(spec).__name__}.temporaries_per_{kind}() returned {value!r}; "
            "expected a non-negative int (floats of temporaries, see BiasSpec)."
        )
    return int(value)


def _compute(spec: BiasSpec, xp: Any, q: Any, k: Any, heads: Any, params: Any) -> Any:
    """``spec.compute`` for positions ``q`` ``(..., Lq)`` and ``k`` ``(..., Lk)``, shape-checked.

    A variant's output must be ``(..., h, Lq, Lk)`` exactly: a missing heads
    axis would otherwise be broadcast over the heads, silently.
    """
    values = spec.compute(xp, q[..., :, None], k[..., None, :], heads, params)
    q_shape, k_shape = xp.shape(q), xp.shape(k)
    batch = q_shape[:-1] if len(q_shape) > len(k_shape) else k_shape[:-1]
    expected = (*batch, len(heads), q_shape[-1], k_shape[-1])
    shape = xp.shape(values)
    if len(shape) != len(expected) or any(
        a is not None and b is not None and a != b for a, b in zip(shape, expected, strict=True)
    ):
        raise InvalidArgumentError(
            f"{spec.name or type(spec).__name__}.compute() returned shape {shape}; expected "
            f"{expected} = (batch..., heads, Lq, Lk). A variant's compute must return one "
            "value per head, query and key (see BiasSpec.compute)."
        )
    return values


def _toeplitz_applies(spec: BiasSpec, xp, q, k, explicit, q_offset, k_offset) -> bool:
    """Slot positions of a Toeplitz bias on a backend with a strided Toeplitz copy."""
    return (
        spec.toeplitz
        and xp.fast_toeplitz
        and spec.position_dims == 1
        and not any(explicit)
        and len(xp.shape(q)) == 1
        and len(xp.shape(k)) == 1
        and xp.shape(q)[0] > 1
        and all(o is None or isinstance(o, int) for o in (q_offset, k_offset))
    )


# ---------------------------------------------------------- internals
def _resolve_backend(backend: str | None, **arrays: Any) -> str:
    """The backend asked for, or the one framework of the given arrays (NumPy: any)."""
    found: dict[str, list[str]] = {}  # framework -> the arguments holding its tensors
    for name, value in arrays.items():
        items = value.items() if isinstance(value, Mapping) else ((None, value),)
        for key, item in items:
            kind = _backends.detect(item) if item is not None else None
            if kind is not None and kind != "numpy":
                found.setdefault(kind, []).append(name if key is None else f"{name}[{key!r}]")
    if backend is not None:
        backend = _backends.canonical_name(backend)
        foreign = {k: v for k, v in found.items() if k != backend}
        if foreign:
            which = "; ".join(f"{', '.join(v)} ({k})" for k, v in sorted(foreign.items()))
            raise BackendError(
                f"backend={backend!r} was asked for but some inputs are tensors of another "
                f"framework: {which}. Pass inputs of one framework (NumPy arrays and lists "
                "convert to any backend)."
            )
        return backend
    if len(found) > 1:
        which = "; ".join(f"{', '.join(v)} ({k})" for k, v in sorted(found.items()))
        raise BackendError(
            f"inputs mix frameworks: {which}; pass positions, offsets and params from one "
            "framework, or convert them first."
        )
    return next(iter(found)) if found else "numpy"


def _check_size(xp: Any, q: Any, k: Any, heads: int, dtype: str) -> None:
    q_shape, k_shape = xp.shape(q), xp.shape(k)
    dims = [heads, q_shape[-1], k_shape[-1]]
    if len(q_shape) == 2 or len(k_shape) == 2:
        dims.insert(0, (q_shape if len(q_shape) == 2 else k_shape)[0])
    if any(d is None for d in dims):
        return
    needed = 4 * (2 if dtype != "float32" else 1)
    for d in dims:
        needed *= d
    limit = _MEMORY_LIMIT
    if limit is not None and needed > limit:
        raise ResourceError(
            f"the bias of shape {tuple(dims)} would need about "
            f"{needed / 2**30:.1f} GiB, more than this machine's "
            f"{limit / 2**30:.1f} GiB; ask for fewer heads, shorter blocks of "
            "queries/keys (tiles concatenate exactly), or use a blockwise attention."
        )


def _check_memory(needed: int, what: str) -> None:
    limit = _MEMORY_LIMIT
    if limit is not None and needed > limit:
        raise ResourceError(
            f"{what} needs about {needed / 2**30:.1f} GiB of temporaries, more than this "
            f"machine's {limit / 2**30:.1f} GiB; ask for fewer heads or keys at once."
        )


@functools.lru_cache(maxsize=64)
def _initial_params(spec: BiasSpec) -> Mapping[str, np.ndarray]:
    """``spec.init_params(0)``, once per spec (read-only): a learnable bias given by name
    or spec, without a module, uses its initial parameters on every call."""
    params = {k: np.array(v, dtype=np.float64) for k, v in spec.init_params().items()}
    for value in params.values():
        value.flags.writeable = False
    return params


def _native_params(spec: BiasSpec, xp: Any, params: Mapping[str, Any] | None) -> Any:
    if params is None:
        if not spec.learnable:
            return None
        params = _initial_params(spec)
    elif not spec.learnable:
        raise InvalidArgumentError(
            f"{spec.name or type(spec).__name__} has no learnable parameters; drop params=."
        )
    spec.check_params(params, shapes_of=xp.shape)
    native = {}
    for key, value in params.items():
        if isinstance(value, (np.ndarray, list, tuple, float, int)):
            native[key] = xp.constant(np.asarray(value, dtype=np.float64))
        else:  # a module's parameters must live where the computation runs
            _backends.check_framework(
                xp, f"bias parameter {key!r}", value, move="bias.to(q.device) for a bias module"
            )
            native[key] = xp.float(value)
    return native
