"""Reading ``posbias.keras.MultiHeadAttention``'s Keras-style constructor arguments."""

from __future__ import annotations

from typing import Any

import keras

from .._core.checks import check_int
from ..errors import InvalidArgumentError

#: keras.layers.MultiHeadAttention arguments this layer does not take, and why
UNSUPPORTED = {
    "sliding_window": "a sliding window is a mask posbias does not build yet; use "
    "keras.layers.MultiHeadAttention for it",
    "flash_attention": "posbias chooses its kernel with implementation= ('auto' picks the "
    "fastest exact one)",
    "use_gate": "gated attention is not supported",
}
#: keras.layers.Layer keyword arguments passed through
LAYER_KEYWORDS = (
    "name",
    "dtype",
    "trainable",
    "autocast",
    "activity_regularizer",
    "input_shape",
    "input_dim",
    "batch_input_shape",
    "batch_size",
)
CALL_KEYWORDS = (
    "key",
    "query_mask",
    "value_mask",
    "key_mask",
    "attention_mask",
    "return_attention_scores",
    "training",
    "use_causal_mask",
)
#: portable projection names -> Keras sublayer names
PROJECTIONS = {"q": "query", "k": "key", "v": "value", "o": "attention_output"}


def keras_object(kind: str, name: str, value: Any) -> Any:
    """``keras.<kind>.get(value)`` with posbias's error naming the argument."""
    try:
        return getattr(keras, kind).get(value)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"{name}={value!r} is not a Keras {kind[:-1]}: {exc}") from None


def serialize(kind: str, value: Any) -> Any:
    return None if value is None else getattr(keras, kind).serialize(value)


def output_dim(output_shape: Any) -> int | None:
    if output_shape is None:
        return None
    if isinstance(output_shape, (tuple, list)) and len(output_shape) == 1:
        output_shape = output_shape[0]
    if isinstance(output_shape, (tuple, list)):
        raise InvalidArgumentError(
            f"output_shape must be an int (or a 1-tuple): posbias.keras projects to one "
            f"feature axis, got {output_shape!r}."
        )
    return check_int("output_shape", output_shape, minimum=1)


def attention_axes(axes: Any) -> Any:
    if axes is None:
        return None
    items = list(axes) if isinstance(axes, (tuple, list)) else [axes]
    if len(items) != 1 or not all(isinstance(a, int) and not isinstance(a, bool) for a in items):
        raise InvalidArgumentError(
            f"attention_axes must be None or the sequence axis (1) of (B, L, E) inputs, got "
            f"{axes!r}; posbias.keras attends over one sequence axis."
        )
    if items[0] not in (1, -2):
        raise InvalidArgumentError(
            f"attention_axes={axes!r}: posbias.keras attends over the sequence axis of "
            "(B, L, E) inputs only (attention_axes=None or 1)."
        )
    return (1,)
