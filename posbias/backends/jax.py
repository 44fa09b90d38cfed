"""JAX backend (works on concrete arrays and under ``jax.jit`` tracing)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..errors import BackendError
from ._base import NAMES, Backend, check_dtype_name, is_seed, rng_error


def _x64() -> bool:
    return bool(jax.config.jax_enable_x64)


class JaxBackend(Backend):
    name = "jax"
    xp = jnp

    def native_dtype(self, name: str) -> Any:
        name = check_dtype_name(name, NAMES)
        if name in ("float64", "int64") and not _x64():
            if name == "int64":
                return jnp.int32
            raise BackendError(
                "float64 on JAX needs 64-bit mode; enable it with "
                "jax.config.update('jax_enable_x64', True) or ask for dtype='float32'."
            )
        return jnp.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else jnp.dtype(name)

    def dtype_name(self, dtype: Any) -> str | None:
        try:
            return jnp.dtype(dtype).name
        except TypeError:
            return None

    def after(self, done, x):
        # XLA drops optimization barriers on CPU; a data dependency it cannot fold
        # (x + 0·done: 0·v is not 0 for floats) orders the blocks instead.
        # ``done`` may be a list: everything in it is computed first
        tie = sum(d[(0,) * d.ndim] * 0 for d in (done if isinstance(done, list) else [done]))
        # integers (positions) get 0 from a comparison: 0·NaN would not cast to 0
        return [
            t + (tie.astype(t.dtype) if jnp.issubdtype(t.dtype, jnp.floating) else (tie > 1))
            for t in x
        ]

    @property
    def max_position(self) -> int:  # type: ignore[override]
        return 1 << 40 if _x64() else 1 << 30

    @property
    def position_limit_hint(self) -> str:  # type: ignore[override]
        if _x64():
            return "positions and offsets are limited to 2^40"
        return (
            "JAX without x64 holds integers in int32, so positions and offsets are limited to "
            "2^30; enable jax.config.update('jax_enable_x64', True) for up to 2^40"
        )

    @classmethod
    def check_device(cls, device: Any) -> Any:
        if isinstance(device, jax.Device):
            return device
        if isinstance(device, str):
            try:
                return jax.devices(device)[0]  # a platform name: "cpu", "gpu", "tpu"
            except RuntimeError:
                pass
        raise BackendError(
            f"device={device!r} is not a JAX device here; pass one of jax.devices() "
            f"({', '.join(str(d) for d in jax.devices())}) or a platform name such as 'cpu'."
        )

    def supports(self, name: str) -> bool:
        return name != "float64" or _x64()

    def from_numpy(self, array: np.ndarray) -> Any:
        array = np.asarray(array)
        if array.dtype == np.int64 and not _x64():
            array = array.astype(np.int32)
        if self.device is not None:
            return jax.device_put(array, self.device)
        return jnp.asarray(array)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def cast(self, x: Any, name: str) -> Any:
        return jnp.asarray(x).astype(self.native_dtype(name))

    def is_integer(self, x: Any) -> bool:
        return jnp.issubdtype(x.dtype, jnp.integer)

    def sigmoid(self, x):
        return jax.nn.sigmoid(x)

    def relu(self, x):
        return jax.nn.relu(x)

    def einsum(self, equation, *operands):
        # JAX's default float32 matmul precision on GPUs/TPUs is TF32/bf16 passes;
        # ask for full float32 so results match the other frameworks.
        return jnp.einsum(equation, *operands, precision=jax.lax.Precision.HIGHEST)

    def matmul(self, a, b):
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)

    rng_kinds = "a jax.random.key(...) (JAX has no global RNG) or an int seed"

    def uniform(self, rng: Any, shape: tuple[int, ...]) -> Any:
        if is_seed(rng):
            rng = jax.random.key(int(rng))
        elif not _is_key(rng):
            raise rng_error(self, rng)
        return jax.random.uniform(rng, shape, jnp.float32)

    def is_concrete(self, x) -> bool:
        return not isinstance(x, jax.core.Tracer)

    autodiff = True

    def stop_gradient(self, x):
        return jax.lax.stop_gradient(x)

    def custom_gradient(self, forward, backward, recompute=None):
        # JAX differentiates the backward itself (it is written in jax operations)
        @jax.custom_vjp
        def fn(*inputs):
            return forward(*inputs)[0]

        fn.defvjp(forward, lambda saved, cotangents: tuple(backward(saved, cotangents)))
        return fn

    def vjp(self, fn, params):
        value, pullback = jax.vjp(fn, dict(params))
        return value, lambda cotangent: pullback(cotangent)[0]


def _is_key(x: Any) -> bool:
    """A JAX PRNG key: typed (``jax.random.key``) or raw ``uint32[2]`` (``PRNGKey``)."""
    if not isinstance(x, jax.Array):
        return False
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x.shape == ()
    return x.dtype == jnp.uint32 and x.shape == (2,)
