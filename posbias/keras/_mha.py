"""``posbias.keras.MultiHeadAttention``: Keras' ``MultiHeadAttention`` with a positional bias."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from .._core import conventions
from .._core import dispatch as _dispatch
from .._core import layers as _layers
from .._core import masks as _masks
from .._core import weights as _weights
from .._core.checks import check_int, check_num_heads, check_rate
from ..errors import InvalidArgumentError, InvalidTypeError
from . import _args, _engine
from ._bias import PositionalBias


@keras.saving.register_keras_serializable(package="posbias.keras")
class MultiHeadAttention(
    _layers.PosbiasErrorsFromConfig, _layers.PortableWeightsMixin, keras.layers.Layer
):
    """``keras.layers.MultiHeadAttention`` with a positional bias, on every Keras backend.

    ``out = softmax(q·kᵀ/√key_dim + bias[h, i, j] + mask)·v``, then the output
    projection: Keras' projections (``query``, ``key``, ``value``,
    ``attention_output`` ``EinsumDense`` sublayers with Keras' weight shapes, so
    ``set_weights(keras_mha.get_weights())`` works for a parameter-free bias),
    Keras' call convention and masking, and posbias's engine: under each Keras
    backend the attention runs on that framework's blockwise kernel
    (``posbias.jax`` / ``posbias.torch`` / ``posbias.tensorflow``), never
    building the ``(H, Lq, Lk)`` bias.

    Args:
        num_heads: ``H``.
        key_dim: size of each query/key head (``D``; scores are scaled by ``1/√D``).
        value_dim: size of each value head (default ``key_dim``).
        dropout: attention dropout, Keras': the probability in ``[0, 1)`` of
            zeroing each attention probability when called with ``training=True``
            (``fit`` does; the others scaled by ``1 / (1 - dropout)``), with
            ``keras.random.dropout`` and a ``keras.random.SeedGenerator(seed)``.
            While it is on, the exact materialised path runs (``O(B·H·Lq·Lk)``
            memory); ``return_attention_scores`` gives the scores before
            dropout, as Keras does.
        use_bias: biases in the four projections.
        output_shape: output feature size (an int; default: the query's feature size).
        attention_axes: None or 1 (the sequence axis of ``(B, L, E)`` inputs).
        bias: registered name (built with ``H`` heads), ``BiasSpec``, config dict,
            a :class:`PositionalBias` layer (shared) or None; default ``"alibi"``.
        implementation: the attention kernel, as in ``posbias.<framework>.attention``.
        block_size: query rows per block of the blockwise kernel (default 256).
        seed: seed of posbias's NumPy initialisation (kernels Glorot-uniform over
            the portable ``(fan_in, fan_out)`` shapes, biases zero, the positional
            bias from ``spec.init_params(seed)``), identical to the PyTorch, JAX and
            NumPy layers of the same shapes and seed.
        kernel_initializer: a Keras initializer for the projection kernels instead
            of posbias's seeded one (default None: posbias's).
        bias_initializer: a Keras initializer for the projection biases (default zeros).
        kernel_regularizer: as in Keras, for the projection kernels.
        bias_regularizer: as in Keras, for the projection biases.
        kernel_constraint: as in Keras, for the projection kernels.
        bias_constraint: as in Keras, for the projection biases.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype`` policy such as
            ``"mixed_bfloat16"``, ...).

    Call: ``layer(query, value=None, key=None, attention_mask=None,
    return_attention_scores=False, training=None, use_causal_mask=False)`` with
    ``query`` ``(B, Lq, E_q)``, ``value`` ``(B, Lk, E_v)`` (default ``query``:
    self-attention) and ``key`` ``(B, Lk, E_k)`` (default ``value``). Queries
    are aligned bottom-right with the keys (posbias's contract).

    * Masks: Keras masks of ``query``/``value``/``key`` (``Embedding(mask_zero=True)``)
      and ``query_mask``/``value_mask``/``key_mask`` (``(B, L)``, True = real token)
      become posbias's ``key_mask`` (padded keys hidden, bias positions
      ``cumsum(key_mask) - 1``) and masked query rows (their attention output is 0);
      the query's mask is propagated to the output. ``attention_mask``
      ``(B, Lq, Lk)`` must be a padding pattern (rows ⊗ keys, ∧ causal): anything
      else raises eagerly and yields NaN under jit (docs/layers.md).
    * ``use_causal_mask=True``: key ``j`` visible to query ``i`` iff ``j <= i``
      (needs ``Lq == Lk``: Keras aligns a causal mask top-left, posbias bottom-right).
    * ``return_attention_scores=True`` returns ``(out, scores)`` with scores
      ``(B, H, Lq, Lk)``, computed on the exact materialised path.

    The call returns ``(B, Lq, output_shape or E_q)`` in the layer's compute
    dtype (and the scores).

    Raises:
        InvalidArgumentError, InvalidTypeError: bad constructor or call arguments
            (each names the argument), masks of the wrong shape or meaning.
        BackendError: Keras runs on a backend posbias cannot compute on.

    Example:
        >>> import numpy as np
        >>> from posbias.keras import MultiHeadAttention
        >>> mha = MultiHeadAttention(num_heads=2, key_dim=4, bias="alibi")
        >>> x = np.ones((1, 5, 8), "float32")
        >>> tuple(mha(x, x, use_causal_mask=True).shape)
        (1, 5, 8)
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        value_dim: int | None = None,
        dropout: float = 0.0,
        use_bias: bool = True,
        output_shape: Any = None,
        attention_axes: Any = None,
        *,
        bias: Any = "alibi",
        implementation: str = "auto",
        block_size: int | None = None,
        seed: int = 0,
        kernel_initializer: Any = None,
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        kernel_constraint: Any = None,
        bias_constraint: Any = None,
        **kwargs: Any,
    ) -> None:
        _engine.keras_backend()
        for name in kwargs:
            if name in _args.UNSUPPORTED:
                why = _args.UNSUPPORTED[name]
                raise InvalidArgumentError(
                    f"posbias.keras.MultiHeadAttention does not take {name}=: {why}."
                )
        unknown = {k: v for k, v in kwargs.items() if k not in _args.LAYER_KEYWORDS}
        conventions.reject_unknown(
            "MultiHeadAttention",
            unknown,
            (
                "value_dim",
                "use_bias",
                "output_shape",
                "bias",
                "implementation",
                "seed",
                *_args.LAYER_KEYWORDS,
            ),
        )
        super().__init__(**kwargs)
        self.supports_masking = True
        self.num_heads = check_num_heads(num_heads)
        self.key_dim = check_int("key_dim", key_dim, minimum=1)
        self.value_dim = (
            self.key_dim if value_dim is None else check_int("value_dim", value_dim, minimum=1)
        )
        self.dropout = check_rate("dropout", dropout)
        self.use_bias = conventions.check_bool("use_bias", use_bias)
        self.output_dim = _args.output_dim(output_shape)
        self.attention_axes = _args.attention_axes(attention_axes)
        self.implementation = _dispatch.check_implementation(implementation)
        self.block_size = _dispatch.check_block_size(block_size)
        self.seed = _layers.check_seed(seed)
        # Keras' RNG idiom: a seeded generator, so a given seed drops the same weights
        self.dropout_seed = keras.random.SeedGenerator(self.seed) if self.dropout else None
        self.kernel_initializer = (
            None
            if kernel_initializer is None
            else _args.keras_object("initializers", "kernel_initializer", kernel_initializer)
        )
        self.bias_initializer = _args.keras_object(
            "initializers", "bias_initializer", bias_initializer
        )
        self.kernel_regularizer = _args.keras_object(
            "regularizers", "kernel_regularizer", kernel_regularizer
        )
        self.bias_regularizer = _args.keras_object(
            "regularizers", "bias_regularizer", bias_regularizer
        )
        self.kernel_constraint = _args.keras_object(
            "constraints", "kernel_constraint", kernel_constraint
        )
        self.bias_constraint = _args.keras_object("constraints", "bias_constraint", bias_constraint)
        self.positional_bias = _layers.layer_bias(
            bias,
            self.num_heads,
            PositionalBias,
            lambda: PositionalBias(bias, self.num_heads, seed=self.seed, name="positional_bias"),
        )
        self._dims: dict[str, int] | None = None

    # ------------------------------------------------------------------ build
    def build(self, query_shape: Any, value_shape: Any = None, key_shape: Any = None) -> None:
        value_shape = query_shape if value_shape is None else value_shape
        key_shape = value_shape if key_shape is None else key_shape
        dims = {}
        for name, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
            shape = tuple(shape)
            if len(shape) != 3 or shape[-1] is None:
                raise InvalidArgumentError(
                    f"{name} must be (B, L, E) with a known feature size E, got shape {shape}; "
                    "posbias.keras attends over one sequence axis."
                )
            dims[name] = int(shape[-1])
        dims["output"] = self.output_dim or dims["query"]
        self._dims = dims
        heads = self.num_heads
        out_shapes = {
            "q": (None, heads, self.key_dim),
            "k": (None, heads, self.key_dim),
            "v": (None, heads, self.value_dim),
            "o": (None, dims["output"]),
        }
        common = dict(
            kernel_initializer=self.kernel_initializer or "zeros",  # posbias's init follows
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
            dtype=self.dtype_policy,
        )
        self.projections = {}
        for short, name in _args.PROJECTIONS.items():
            output = short == "o"
            layer = keras.layers.EinsumDense(
                "abcd,cde->abe" if output else "abc,cde->abde",
                output_shape=out_shapes[short],
                bias_axes=("e" if output else "de") if self.use_bias else None,
                name=name,
                **common,
            )
            layer.build(
                (None, None, heads, self.value_dim)
                if output
                else (None, None, dims[{"q": "query", "k": "key", "v": "value"}[short]])
            )
            self.projections[short] = layer
        if self.kernel_initializer is None:
            self._init_projections(self.seed)
        self.built = True

    # ------------------------------------------------------------------- call
    def call(
        self,
        query: Any,
        value: Any = None,
        key: Any = None,
        query_mask: Any = None,
        value_mask: Any = None,
        key_mask: Any = None,
        attention_mask: Any = None,
        return_attention_scores: bool = False,
        training: Any = None,
        use_causal_mask: bool = False,
        **removed: Any,
    ) -> Any:
        conventions.reject_unknown("MultiHeadAttention", removed, ("value", *_args.CALL_KEYWORDS))
        causal = conventions.check_bool("use_causal_mask", use_causal_mask)
        want_scores = conventions.check_bool("return_attention_scores", return_attention_scores)
        training = training is not None and conventions.check_bool("training", training)
        own_mask = _engine.get_keras_mask(query)
        query_mask = own_mask if query_mask is None else query_mask
        if value is None:  # self-attention: the query's mask is the value's
            value, value_mask = query, query_mask if value_mask is None else value_mask
        key = value if key is None else key
        xp = _engine.backend_for(query)
        batch, q_len, k_len = self._check_inputs(xp, query, value, key)
        for tensor in (query, value, key):  # masks are handled here, not by the projections
            _engine.set_keras_mask(tensor, None)
        if causal and q_len != k_len:
            raise InvalidArgumentError(
                f"use_causal_mask=True with {q_len} queries and {k_len} keys: Keras aligns a "
                "causal mask top-left, posbias's contract bottom-right, so posbias.keras takes "
                "a causal mask only for equal lengths."
            )
        masks = _masks.read_keras_masks(
            xp,
            batch,
            q_len,
            k_len,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            causal=causal,
        )
        project = self.projections
        q, k, v = project["q"](query), project["k"](key), project["v"](value)
        options = dict(layout="blhd", causal=causal, key_mask=masks.key_mask)
        bias = self.positional_bias
        if bias is not None and not bias.spec.learnable:
            bias = bias.spec  # values are a pure function of positions: cacheable tables
        softmax: list[Any] = []  # Keras returns the scores before dropout

        def drop(probs: Any) -> Any:
            softmax.append(probs)
            return keras.random.dropout(probs, self.dropout, seed=self.dropout_seed)

        dropping = training and self.dropout > 0
        if want_scores or dropping:
            out, scores = _weights.attend_with_weights(
                xp, q, k, v, bias, dropout=drop if dropping else None, **options
            )
            if softmax:
                scores = xp.cast(softmax[0], xp.dtype_name(scores.dtype))
        else:
            out = _dispatch.attend(
                xp,
                q,
                k,
                v,
                bias,
                implementation=self.implementation,
                block_size=self.block_size,
                **options,
            )
        if masks.rows is not None:
            out = xp.where(masks.rows[:, :, None, None], out, 0.0)
            if want_scores:
                scores = xp.where(masks.rows[:, None, :, None], scores, 0.0)
        if masks.expressible is not None:
            out = xp.where(masks.expressible[:, None, None, None], out, float("nan"))
        out = project["o"](out)
        if own_mask is not None or query_mask is not None:
            _engine.set_keras_mask(out, query_mask)
        return (out, scores) if want_scores else out

    def _check_inputs(self, xp: Any, query: Any, value: Any, key: Any) -> tuple[int, int, int]:
        shapes = {}
        for name, tensor in (("query", query), ("value", value), ("key", key)):
            if not (hasattr(tensor, "shape") and hasattr(tensor, "dtype")):
                raise InvalidTypeError(
                    f"{name} must be a (B, L, E) tensor or array, got {type(tensor).__name__}."
                )
            shape = tuple(xp.shape(tensor))
            if len(shape) != 3 or shape[-1] != self._dims[name]:
                raise InvalidArgumentError(
                    f"{name} must have shape (B, L, {self._dims[name]}) (the layer was built "
                    f"for feature size {self._dims[name]}), got {shape}."
                )
            shapes[name] = shape
        if not shapes["query"][0] == shapes["value"][0] == shapes["key"][0]:
            raise InvalidArgumentError(
                "query, value and key disagree on the batch size: "
                f"{shapes['query'][0]}, {shapes['value'][0]}, {shapes['key'][0]}."
            )
        if shapes["value"][1] != shapes["key"][1]:
            raise InvalidArgumentError(
                f"value and key must have the same length, got {shapes['value'][1]} and "
                f"{shapes['key'][1]}."
            )
        return shapes["query"][0], shapes["query"][1], shapes["value"][1]

    @property
    def query_dense(self) -> Any:
        """The query projection, ``EinsumDense`` kernel ``(E_q, H, key_dim)`` (as in Keras)."""
        return self.projections["q"]

    @property
    def key_dense(self) -> Any:
        """The key projection, kernel ``(E_k, H, key_dim)``."""
        return self.projections["k"]

    @property
    def value_dense(self) -> Any:
        """The value projection, kernel ``(E_v, H, value_dim)``."""
        return self.projections["v"]

    @property
    def output_dense(self) -> Any:
        """The output projection, kernel ``(H, value_dim, E_out)``."""
        return self.projections["o"]

    # ------------------------------------------------------------ shapes, spec
    def compute_output_shape(
        self, query_shape: Any, value_shape: Any = None, key_shape: Any = None
    ) -> tuple[Any, ...]:
        query_shape = tuple(query_shape)
        return (*query_shape[:-1], self.output_dim or query_shape[-1])

    def compute_output_spec(
        self,
        query: Any,
        value: Any = None,
        key: Any = None,
        *args: Any,
        return_attention_scores: bool = False,
        **kwargs: Any,
    ) -> Any:
        out = keras.KerasTensor(self.compute_output_shape(query.shape), dtype=self.compute_dtype)
        if not return_attention_scores:
            return out
        k_len = (query if value is None else value).shape[1]
        scores = (query.shape[0], self.num_heads, query.shape[1], k_len)
        return out, keras.KerasTensor(scores, dtype=self.compute_dtype)

    # -------------------------------------------------------- portable weights
    def portable_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of :meth:`portable_weights` (the layer must be built).

        ``q.kernel`` ``(E_q, H·key_dim)``, ``k.kernel`` ``(E_k, H·key_dim)``,
        ``v.kernel`` ``(E_v, H·value_dim)``, ``o.kernel`` ``(H·value_dim, E_out)``,
        their ``*.bias`` with ``use_bias=True``, and ``positional_bias.<name>``.
        For self-attention with ``key_dim = value_dim = E / H`` these are the
        shapes of the PyTorch, JAX and NumPy layers: weights move between them.
        """
        self._require_built()
        d, h = self._dims, self.num_heads
        q, v = h * self.key_dim, h * self.value_dim
        shapes = {
            "q.kernel": (d["query"], q),
            "k.kernel": (d["key"], q),
            "v.kernel": (d["value"], v),
            "o.kernel": (v, d["output"]),
        }
        if self.use_bias:
            shapes.update(
                {"q.bias": (q,), "k.bias": (q,), "v.bias": (v,), "o.bias": (d["output"],)}
            )
        if self.positional_bias is not None:
            for name, shape in self.positional_bias.spec.param_shapes().items():
                shapes[_layers.BIAS_PREFIX + name] = shape
        return shapes

    def _require_built(self) -> None:
        if self._dims is None:
            raise InvalidArgumentError(
                "the layer is not built yet, so its projection shapes are unknown: call it once "
                "or call layer.build(query_shape, value_shape) first."
            )

    def _init_projections(self, seed: Any) -> None:
        shapes = {k: s for k, s in self.portable_shapes().items() if not k.startswith("positional")}
        self._write_projections(_layers.init_from_shapes(shapes, seed))

    def _read_projection(self, name: str) -> tuple[Any, Any]:
        self._require_built()
        layer = self.projections[name]
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        kernel = (
            kernel.reshape(-1, kernel.shape[-1])
            if name == "o"
            else kernel.reshape(kernel.shape[0], -1)
        )
        bias = None if layer.bias is None else keras.ops.convert_to_numpy(layer.bias).reshape(-1)
        return kernel, bias

    def _write_projection(self, name: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        self._require_built()
        layer = self.projections[name]
        layer.kernel.assign(kernel.reshape(layer.kernel.shape))
        if layer.bias is not None:
            layer.bias.assign(bias.reshape(layer.bias.shape))

    # ----------------------------------------------------------------- config
    def get_config(self) -> dict[str, Any]:
        bias = None if self.positional_bias is None else self.positional_bias.spec.to_config()
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "value_dim": self.value_dim,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "output_shape": self.output_dim,
            "attention_axes": self.attention_axes,
            "bias": bias,
            "implementation": self.implementation,
            "block_size": self.block_size,
            "seed": self.seed,
            "kernel_initializer": _args.serialize("initializers", self.kernel_initializer),
            "bias_initializer": _args.serialize("initializers", self.bias_initializer),
            "kernel_regularizer": _args.serialize("regularizers", self.kernel_regularizer),
            "bias_regularizer": _args.serialize("regularizers", self.bias_regularizer),
            "kernel_constraint": _args.serialize("constraints", self.kernel_constraint),
            "bias_constraint": _args.serialize("constraints", self.bias_constraint),
        }
