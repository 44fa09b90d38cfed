"""JAX layers (Flax NNX): ``PositionalBias``, ``MultiHeadAttention`` and ``attention``.

    >>> import jax.numpy as jnp
    >>> from posbias.jax import MultiHeadAttention
    >>> mha = MultiHeadAttention(64, 8, bias="alibi", causal=True)
    >>> mha(jnp.ones((2, 10, 64))).shape
    (2, 10, 64)

Layout of :func:`attention`: ``(B, L, H, D)``, like ``jax.nn.dot_product_attention``.
Everything works under ``jax.jit`` / ``nnx.jit``, ``jax.grad`` and ``jax.vmap``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .._core import dispatch as _dispatch
from .._core import layers as _layers
from .._core import problem as _problem
from ..backends.jax import JaxBackend
from ..spec import BiasSpec
from ._sharded import sharded_attention, unzigzag, zigzag

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "PositionalBias",
    "attention",
    "sharded_attention",
    "unzigzag",
    "zigzag",
]

KVCache = _problem.KVCache

attention = _dispatch.functional("jax", "blhd")
attention.__module__ = __name__  # documented here (API reference)
attention.__doc__ = """Attention with an additive positional bias, layout ``(B, L, H, D)``.

Same arguments and rules as :func:`posbias.torch.attention` (see there): bias
added after scaling, float32 scores and softmax, output in the input dtype,
grouped-query attention, ``causal``, ``q_offset``, ``key_padding_mask``,
``segment_ids``, ``scale``, ``q_pos``/``k_pos``; rows with no visible key
return zeros.
"""


class PositionalBias(_layers.BiasParamsMixin, nnx.Module):
    """The bias as an NNX module: ``bias_module(q_len, k_len)`` → ``(H, Lq, Lk)`` float32.

    Args:
        bias: registered name, ``BiasSpec`` or config dict.
        num_heads: head count when ``bias`` is a name.
        seed: seed of the NumPy initialisation of learnable parameters.
        **hyper: hyper-parameters of the named bias.

    Learnable variants hold their parameters as ``nnx.Param`` attributes named
    ``param_<name>`` (``export_params()`` / ``load_params()`` move them to and
    from a portable ``dict`` of NumPy arrays).
    """

    def __init__(
        self, bias: Any = "alibi", num_heads: int | None = None, *, seed: int = 0, **hyper: Any
    ) -> None:
        self.spec: BiasSpec = _layers.make_spec(bias, num_heads, hyper)
        for name, value in self.spec.init_params(seed).items():
            setattr(self, f"param_{name}", nnx.Param(jnp.asarray(value, jnp.float32)))

    def __call__(
        self,
        q_len: int | None = None,
        k_len: int | None = None,
        *,
        q_pos: Any = None,
        k_pos: Any = None,
        q_offset: Any = None,
        k_offset: Any = None,
        heads: Any = None,
        dtype: Any = jnp.float32,
    ) -> jnp.ndarray:
        return self.spec.bias(
            q_len,
            k_len,
            q_pos=q_pos,
            k_pos=k_pos,
            q_offset=q_offset,
            k_offset=k_offset,
            heads=heads,
            dtype=dtype,
            backend="jax",
            params=self.native_params(),
        )

    def _read_param(self, name: str) -> jnp.ndarray:
        return getattr(self, f"param_{name}").get_value()

    def _write_param(self, name: str, value: np.ndarray) -> None:
        getattr(self, f"param_{name}").set_value(jnp.asarray(value, jnp.float32))


class MultiHeadAttention(_layers.PortableWeightsMixin, nnx.Module):
    """Multi-head self-attention with a positional bias, GQA and a KV cache (Flax NNX).

    Arguments as in :class:`posbias.torch.MultiHeadAttention`; ``seed`` seeds the
    NumPy initialisation shared by every framework; ``param_dtype`` is the
    parameters' dtype; ``precision`` is the projections' matmul precision
    (default ``"highest"``: true float32 on GPUs/TPUs, where JAX's default is
    TF32 / bf16 passes; pass ``None`` for JAX's default).

    Example:
        >>> import jax.numpy as jnp
        >>> mha = MultiHeadAttention(32, 4, causal=True, num_kv_heads=2)
        >>> x = jnp.arange(6 * 32, dtype=jnp.float32).reshape(1, 6, 32) / 100
        >>> cache = mha.init_cache(batch_size=1, capacity=8)
        >>> y1, cache = mha(x[:, :4], cache=cache)
        >>> y2, cache = mha(x[:, 4:], cache=cache)
        >>> bool(jnp.allclose(jnp.concatenate([y1, y2], 1), mha(x), atol=1e-5))
        True
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        bias: Any = "alibi",
        *,
        causal: bool = False,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        use_bias: bool = True,
        implementation: str = "auto",
        block_size: int | None = None,
        seed: int = 0,
        param_dtype: Any = jnp.float32,
        precision: Any = "highest",
    ) -> None:
        self.mha_config = _layers.MHAConfig.create(
            embed_dim,
            num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            causal=causal,
            use_bias=use_bias,
            implementation=implementation,
            block_size=block_size,
        )
        shapes = self.mha_config.shapes()
        rngs = nnx.Rngs(seed)
        for name in _layers.PROJECTIONS:
            fan_in, fan_out = shapes[f"{name}.kernel"]
            setattr(
                self,
                f"{name}_proj",
                nnx.Linear(
                    fan_in,
                    fan_out,
                    use_bias=use_bias,
                    param_dtype=param_dtype,
                    precision=precision,
                    rngs=rngs,
                ),
            )
        self.bias = None if bias is None else PositionalBias(bias, num_heads, seed=seed)
        self.load_portable_weights(_layers.init_weights(self.mha_config, seed))

    def __call__(
        self,
        x: jnp.ndarray,
        *,
        key_padding_mask: Any = None,
        segment_ids: Any = None,
        cache: KVCache | None = None,
    ) -> Any:
        return _layers.mha_forward(
            JaxBackend(),
            self.mha_config,
            self._project,
            x,
            self.bias,
            key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
            cache=cache,
        )

    def _project(self, name: str, x: jnp.ndarray) -> jnp.ndarray:
        return getattr(self, f"{name}_proj")(x)

    def init_cache(self, batch_size: int, capacity: int, dtype: Any = None) -> KVCache:
        """An empty KV cache (dtype: the parameters' dtype by default)."""
        name = JaxBackend().dtype_name(dtype or self.q_proj.kernel.get_value().dtype)
        return _layers.init_cache(JaxBackend(), self.mha_config, batch_size, capacity, name)

    def _read_projection(self, name: str) -> tuple[Any, Any]:
        layer = getattr(self, f"{name}_proj")
        bias = None if layer.bias is None else layer.bias.get_value()
        return layer.kernel.get_value(), bias

    def _write_projection(self, name: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        layer = getattr(self, f"{name}_proj")
        layer.kernel.set_value(jnp.asarray(kernel, layer.kernel.get_value().dtype))
        if layer.bias is not None:
            layer.bias.set_value(jnp.asarray(bias, layer.bias.get_value().dtype))
