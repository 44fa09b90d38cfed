"""Small argument checks shared by the whole package.

Each raises a :class:`~posbias.errors.PosBiasError` subclass that names the
argument, shows the value received and says what is expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError

#: Upper bound on ``num_heads``: far beyond any real model, low enough that the
#: per-head constants never exhaust memory.
MAX_HEADS = 1 << 20
#: Upper bound on a sequence length or offset (positions must stay exact in int64
#: and distances exact enough in float32 for every backend).
MAX_POSITION = 1 << 40
#: Upper bound on a hidden width or head dimension of a bias (MLP widths, Sandwich's d).
MAX_WIDTH = 1 << 16


def is_int(value: object) -> bool:
    """True for Python and NumPy integers, False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(
    name: str,
    value: object,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    hint: str = "Check that you passed the intended value.",
) -> int:
    """Return ``value`` as an ``int`` if it is an integer in ``[minimum, maximum]``."""
    if not is_int(value):
        raise InvalidTypeError(
            f"{name} must be an integer, got {value!r} of type {type(value).__name__}; "
            f"pass a Python int such as {name}={max(minimum, 1)}."
        )
    value = int(value)
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(f"{name}={value} is too large: the maximum is {maximum}. {hint}")
    return value


def check_num_heads(value: object) -> int:
    """Validate a head count: a positive int no larger than :data:`MAX_HEADS`."""
    return check_int("num_heads", value, minimum=1, maximum=MAX_HEADS)


def check_finite_float(
    name: str, value: object, *, positive: bool = False, nonnegative: bool = False
) -> float:
    """Return ``value`` as a float if it is a finite real number (``> 0`` / ``>= 0`` if asked)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(
            f"{name} must be a real number, got {value!r} of type {type(value).__name__}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be finite, got {value}.")
    if positive and value <= 0:
        raise InvalidArgumentError(f"{name} must be > 0, got {value}.")
    if nonnegative and value < 0:
        raise InvalidArgumentError(f"{name} must be >= 0, got {value}.")
    return value


def check_rate(name: str, value: object) -> float:
    """A dropout probability: a real number in ``[0, 1)`` (1 would drop everything)."""
    value = check_finite_float(name, value, nonnegative=True)
    if value >= 1:
        raise InvalidArgumentError(
            f"{name} must be a probability in [0, 1) (the fraction of attention weights "
            f"dropped), got {value}."
        )
    return value


def check_float_sequence(
    name: str,
    values: object,
    *,
    length: int | None = None,
    positive: bool = False,
    nonnegative: bool = False,
) -> tuple[float, ...]:
    """Validate a 1-D sequence of finite floats and return it as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Iterable, np.ndarray)):
        raise InvalidTypeError(
            f"{name} must be a sequence of numbers, got {type(values).__name__}."
        )
    array = np.asarray(values)
    if array.ndim != 1:
        raise InvalidArgumentError(f"{name} must be 1-D, got shape {array.shape}.")
    items = tuple(
        check_finite_float(
            f"{name}[{i}]",
            v.item() if hasattr(v, "item") else v,
            positive=positive,
            nonnegative=nonnegative,
        )
        for i, v in enumerate(array)
    )
    if length is not None and len(items) != length:
        raise InvalidArgumentError(
            f"{name} must have {length} entries (one per head), got {len(items)}."
        )
    return items


def real_array(name: str, value: object) -> np.ndarray:
    """``value`` as a float64 NumPy array if it holds real numbers (not bools or strings).

    Accepts NumPy arrays (also ml_dtypes floats such as bfloat16), lists and numbers.
    """
    array = np.asarray(value)
    try:
        if array.dtype.kind in "bcOSUMm":  # bools, complex, objects, strings, times
            raise TypeError
        return array.astype(np.float64)
    except (TypeError, ValueError):
        raise InvalidTypeError(
            f"{name} must hold real numbers, got {value!r:.80} of dtype {array.dtype}."
        ) from None


def check_heads(heads: object, num_heads: int) -> np.ndarray:
    """Validate global head indices and return them as an int64 NumPy array.

    ``heads`` may be ``None`` (all heads), an int, a ``range``, a sequence of ints
    or a 1-D integer NumPy array. Indices must lie in ``[0, num_heads)`` and be
    unique. (Plain Python, so that ``torch.compile`` treats it as static.)
    """
    if heads is None:
        return np.arange(num_heads, dtype=np.int64)
    if is_int(heads):
        heads = [heads]
    if isinstance(heads, (str, bytes)) or not isinstance(heads, (Iterable, np.ndarray)):
        raise InvalidTypeError(
            f"heads must be a range or a sequence of ints, got {type(heads).__name__}; "
            "for example heads=range(4, 8)."
        )
    items = list(heads)
    for h in items:
        if not is_int(h):
            raise InvalidTypeError(f"heads must hold ints, got {h!r} of type {type(h).__name__}.")
    items = [int(h) for h in items]
    if not items:
        raise InvalidArgumentError("heads is empty; pass at least one head index or None for all.")
    bad = [h for h in items if not 0 <= h < num_heads]
    if bad:
        raise InvalidArgumentError(
            f"heads holds indices {bad}, out of range for num_heads={num_heads}; "
            f"global head indices run from 0 to {num_heads - 1}."
        )
    if len(set(items)) != len(items):
        dupes = sorted({h for h in items if items.count(h) > 1})
        raise InvalidArgumentError(f"heads holds duplicates {dupes}; each head may appear once.")
    return np.asarray(items, dtype=np.int64)


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool (Python or NumPy), else an error naming ``name``.

    Truthiness is not validation: ``"false"`` and ``"no"`` are truthy strings.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidTypeError(
        f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}."
    )
