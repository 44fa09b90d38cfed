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

from ._core import conventions
from ._core import dispatch as _dispatch
from ._core import layers as _layers
from ._core import problem as _problem
from .backends.tensorflow import TensorflowBackend
from .errors import BackendError, InvalidTypeError

__all__ = ["KVCache", "MultiHeadAttention", "PositionalBias", "attention"]

KVCache = _problem.KVCache


# AutoGraph must not rewrite posbias: its Python control flow runs on static values
# at trace time, and a converted function's errors would come back as StagingError
@tf.autograph.experimental.do_not_convert
def attention(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    bias: Any = None,
    *,
    causal: bool = False,
    q_offset: Any = None,
    key_mask: Any = None,
    segment_ids: Any = None,
    scale: float | None = None,
    q_pos: Any = None,
    k_pos: Any = None,
    attn_mask: Any = None,
    log_gates: Any = None,
    log_gates_after: Any = None,
    dropout_p: float = 0.0,
    dropout_rng: Any = None,
    implementation: str = "auto",
    block_size: int | None = None,
    **removed: Any,
) -> tf.Tensor:
    """Attention with an additive positional bias, layout ``(B, L, H, D)``.

    ``out = softmax(q·kᵀ·scale + bias[h, i, j] + mask)·v``: the bias is added
    after the scaling (ALiBi, Press et al. 2022, arXiv:2108.12409; as in
    FlashAttention, BLOOM and MPT). Scores and softmax are float32 (float64 for
    float64 inputs); the output has ``q``'s dtype. Like
    ``keras.ops.dot_product_attention``, but the bias is computed per block of
    query rows, never as an ``(H, Lq, Lk)`` tensor (docs/performance.md).
    Works eagerly, in ``tf.function(jit_compile=True)`` and under
    ``tf.GradientTape``.

    Args:
        q: ``(B, Lq, H, D)`` floating queries.
        k: ``(B, Lk, H_kv, D)`` keys; ``H`` a multiple of ``H_kv`` (grouped-query attention).
        v: ``(B, Lk, H_kv, D)`` values.
        bias: a registered name (built with ``H`` heads), a ``BiasSpec``, its
            config dict, a Keras :class:`PositionalBias` layer (its weights get
            gradients), a callable ``bias(q_pos=, k_pos=, dtype=)`` or None. Its
            head count must be ``H``.
        causal: key slot ``j`` is visible to query slot ``i`` iff ``j <= i``.
        q_offset: slot of the first query: an int or an integer tensor ``(B,)``
            (per-sequence cache lengths); default ``Lk - Lq`` (bottom-right).
        key_mask: ``(B, Lk)`` bool, True for a real key (Keras/Flax/Hugging Face
            polarity; the opposite of ``nn.MultiheadAttention``'s
            ``key_padding_mask``). Padded keys are hidden and bias positions
            come from ``cumsum(key_mask) - 1``.
        segment_ids: ``(B, Lk)`` integer ids of packed sequences: no attention
            across segments, bias positions restart in every segment.
        scale: the factor of ``q·kᵀ``, a finite positive float; default ``1/sqrt(D)``.
        q_pos: ``(Lq,)`` or ``(B, Lq)`` explicit integer bias positions of the
            queries (``(Lq, 2)`` points for 2-D biases); with ``k_pos``.
        k_pos: the same for the keys.
        attn_mask: head-major ``(B, H, Lq, Lk)`` or broadcastable to it, though
            ``q`` is ``(B, L, H, D)``: bool (True: this query sees this key) or
            float added to the scores (``-inf`` hides). It moves no bias
            position; a row with nothing visible outputs 0, never NaN.
        log_gates: ``(B, Lk, H)`` floating per-token log-gates ``g <= 0`` (one per
            query head and key slot; FoX ``logsigmoid``, CABLE ``-softplus``): adds
            ``Σ_{s=j+1..i} g[s]`` for key slot ``j <= i`` (the query's own slot ``i``),
            on top of ``bias`` (data-dependent ALiBi, docs/gates.md). Computed in float32
            without subtracting large cumulative sums; padded keys contribute 0; gradients
            flow to it. Queries must sit at key slots (``0 <= q_offset <= Lk - Lq``).
        log_gates_after: ``(B, Lk, H)`` log-gates of keys after the query, for
            ``causal=False`` (required there with ``log_gates``): adds
            ``Σ_{s=i+1..j} g'[s]`` for ``j > i``.
        dropout_p: attention dropout in ``[0, 1)``, applied whenever > 0:
            probabilities zeroed with this probability, the rest scaled by
            ``1 / (1 - dropout_p)``, on the exact materialised path
            (``O(B·H·Lq·Lk)`` memory).
        dropout_rng: None (TensorFlow's global RNG, ``tf.random.set_seed``), an
            int seed (stateless) or a ``tf.random.Generator``.
        implementation: ``"auto"`` (= ``"blockwise"``), ``"blockwise"`` or ``"reference"``.
        block_size: query rows per block (default 256).

    Returns:
        ``(B, Lq, H, D)`` in ``q``'s dtype. A query row with no visible key is 0.

    Raises:
        InvalidTypeError: a non-floating ``q``/``k``/``v``, a mask of the wrong
            dtype, a non-bool ``causal``, ``key_padding_mask=`` (use ``key_mask``).
        InvalidArgumentError: shapes that disagree, a bias of another head
            count, a bad ``scale``, offset or position array, an implementation
            that cannot run; an ``attn_mask`` of a wrong shape, or (eagerly) holding NaN or
            ``+inf``.
        BackendError: tensors of another framework.

    Example:
        >>> import tensorflow as tf, posbias.tensorflow
        >>> q = k = v = tf.ones((1, 6, 4, 8))
        >>> out = posbias.tensorflow.attention(q, k, v, "alibi", causal=True)
        >>> tuple(out.shape), out.dtype.name
        ((1, 6, 4, 8), 'float32')
    """
    return _dispatch.attention(
        "tensorflow",
        "blhd",
        q,
        k,
        v,
        bias,
        removed,
        causal=causal,
        q_offset=q_offset,
        key_mask=key_mask,
        segment_ids=segment_ids,
        scale=scale,
        q_pos=q_pos,
        k_pos=k_pos,
        attn_mask=attn_mask,
        log_gates=log_gates,
        log_gates_after=log_gates_after,
        dropout_p=dropout_p,
        dropout_rng=dropout_rng,
        implementation=implementation,
        block_size=block_size,
    )


