"""TensorFlow / Keras 3 layers: ``PositionalBias``, ``MultiHeadAttention`` and ``attention``.

    >>> import numpy as np
    >>> from posbias.tensorflow import MultiHeadAttention
    >>> mha = MultiHeadAttention(64, 8, bias="alibi", causal=True)
    >>> tuple(mha(np.ones((2, 10, 64), "float32")).shape)
    (2, 10, 64)

Layout of :func:`attention`: ``(B, L, H, D)``, like ``keras.ops.dot_product_attention``.
The layers run on Keras' TensorFlow backend (the default when TensorFlow is
installed); they serialise with ``get_config`` and in ``.keras`` files, and work
inside ``tf.function(jit_compile=True)`` and ``model.fit``.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ._core import dispatch as _dispatch
from ._core import layers as _layers
from ._core import problem as _problem
from .backends.tensorflow import TensorflowBackend
from .errors import BackendError

__all__ = ["KVCache", "MultiHeadAttention", "PositionalBias", "attention"]

KVCache = _problem.KVCache

attention = _dispatch.functional("tensorflow", "blhd")
attention.__module__ = __name__  # documented here (API reference)
attention.__doc__ = """Attention with an additive positional bias, layout ``(B, L, H, D)``.

Same arguments and rules as :func:`posbias.torch.attention` (see there).
"""


def _check_keras_backend() -> None:
    if keras.backend.backend() != "tensorflow":
        raise BackendError(
            f"posbias.tensorflow layers need Keras' TensorFlow backend, but Keras runs on "
            f"{keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow before importing keras."
        )


@keras.saving.register_keras_serializable(package="posbias")
class PositionalBias(_layers.BiasParamsMixin, keras.layers.Layer):
    """The bias as a Keras layer: ``layer(q_pos, k_pos)`` → ``(H, Lq, Lk)`` float32.

    Args:
        bias: registered name, ``BiasSpec`` or config dict.
        num_heads: head count when ``bias`` is a name.
        bias_options: hyper-parameters of the named bias (a dict).
        seed: seed of the NumPy initialisation of learnable parameters.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ...).

    Learnable variants hold their parameters as float32 Keras weights
    (``export_params()`` / ``load_params()`` move them to and from a portable
    ``dict`` of NumPy arrays); they are saved in ``.keras`` files.
    """

    def __init__(
        self,
        bias: Any = "alibi",
        num_heads: int | None = None,
        bias_options: dict[str, Any] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        _check_keras_backend()
        super().__init__(**kwargs)
        self.spec = _layers.make_spec(bias, num_heads, bias_options or {})
        self.seed = seed
        self.bias_params = {
            name: self.add_weight(
                name=name,
                shape=value.shape,
                initializer="zeros",
                dtype="float32",
                trainable=True,
                autocast=False,
            )
            for name, value in self.spec.init_params(seed).items()
        }
        for name, value in self.spec.init_params(seed).items():
            self.bias_params[name].assign(value.astype(np.float32))
        self.built = True

    def call(
        self,
        q_pos: Any = None,
        k_pos: Any = None,
        *,
        q_len: int | None = None,
        k_len: int | None = None,
        q_offset: Any = None,
        k_offset: Any = None,
        heads: Any = None,
        dtype: Any = "float32",
    ) -> tf.Tensor:
        return self.spec.bias(
            q_len,
            k_len,
            q_pos=q_pos,
            k_pos=k_pos,
            q_offset=q_offset,
            k_offset=k_offset,
            heads=heads,
            dtype=dtype,
            backend="tensorflow",
            params=self.native_params(),
        )

    def _read_param(self, name: str) -> Any:
        return tf.convert_to_tensor(self.bias_params[name])

    def _write_param(self, name: str, value: np.ndarray) -> None:
        self.bias_params[name].assign(value)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "bias": self.spec.to_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="posbias")
class MultiHeadAttention(_layers.PortableWeightsMixin, keras.layers.Layer):
    """Multi-head self-attention with a positional bias, GQA and a KV cache (Keras 3).

    Arguments as in :class:`posbias.torch.MultiHeadAttention`, plus Keras layer
    keyword arguments (``name``, ``dtype`` policy such as ``"mixed_bfloat16"``).

    Call: ``layer(x, key_padding_mask=None, segment_ids=None)``; with ``cache=``
    it returns ``(out, new_cache)`` (see :meth:`init_cache`).
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
        **kwargs: Any,
    ) -> None:
        _check_keras_backend()
        super().__init__(**kwargs)
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
        self.seed = seed
        shapes = self.mha_config.shapes()
        self.projections = {
            name: keras.layers.Dense(
                shapes[f"{name}.kernel"][1],
                use_bias=use_bias,
                name=f"{name}_proj",
                dtype=self.dtype_policy,
            )
            for name in _layers.PROJECTIONS
        }
        for name, layer in self.projections.items():
            setattr(self, f"{name}_proj", layer)
        self.positional_bias = (
            None
            if bias is None
            else PositionalBias(bias, num_heads, seed=seed, name="positional_bias")
        )

    def build(self, input_shape: Any) -> None:
        shapes = self.mha_config.shapes()
        for name, layer in self.projections.items():
            layer.build((None, shapes[f"{name}.kernel"][0]))
        super().build(input_shape)
        self.load_portable_weights(_layers.init_weights(self.mha_config, self.seed))

    def call(
        self,
        x: Any,
        key_padding_mask: Any = None,
        segment_ids: Any = None,
        cache: KVCache | None = None,
    ) -> Any:
        bias = None if self.positional_bias is None else self._bias
        return _layers.mha_forward(
            TensorflowBackend(),
            self.mha_config,
            self._project,
            x,
            bias,
            key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
            cache=cache,
        )

    def _project(self, name: str, x: Any) -> Any:
        return self.projections[name](x)

    def _bias(self, *, q_pos: Any, k_pos: Any, dtype: Any) -> Any:
        return self.positional_bias(q_pos, k_pos, dtype=dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def init_cache(self, batch_size: int, capacity: int, dtype: Any = None) -> KVCache:
        """An empty KV cache (dtype: the layer's compute dtype by default)."""
        name = dtype or self.compute_dtype
        name = name if isinstance(name, str) else TensorflowBackend().dtype_name(name)
        return _layers.init_cache(TensorflowBackend(), self.mha_config, batch_size, capacity, name)

    def _read_projection(self, name: str) -> tuple[Any, Any]:
        self._ensure_built()
        layer = self.projections[name]
        return layer.kernel.numpy(), None if layer.bias is None else layer.bias.numpy()

    def _write_projection(self, name: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        self._ensure_built()
        layer = self.projections[name]
        layer.kernel.assign(kernel)
        if layer.bias is not None:
            layer.bias.assign(bias)

    def _ensure_built(self) -> None:
        if not self.built:
            self.build((None, None, self.mha_config.embed_dim))

    def get_config(self) -> dict[str, Any]:
        cfg = self.mha_config
        bias = None if self.positional_bias is None else self.positional_bias.spec.to_config()
        return {
            **super().get_config(),
            "embed_dim": cfg.embed_dim,
            "num_heads": cfg.num_heads,
            "bias": bias,
            "causal": cfg.causal,
            "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "use_bias": cfg.use_bias,
            "implementation": cfg.implementation,
            "block_size": cfg.block_size,
            "seed": self.seed,
        }
