"""TensorFlow backend (eager and inside ``tf.function``)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import tensorflow as tf

from ..errors import BackendError
from ._base import Backend, check_dtype_name, is_seed, rng_error

_DTYPES = {
    "float64": tf.float64,
    "float32": tf.float32,
    "float16": tf.float16,
    "bfloat16": tf.bfloat16,
    "int64": tf.int64,
    "int32": tf.int32,
    "bool": tf.bool,
}


class TensorflowBackend(Backend):
    name = "tensorflow"
    xp = tf.math

    def native_dtype(self, name: str) -> Any:
        return _DTYPES[check_dtype_name(name, tuple(_DTYPES))]

    def dtype_name(self, dtype: Any) -> str | None:
        if isinstance(dtype, tf.DType):
            return dtype.name
        return None

    @classmethod
    def check_device(cls, device: Any) -> Any:
        if not isinstance(device, str):
            raise BackendError(
                f"device={device!r}: TensorFlow devices are strings such as '/CPU:0'."
            )
        try:
            spec = tf.DeviceSpec.from_string(device)
        except ValueError:
            spec = None
        known = {d.name for d in tf.config.list_logical_devices()}
        matches = spec is not None and any(
            tf.DeviceSpec.from_string(name).device_type == (spec.device_type or "").upper()
            for name in known
        )
        if not matches:
            raise BackendError(f"device={device!r} is not one of this machine's {sorted(known)}.")
        return device

    def _placed(self):
        return tf.device(self.device) if self.device else contextlib.nullcontext()

    def from_numpy(self, array: np.ndarray) -> Any:
        with self._placed():
            return tf.constant(np.asarray(array))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x.numpy())

    def arange(self, n: int) -> Any:
        with self._placed():
            return tf.range(n, dtype=tf.int64)

    def cast(self, x: Any, name: str) -> Any:
        return tf.cast(x, self.native_dtype(name))

    def shape(self, x: Any) -> tuple[int | None, ...]:
        return tuple(x.shape.as_list()) if x.shape.rank is not None else ()

    def is_integer(self, x: Any) -> bool:
        return x.dtype.is_integer

    def device_of(self, x: Any) -> Any:
        return getattr(x, "device", None) or None

    def where(self, cond, a, b):
        # tf.constant(x, dtype), not tf.cast(x): a Python float would first become a float32
        # tensor, and float64 constants such as finfo(float64).min overflow there
        if not tf.is_tensor(a):
            a = tf.constant(a, dtype=b.dtype)
        if not tf.is_tensor(b):
            b = tf.constant(b, dtype=a.dtype)
        return tf.where(cond, a, b)

    def sigmoid(self, x):
        return tf.math.sigmoid(x)

    def relu(self, x):
        return tf.nn.relu(x)

    def take(self, table, index):
        return tf.gather(table, index)

    def take_axis(self, x, index, axis):
        return tf.gather(x, index, axis=axis)

    def stack(self, tensors, axis):
        return tf.stack(tensors, axis=axis)

    def concat(self, tensors, axis):
        return tf.concat(tensors, axis=axis)

    def any(self, x, axis):
        return tf.reduce_any(x, axis=axis)

    def gather_last(self, x, index):
        return tf.gather(x, index, batch_dims=1)

    def sum(self, x, axis):
        return tf.reduce_sum(x, axis=axis)

    def matmul(self, a, b):
        if len(b.shape) == 2:
            # tf.linalg.matmul broadcasting a 2-D b over a's batch axes returned
            # garbage (and corrupted memory) for (2, 1, 13, 32) @ (32, 4) on CPU
            # (TF 2.21, oneDNN); tensordot is one plain 2-D product
            return tf.tensordot(a, b, axes=1)
        return tf.linalg.matmul(a, b)

    def einsum(self, equation, *operands):
        return tf.einsum(equation, *operands)

    def cumsum(self, x, axis):
        return tf.math.cumsum(x, axis=axis)

    def flip(self, x, axis):
        return tf.reverse(x, [axis])

    def take_last(self, x, index):
        return tf.gather(x, index, axis=-1)

    def pad_last(self, x, before: int, after: int):
        return tf.pad(x, [[0, 0]] * (len(x.shape) - 1) + [[before, after]])

    def amax(self, x, axis, keepdims=False):
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def sum_keepdims(self, x, axis):
        return tf.reduce_sum(x, axis=axis, keepdims=True)

    def zeros(self, shape, dtype):
        with self._placed():
            return tf.zeros(shape, dtype=self.native_dtype(dtype))

    rng_kinds = "None (TensorFlow's global RNG), an int seed or a tf.random.Generator"

    def uniform(self, rng: Any, shape: tuple[int, ...]) -> Any:
        with self._placed():
            if rng is None:
                return tf.random.uniform(shape)
            if is_seed(rng):
                return tf.random.stateless_uniform(shape, seed=[int(rng), 0])
            if isinstance(rng, tf.random.Generator):
                return rng.uniform(shape)
        raise rng_error(self, rng)

    def is_concrete(self, x) -> bool:
        return tf.executing_eagerly()

    autodiff = True

    def stop_gradient(self, x):
        return tf.stop_gradient(x)

    def custom_gradient(self, forward, backward, recompute=None):
        @tf.custom_gradient
        def fn(*inputs):
            outputs, saved = forward(*inputs)

            def grad(*cotangents):
                cotangents = tuple(
                    tf.zeros_like(out) if ct is None else ct
                    for out, ct in zip(outputs, cotangents, strict=True)
                )
                return list(backward(saved, cotangents))

            return outputs, grad

        def call(*inputs):
            # a variable read inside fn would need grad_fn(variables=...): read it here, so
            # its gradient flows through the read like any other op's
            return fn(*(tf.identity(x) if _is_variable(x) else x for x in inputs))

        return call

    def vjp(self, fn, params):
        params = dict(params)
        with tf.GradientTape() as tape:
            tape.watch(list(params.values()))
            value = fn(params)

        def pullback(cotangent):
            grads = tape.gradient(value, params, output_gradients=cotangent)
            return {  # gathers give IndexedSlices: dense, so that blocks add up
                n: tf.zeros_like(params[n]) if g is None else tf.convert_to_tensor(g)
                for n, g in grads.items()
            }

        return value, pullback


def _is_variable(x: Any) -> bool:
    """A ``tf.Variable`` or a Keras 3 variable (which wraps one on this backend)."""
    return isinstance(x, tf.Variable) or (hasattr(x, "_value") and hasattr(x, "assign"))
