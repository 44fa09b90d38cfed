"""TensorFlow backend (eager and inside ``tf.function``)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import tensorflow as tf

from ._base import Backend, check_dtype_name

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
        # a Python float becomes a constant of the other operand's dtype directly:
        # tf.cast would go through float32 first (finfo(float64).min overflows)
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
        if b.shape.rank == 2 and a.shape.rank != 2:
            # (..., n, k) @ (k, m) as one 2-D product: TF 2.21's broadcasting matmul
            # returns garbage for some shapes with a size-1 axis, e.g. (2, 1, 13, 32) @ (32, 4)
            flat = tf.linalg.matmul(tf.reshape(a, [-1, tf.shape(a)[-1]]), b)
            return tf.reshape(flat, tf.concat([tf.shape(a)[:-1], tf.shape(b)[-1:]], 0))
        return tf.linalg.matmul(a, b)

    def einsum(self, equation, *operands):
        return tf.einsum(equation, *operands)

    def cumsum(self, x, axis):
        return tf.math.cumsum(x, axis=axis)

    def amax(self, x, axis, keepdims=False):
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def sum_keepdims(self, x, axis):
        return tf.reduce_sum(x, axis=axis, keepdims=True)

    def zeros(self, shape, dtype):
        with self._placed():
            return tf.zeros(shape, dtype=self.native_dtype(dtype))

    def is_concrete(self, x) -> bool:
        return tf.executing_eagerly()

    autodiff = True

    def custom_gradient(self, forward, backward):
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

        return fn

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