def _check_keras_backend() -> None:
    if keras.backend.backend() != "tensorflow":
        raise BackendError(
            f"posbias.tensorflow layers need Keras' TensorFlow backend, but Keras runs on "
            f"{keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow before importing keras, "
            "or use posbias.keras, whose layers run on every Keras backend."
        )


@keras.saving.register_keras_serializable(package="posbias")
class PositionalBias(
    _layers.PosbiasErrorsFromConfig, _layers.KerasBiasParamsMixin, keras.layers.Layer
):
    """The bias as a Keras layer: ``layer(q_pos, k_pos)`` → ``(H, Lq, Lk)`` float32.

    Args:
        bias: registered name, ``BiasSpec`` or config dict.
        num_heads: head count when ``bias`` is a name.
        bias_options: hyper-parameters of the named bias (a dict).
        seed: seed of the NumPy initialisation of learnable parameters.
        **kwargs: hyper-parameters of the named bias (as in the PyTorch and JAX
            modules, e.g. ``bidirectional=False``) and ``keras.layers.Layer``
            arguments (``name``, ``dtype``, ...).

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
        hyper = _layers.split_bias_keywords(bias, bias_options, kwargs)
        super().__init__(**kwargs)
        self._build_bias_params(bias, num_heads, hyper, seed)

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
        args = (q_len, k_len, q_pos, k_pos, q_offset, k_offset, heads, dtype)
        return self._bias("tensorflow", *args)

    def _read_param(self, name: str) -> Any:
        return tf.convert_to_tensor(self.bias_params[name])


@keras.saving.register_keras_serializable(package="posbias")
class MultiHeadAttention(
    _layers.PosbiasErrorsFromConfig, _layers.PortableWeightsMixin, keras.layers.Layer
):
    """Multi-head self- or cross-attention with a positional bias, GQA and a KV cache (Keras 3).

    Arguments and ``positional_bias`` attribute (a :class:`PositionalBias` layer
    or None) as in :class:`posbias.torch.MultiHeadAttention`, plus Keras layer
    keyword arguments (``name``, ``dtype`` policy such as ``"mixed_bfloat16"``).

    Call: ``layer(x, key_mask=None, segment_ids=None, cache=None, *, value=None,
    key=None, attn_mask=None, return_attention_scores=False)``.
    ``value``/``key`` ``(B, Lk, E)`` (keywords: the second positional argument
    stays ``key_mask``) make it cross-attention, with Keras' rule (a missing
    ``key`` is ``value``) and the bias aligned bottom-right; ``attn_mask`` as in :func:`attention`
    (``(B, H, Lq, Lk)`` or broadcastable, bool True = attend, or additive).
    ``dropout`` (Keras' name) in ``[0, 1)`` zeroes each attention probability
    when called with ``training=True`` (``fit`` does), the others scaled by
    ``1 / (1 - dropout)``, with ``keras.random.dropout`` and a
    ``keras.random.SeedGenerator(seed)`` (the same seed drops the same
    weights); off otherwise. While it is on, the exact materialised path runs
    (``O(B·H·Lq·Lk)`` memory).
    With ``cache=`` (self-attention only) it returns ``(out, new_cache)`` (see
    :meth:`init_cache`). ``return_attention_scores=True`` (Keras' name) also
    returns the ``(B, H, Lq, Lk)`` attention probabilities, ``(out, scores)``
    (``(out, scores, new_cache)`` with a cache), from the exact path that
    materialises them (``O(B·H·Lq·Lk)`` memory).

    ``gate="forgetting"`` (FoX, arXiv:2503.02130) or ``"cable"`` (CABLE,
    arXiv:2503.08067) adds a data-dependent forget gate as in
    :class:`posbias.torch.MultiHeadAttention`: the layer owns ``gate_proj``, a
    float32 ``keras.layers.Dense(H)`` (``2·H`` units when ``causal=False``;
    kernel ``N(0, 0.02²)``, bias 0; float32 also under a ``mixed_bfloat16``
    policy); ``log_gates(x)`` returns its log-gates ``(B, L, H)``, the layout of
    :func:`attention`'s ``log_gates=``.

    Example:
        >>> import numpy as np
        >>> fox = MultiHeadAttention(32, 4, bias=None, causal=True, gate="forgetting")
        >>> x = np.ones((1, 6, 32), np.float32)
        >>> tuple(fox(x).shape), tuple(fox.log_gates(x).shape)   # (B, L, H) gates <= 0
        ((1, 6, 32), (1, 6, 4))
    """

    attention_layout = "blhd"

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
        dropout: float = 0.0,
        gate: str | None = None,
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
            dropout=dropout,
            gate=gate,
        )
        self.seed = _layers.check_seed(seed)
        # Keras' RNG idiom: a seeded generator, so a given seed drops the same weights
        self.dropout_seed = keras.random.SeedGenerator(self.seed) if dropout else None
        shapes = self.mha_config.shapes()
        # the gate in float32 (float64 in a float64 layer), also under a mixed policy
        gate_dtype = "float64" if self.dtype_policy.variable_dtype == "float64" else "float32"
        self.projections = {
            name: keras.layers.Dense(
                shapes[f"{name}.kernel"][1],
                use_bias=f"{name}.bias" in shapes,
                name=f"{name}_proj",
                dtype=gate_dtype if name == "gate" else self.dtype_policy,
            )
            for name in self._projection_names()
        }
        for name, layer in self.projections.items():
            setattr(self, f"{name}_proj", layer)
        self.positional_bias = _layers.layer_bias(
            bias,
            num_heads,
            PositionalBias,
            lambda: PositionalBias(bias, num_heads, seed=seed, name="positional_bias"),
        )

    def build(self, input_shape: Any) -> None:
        shapes = self.mha_config.shapes()
        for name, layer in self.projections.items():
            layer.build((None, shapes[f"{name}.kernel"][0]))
        super().build(input_shape)
        self._init_projections(self.seed)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs.get("x")
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):  # Keras would raise its own
            raise InvalidTypeError(
                f"input must be a (B, L, embed_dim) tensor or array, got {type(x).__name__}."
            )
        second = args[1] if len(args) > 1 else None
        if len(getattr(second, "shape", ())) == 3:  # Keras' mha(query, value) idiom
            raise InvalidTypeError(
                "posbias.tensorflow.MultiHeadAttention is called as layer(x, key_mask=None, "
                "segment_ids=None, cache=None, *, value=None, key=None, attn_mask=None); its "
                "second argument is a (B, L) key_mask, not a value tensor: pass value= (and "
                "key=) by name for cross-attention, or use posbias.keras.MultiHeadAttention "
                "for Keras' layer(query, value, ...) convention."
            )
        return super().__call__(*args, **kwargs)

    def call(
        self,
        x: Any,
        key_mask: Any = None,
        segment_ids: Any = None,
        cache: KVCache | None = None,
        *,
        value: Any = None,
        key: Any = None,
        attn_mask: Any = None,
        return_attention_scores: bool = False,
        training: bool | None = None,
        **removed: Any,
    ) -> Any:
        drop = None
        if training is not None and conventions.check_bool("training", training):
            rate, seed = self.mha_config.dropout, self.dropout_seed
            if rate > 0:

                def drop(probs: Any) -> Any:
                    return keras.random.dropout(probs, rate, seed=seed)

        return _layers.mha_forward(
            self._backend(),
            self.mha_config,
            self._project,
            x,
            self.positional_bias,
            key=key,
            value=value,
            key_mask=key_mask,
            segment_ids=segment_ids,
            attn_mask=attn_mask,
            cache=cache,
            need_weights=return_attention_scores,
            weights_name="return_attention_scores",
            dropout=drop,
            removed=removed,
        )

    def _project(self, name: str, x: Any) -> Any:
        return self.projections[name](x)

    def _backend(self) -> TensorflowBackend:
        return TensorflowBackend()

    def log_gates(self, x: Any) -> Any:
        self._ensure_built()
        return super().log_gates(x)

    log_gates.__doc__ = _layers.PortableWeightsMixin.log_gates.__doc__

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def init_cache(self, batch_size: int, capacity: int, dtype: Any = None) -> KVCache:
        """An empty KV cache (dtype: the layer's compute dtype by default)."""
        dtype = self.compute_dtype if dtype is None else dtype
        return _layers.init_cache(TensorflowBackend(), self.mha_config, batch_size, capacity, dtype)

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
            "dropout": cfg.dropout,
            "gate": cfg.gate,
        }
