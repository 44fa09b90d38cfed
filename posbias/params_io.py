"""Save and load learnable bias parameters as portable files.

``.npz`` (NumPy) always works; ``.safetensors`` when the ``safetensors``
package is installed. Both hold a flat ``dict[str, numpy.ndarray]``, the same
dict that ``spec.init_params()``, ``PositionalBias.export_params()`` and
``PositionalBias.load_params()`` use in every framework.

    >>> import posbias, tempfile, os
    >>> from posbias.params_io import save_params, load_params
    >>> params = posbias.get("t5", num_heads=2).init_params()
    >>> path = os.path.join(tempfile.mkdtemp(), "t5.npz")
    >>> save_params(params, path)
    >>> load_params(path)["table"].shape
    (32, 2)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import backends
from .errors import BackendUnavailableError, InvalidArgumentError, InvalidTypeError


def _safetensors():
    try:
        from safetensors import numpy as st
    except ImportError as exc:
        raise BackendUnavailableError(
            "writing .safetensors files needs the safetensors package: pip install safetensors "
            "(or save as .npz)."
        ) from exc
    return st


def _path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidTypeError(f"path must be a str or os.PathLike, got {type(path).__name__}.")
    path = os.fspath(path)
    if not path.endswith((".npz", ".safetensors")):
        raise InvalidArgumentError(
            f"unknown parameter file type {path!r}; use .npz or .safetensors."
        )
    return path


def _arrays(params: Any) -> dict[str, np.ndarray]:
    """``params`` as a dict of C-ordered numeric NumPy arrays (0-d arrays stay 0-d)."""
    if not isinstance(params, Mapping):
        raise InvalidTypeError(f"params must be a dict of arrays, got {type(params).__name__}.")
    arrays = {}
    for key, value in params.items():
        if not isinstance(key, str):
            raise InvalidTypeError(f"parameter names must be strings, got {key!r}.")
        if backends.detect(value) not in (None, "numpy"):  # a tensor: detached, on the host
            value = backends.to_numpy(value)
        try:
            array = np.array(value, order="C")  # np.ascontiguousarray would make 0-d 1-d
        except ValueError as exc:  # ragged nested lists
            raise InvalidArgumentError(
                f"parameter {key!r} is not a rectangular array: {exc}."
            ) from exc
        if array.dtype.name == "bfloat16":  # ml_dtypes: not every file format holds it
            array = array.astype(np.float32)
        if array.dtype.kind not in "biuf":
            raise InvalidTypeError(
                f"parameter {key!r} must be a numeric array, got dtype {array.dtype}."
            )
        arrays[key] = array
    return arrays


def save_params(params: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``params`` (``{name: array}``) to ``path`` (``.npz`` or ``.safetensors``).

    Raises:
        InvalidTypeError: non-string names, non-numeric values, a path that is not a path.
        InvalidArgumentError: ragged values, an unknown file type, a file that cannot be written.
    """
    arrays = _arrays(params)
    path = _path(path)
    try:
        if path.endswith(".safetensors"):
            _safetensors().save_file(arrays, path)
        else:
            np.savez(path, **arrays)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write parameters to {path!r}: {exc}.") from exc


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a parameter dict written by :func:`save_params`.

    Raises:
        InvalidArgumentError: a missing path, a directory, or a file that is not a parameter
            file of that type (empty, truncated, text, pickled objects).
    """
    path = _path(path)
    if os.path.isdir(path) or not os.path.exists(path):
        raise InvalidArgumentError(
            f"cannot read parameters from {path!r}: "
            f"{'it is a directory' if os.path.isdir(path) else 'no such file'}."
        )
    try:
        if path.endswith(".safetensors"):
            arrays = dict(_safetensors().load_file(path))
        else:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
    except BackendUnavailableError:
        raise
    except Exception as exc:  # zipfile, safetensors and NumPy each raise their own kinds
        raise InvalidArgumentError(
            f"{path!r} is not a readable {os.path.splitext(path)[1]} parameter file "
            f"({type(exc).__name__}: {exc})."
        ) from exc
    return _arrays(arrays)
