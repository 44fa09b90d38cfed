"""Which posbias engine a Keras layer computes with, and Keras' mask attribute.

Under each Keras backend a layer's tensors are that framework's native
tensors (``jax.Array``, ``torch.Tensor``, ``tf.Tensor``), so the layers call
the posbias engine of that framework: :func:`backend_for` imports its front
door (``posbias.torch`` registers its SDPA tiles with the dispatcher) and
returns the op vocabulary bound to the tensor's device.
"""

from __future__ import annotations

from typing import Any

import keras

from ..backends import Backend
from ..errors import BackendError

#: Keras backends posbias.keras computes on
SUPPORTED = ("jax", "tensorflow", "torch")

try:  # Keras' own mask attribute helpers (they know how each backend stores it)
    from keras.src.backend.common.masking import get_keras_mask, set_keras_mask
except ImportError:  # pragma: no cover - older/newer Keras layouts

    def get_keras_mask(x: Any) -> Any:
        return getattr(x, "_keras_mask", None)

    def set_keras_mask(x: Any, mask: Any) -> None:
        try:
            x._keras_mask = mask
        except AttributeError:
            pass


def keras_backend() -> str:
    """The name of Keras' backend, or a BackendError when posbias cannot compute on it."""
    name = keras.backend.backend()
    if name not in SUPPORTED:
        raise BackendError(
            f"posbias.keras layers run on Keras' {', '.join(SUPPORTED)} backends, but Keras "
            f"runs on {name!r}; set KERAS_BACKEND to one of them before importing keras."
        )
    return name


def backend_for(x: Any = None) -> Backend:
    """The posbias backend of Keras' backend, on the device of the native tensor ``x``."""
    name = keras_backend()
    # importing the front door registers that framework's kernels with the dispatcher
    if name == "torch":
        from .. import torch as front
        from ..backends.torch import TorchBackend

        backend: Backend = TorchBackend(getattr(x, "device", None))
    elif name == "jax":
        from .. import jax as front
        from ..backends.jax import JaxBackend

        backend = JaxBackend()
    else:
        from .. import tensorflow as front
        from ..backends.tensorflow import TensorflowBackend

        backend = TensorflowBackend()
    assert front.attention is not None  # the import is the point
    return backend
