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

import numpy as np

from .errors import BackendUnavailableError, InvalidArgumentError


def _safetensors():
    try:
        from safetensors import numpy as st
    except ImportError as exc:
        raise BackendUnavailableError(
            "writing .safetensors files needs the safetensors package: pip install safetensors "
            "(or save as .npz)."
        ) from exc
    return st


def save_params(params: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``params`` to ``path`` (``.npz`` or ``.safetensors``)."""
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in params.items()}
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        _safetensors().save_file(arrays, path)
    elif path.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        raise InvalidArgumentError(
            f"unknown parameter file type {path!r}; use .npz or .safetensors."
        )


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a parameter dict written by :func:`save_params`."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return dict(_safetensors().load_file(path))
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    raise InvalidArgumentError(f"unknown parameter file type {path!r}; use .npz or .safetensors.")
