"""Framework adapters: detection, loading and the backend table.

Nothing here imports a framework. :func:`detect` looks at the type of an array
and at ``sys.modules``: a framework that has not been imported cannot have
produced the array, so it is never imported just to find out. :func:`load`
imports the adapter module (and with it the framework) on first use and turns
a missing framework into :class:`~posbias.errors.BackendUnavailableError`
naming the pip extra to install.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from ..errors import BackendError, BackendUnavailableError
from ._base import FLOAT_DTYPES, Backend

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "Backend",
    "available",
    "check_framework",
    "detect",
    "load",
    "to_numpy",
]

#: name -> (framework import name, human name, pip extra)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "numpy": ("numpy", "NumPy", ""),
    "torch": ("torch", "PyTorch", "torch"),
    "jax": ("jax", "JAX", "jax"),
    "tensorflow": ("tensorflow", "TensorFlow", "tensorflow"),
}
_ALIASES = {"np": "numpy", "pytorch": "torch", "tf": "tensorflow", "jnp": "jax"}
_CLASS_NAMES = {
    "numpy": "NumpyBackend",
    "torch": "TorchBackend",
    "jax": "JaxBackend",
    "tensorflow": "TensorflowBackend",
}


def canonical_name(name: str) -> str:
    """``"pytorch"`` → ``"torch"``; raises for unknown names."""
    if not isinstance(name, str):
        raise BackendError(f"backend must be a string such as 'torch', got {type(name).__name__}.")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}.")
    return key


_loaded: dict[str, type[Backend]] = {}


def _import_adapter(key: str) -> Any:
    # Plain import statements, not importlib: torch.compile (dynamo) can trace
    # these, so the first bias built inside a compiled function still works.
    if key == "numpy":
        from . import numpy as module
    elif key == "torch":
        from . import torch as module
    elif key == "jax":
        from . import jax as module
    else:
        from . import tensorflow as module
    return module


def load(name: str) -> type[Backend]:
    """The backend class for ``name``, importing its framework on first use."""
    key = canonical_name(name)
    if key in _loaded:  # fast path; also keeps torch.compile away from importlib
        return _loaded[key]
    framework, human, extra = BACKENDS[key]
    try:
        module = _import_adapter(key)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != framework.split(".")[0]:
            raise  # a genuine bug, not a missing framework
        raise BackendUnavailableError(
            f"{human} is not installed, so the {key!r} backend cannot be used. "
            f"Install it with: pip install 'posbias[{extra}]'"
        ) from exc
    _loaded[key] = getattr(module, _CLASS_NAMES[key])
    return _loaded[key]


def available() -> list[str]:
    """Backends whose framework is installed (checked without importing it)."""
    return [
        name
        for name, (framework, _, _) in BACKENDS.items()
        if name in sys.modules or importlib.util.find_spec(framework) is not None
    ]


def detect(x: Any) -> str | None:
    """The backend name of a native array, or None for anything else.

    Lists, ranges and Python numbers give None: they are neutral and can be
    converted to any backend. NumPy arrays give ``"numpy"``.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        # first, and without string methods: torch.compile cannot trace
        # type(x).__module__ of an nn.Parameter (a learnable bias's parameters)
        return "torch"
    root = type(x).__module__.partition(".")[0]
    if root == "numpy":
        return "numpy" if hasattr(x, "dtype") else None
    if root in ("jax", "jaxlib"):
        jax = sys.modules.get("jax")
        return "jax" if jax is not None and isinstance(x, jax.Array) else None
    if root in ("tensorflow", "keras", "tf_keras"):
        tf = sys.modules.get("tensorflow")
        return "tensorflow" if tf is not None and tf.is_tensor(x) else None
    return None


def to_numpy(x: Any) -> Any:
    """Any backend's tensor as a NumPy array (bfloat16 via ml_dtypes); others via ``np.asarray``."""
    import numpy as np

    kind = detect(x)
    if kind is None:
        return np.asarray(x)
    return load(kind)().to_numpy(x)


def check_framework(xp: Backend, name: str, value: Any, move: str | None = None) -> str | None:
    """The framework of ``value`` (None for lists, scalars and other Python objects), or a
    BackendError when it is another framework's tensor or lives on another device
    (``move``: how to move it, for the message; default ``{name}.to(q.device)``)."""
    kind = detect(value)
    if kind not in (None, "numpy", xp.name):
        raise BackendError(
            f"{name} is a {kind} tensor, but this is posbias.{xp.name}: pass {xp.name} "
            f"tensors (or NumPy arrays), or use posbias.{kind}."
        )
    if kind == xp.name and kind != "numpy":
        elsewhere = xp.on_other_device(value)
        if elsewhere is not None:
            raise BackendError(
                f"{name} is on {elsewhere} but the computation is on {xp.device}; move it "
                f"first (e.g. {move or f'{name}.to(q.device)'})."
            )
    return kind
