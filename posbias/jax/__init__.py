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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .._core import conventions as _conventions
from .._core import dispatch as _dispatch
from .._core import layers as _layers
from .._core import problem as _problem
from ..backends.jax import JaxBackend
from ..errors import InvalidArgumentError, InvalidTypeError
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


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
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
) -> jax.Array:
    """Attention with an additive positional bias, layout ``(B, L, H, D)``.

    ``out = softmax(q·kᵀ·scale + bias[h, i, j] + mask)·v``: the bias is added
    after the scaling (ALiBi, Press et al. 2022, arXiv:2108.12409; as in
    FlashAttention, BLOOM and MPT). Scores and softmax are float32 (float64 for
    float64 inputs, with ``jax_enable_x64``); the output has ``q``'s dtype.
    Like ``jax.nn.dot_product_attention``, but the bias is never built as an
    ``(H, Lq, Lk)`` tensor: blocks of query rows are computed one after the
    other with their own bias tile, so XLA's temporary memory stays
    ``O(H·block·Lk)`` (docs/performance.md). Works under ``jax.jit``,
    ``jax.grad`` and ``jax.vmap``.

    Args:
        q: ``(B, Lq, H, D)`` floating queries.
        k: ``(B, Lk, H_kv, D)`` keys; ``H`` a multiple of ``H_kv`` (grouped-query attention).
        v: ``(B, Lk, H_kv, D)`` values.
        bias: a registered name (built with ``H`` heads), a ``BiasSpec``, its
            config dict, a :class:`PositionalBias` module (its parameters get
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
        attn_mask: like ``jax.nn.dot_product_attention``'s ``mask``, head-major
            ``(B, H, Lq, Lk)`` or broadcastable to it (not ``q``'s layout): bool,
            True where the pair takes part, or float, added to the scores (a
            ``-inf`` is a False). Bias positions stay; a fully hidden row gives 0.
        log_gates: ``(B, Lk, H)`` floating per-token log-gates ``g <= 0`` (one per
            query head and key slot; FoX ``logsigmoid``, CABLE ``-softplus``): adds
            ``Σ_{s=j+1..i} g[s]`` for key slot ``j <= i`` (the query's own slot ``i``),
            on top of ``bias`` (data-dependent ALiBi, docs/gates.md). Computed in float32
            without subtracting large cumulative sums; padded keys contribute 0; gradients
            flow to it. Queries must sit at key slots (``0 <= q_offset <= Lk - Lq``).
        log_gates_after: ``(B, Lk, H)`` log-gates of keys after the query, for
            ``causal=False`` (required there with ``log_gates``): adds
            ``Σ_{s=i+1..j} g'[s]`` for ``j > i``.
        dropout_p: attention dropout (SDPA's name) in ``[0, 1)``: each
            probability is zeroed with this probability, the others scaled by
            ``1 / (1 - dropout_p)``; the exact materialised path runs
            (``O(B·H·Lq·Lk)``). 0.0 (the default) is deterministic.
        dropout_rng: a ``jax.random.key`` (or an int seed), required with
            ``dropout_p > 0``: JAX has no global RNG.
        implementation: ``"auto"`` (= ``"blockwise"``), ``"blockwise"``,
            ``"reference"`` or ``"cudnn"`` (GPU fp16/bf16; reads a materialised bias).
        block_size: query rows per block (default 256).

    Returns:
        ``(B, Lq, H, D)`` in ``q``'s dtype. A query row with no visible key is 0.

    Raises:
        InvalidTypeError: a non-floating ``q``/``k``/``v``, a mask of the wrong
            dtype, a non-bool ``causal``, ``key_padding_mask=`` (use ``key_mask``).
        InvalidArgumentError: shapes that disagree, a bias of another head
            count, a bad ``scale``, offset or position array, an implementation
            that cannot run; an ``attn_mask`` not broadcastable, or (outside ``jit``) with NaN or
            ``+inf``.
        BackendError: tensors of another framework.

    Example:
        >>> import jax.numpy as jnp, posbias.jax
        >>> q = k = v = jnp.ones((1, 6, 4, 8))
        >>> out = posbias.jax.attention(q, k, v, "alibi", causal=True)
        >>> out.shape, out.dtype
        ((1, 6, 4, 8), dtype('float32'))
    """
    return _dispatch.attention(
        "jax",
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
        for name, value in self._initial_params(seed).items():
            setattr(self, f"param_{name}", nnx.Param(jnp.asarray(value)))

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
        return self._bias("jax", q_len, k_len, q_pos, k_pos, q_offset, k_offset, heads, dtype)

    def _read_param(self, name: str) -> jnp.ndarray:
        return getattr(self, f"param_{name}").get_value()

    def _write_param(self, name: str, value: np.ndarray) -> None:
        getattr(self, f"param_{name}").set_value(jnp.asarray(value, jnp.float32))


class MultiHeadAttention(_layers.PortableWeightsMixin, nnx.Module):
    """Multi-head self- or cross-attention with a positional bias, GQA and a KV cache (Flax NNX).

    Arguments and ``positional_bias`` attribute (a :class:`PositionalBias` or
    None) as in :class:`posbias.torch.MultiHeadAttention`. Call:
    ``mha(x, inputs_k=None, inputs_v=None, *, key_mask=None, segment_ids=None,
    attn_mask=None)``, Flax's ``MultiHeadAttention`` argument order:
    ``inputs_k``/``inputs_v`` ``(B, Lk, E)`` make it cross-attention (a missing
    ``inputs_k`` is ``x``, a missing ``inputs_v`` is ``inputs_k``), the bias
    aligned bottom-right; ``attn_mask`` plays Flax's ``mask`` (bool
    ``(B, H, Lq, Lk)`` or broadcastable, True = attend) and may also be
    additive (float). ``sow_weights=True`` (Flax's option) sows the
    ``(B, H, Lq, Lk)`` attention probabilities into the ``nnx.Intermediate``
    collection as ``attention_weights`` (``out, sown = nnx.capture(mha,
    nnx.Intermediate)(x, sow_weights=True)``, then
    ``sown["attention_weights"][0]``); they come from the exact path that
    materialises them (``O(B·H·Lq·Lk)`` memory). ``seed`` seeds the
    NumPy initialisation shared by every framework; ``param_dtype`` is the
    parameters' dtype; ``precision`` is the projections' matmul precision
    (default ``"highest"``: true float32 on GPUs/TPUs, where JAX's default is
    TF32 / bf16 passes; pass ``None`` for JAX's default).

    Attention dropout, Flax's way: ``dropout_rate`` in ``[0, 1)`` zeroes each
    attention probability while training (the others scaled by
    ``1 / (1 - dropout_rate)``) with an ``nnx.Dropout`` driven by the
    ``dropout`` stream of ``rngs`` (``MultiHeadAttention(..., rngs=nnx.Rngs(0))``,
    or ``rngs=`` at the call); ``deterministic=True`` (constructor or call) or
    ``mha.eval()`` turns it off, ``mha.train()`` on again. ``rngs`` drives
    dropout only: the parameters come from ``seed`` (the initialisation shared
    by every framework). While dropout is on, the exact materialised path runs
    (``O(B·H·Lq·Lk)`` memory, docs/layers.md).

    ``gate="forgetting"`` (FoX, arXiv:2503.02130) or ``"cable"`` (CABLE,
    arXiv:2503.08067) adds a data-dependent forget gate as in
    :class:`posbias.torch.MultiHeadAttention`: the layer owns ``gate_proj``
    (an ``nnx.Linear(E, H)``, ``2·H`` outputs when ``causal=False``; kernel
    ``N(0, 0.02²)``, bias 0), computed in float32 whatever ``param_dtype`` (the
    input is cast to float32, and ``nnx.Linear`` promotes);
    ``log_gates(x)`` returns its log-gates ``(B, L, H)``, the layout of
    :func:`attention`'s ``log_gates=``.

    Example:
        >>> import jax.numpy as jnp
        >>> mha = MultiHeadAttention(32, 4, causal=True, num_kv_heads=2)
        >>> x = jnp.arange(6 * 32, dtype=jnp.float32).reshape(1, 6, 32) / 100
        >>> cache = mha.init_cache(batch_size=1, capacity=8)
        >>> y1, cache = mha(x[:, :4], cache=cache)
        >>> y2, cache = mha(x[:, 4:], cache=cache)
        >>> bool(jnp.allclose(jnp.concatenate([y1, y2], 1), mha(x), atol=1e-5))
        True
        >>> fox = MultiHeadAttention(32, 4, bias=None, causal=True, gate="forgetting")
        >>> fox(x).shape, fox.log_gates(x).shape      # log_gates: (B, L, H), all <= 0
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
        param_dtype: Any = jnp.float32,
        precision: Any = "highest",
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        rngs: nnx.Rngs | None = None,
        gate: str | None = None,
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
            dropout=dropout_rate,
            dropout_name="dropout_rate",
            gate=gate,
        )
        _check_rngs(rngs)
        # Flax's own dropout (its RNG stream, model.train()/model.eval() toggle `deterministic`)
        self.attention_dropout = nnx.Dropout(
            self.mha_config.dropout,
            deterministic=_conventions.check_bool("deterministic", deterministic),
            rngs=rngs,
        )
        shapes = self.mha_config.shapes()
        rngs = nnx.Rngs(_layers.check_seed(seed))  # a clear error before Flax sees it
        for name in self._projection_names():
            fan_in, fan_out = shapes[f"{name}.kernel"]
            setattr(
                self,
                f"{name}_proj",
                nnx.Linear(
                    fan_in,
                    fan_out,
                    use_bias=f"{name}.bias" in shapes,
                    param_dtype=param_dtype,
                    precision=precision,
                    rngs=rngs,
                ),
            )
        self.positional_bias = _layers.layer_bias(
            bias, num_heads, PositionalBias, lambda: PositionalBias(bias, num_heads, seed=seed)
        )
        self._init_projections(seed)

    def __call__(
        self,
        x: jnp.ndarray,
        inputs_k: Any = None,
        inputs_v: Any = None,
        *,
        key_mask: Any = None,
        segment_ids: Any = None,
        attn_mask: Any = None,
        cache: KVCache | None = None,
        sow_weights: bool = False,
        deterministic: bool | None = None,
        rngs: Any = None,
        **removed: Any,
    ) -> Any:
        if inputs_k is None and inputs_v is not None:  # Flax's own rule
            raise InvalidArgumentError(
                "inputs_v without inputs_k: give inputs_k (alone it serves as key and value) "
                "or both, as flax.nnx.MultiHeadAttention requires."
            )
        drop = self._dropout(deterministic, rngs)
        result = _layers.mha_forward(
            self._backend(),
            self.mha_config,
            self._project,
            x,
            self.positional_bias,
            key=inputs_k,
            value=inputs_v,
            key_mask=key_mask,
            segment_ids=segment_ids,
            attn_mask=attn_mask,
            cache=cache,
            need_weights=sow_weights,
            weights_name="sow_weights",
            dropout=drop,
            removed=removed,
        )
        if sow_weights is not True:
            return result
        out, weights, *new_cache = result
        self.sow(nnx.Intermediate, "attention_weights", weights)
        return (out, *new_cache) if new_cache else out

    def _project(self, name: str, x: jnp.ndarray) -> jnp.ndarray:
        return getattr(self, f"{name}_proj")(x)

    def _backend(self) -> JaxBackend:
        return JaxBackend()

    def _dropout(self, deterministic: Any, rngs: Any) -> Any:
        """The probabilities' dropout of this call, or None (rate 0 or deterministic)."""
        layer = self.attention_dropout
        if deterministic is None:
            deterministic = layer.deterministic
        deterministic = _conventions.check_bool("deterministic", deterministic)
        if deterministic or self.mha_config.dropout == 0:
            return None
        _check_rngs(rngs)
        if rngs is None and layer.rngs is None:
            raise InvalidArgumentError(
                f"dropout_rate={self.mha_config.dropout} while training needs random keys: "
                "pass rngs=nnx.Rngs(dropout=...) to the constructor or the call, or "
                "deterministic=True (mha.eval()) to turn dropout off."
            )
        return lambda probs: layer(probs, deterministic=False, rngs=rngs)

    def init_cache(self, batch_size: int, capacity: int, dtype: Any = None) -> KVCache:
        """An empty KV cache (dtype: the parameters' dtype by default)."""
        dtype = self.q_proj.kernel.get_value().dtype if dtype is None else dtype
        return _layers.init_cache(JaxBackend(), self.mha_config, batch_size, capacity, dtype)

    def _read_projection(self, name: str) -> tuple[Any, Any]:
        layer = getattr(self, f"{name}_proj")
        bias = None if layer.bias is None else layer.bias.get_value()
        return layer.kernel.get_value(), bias

    def _write_projection(self, name: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        layer = getattr(self, f"{name}_proj")
        layer.kernel.set_value(jnp.asarray(kernel, layer.kernel.get_value().dtype))
        if layer.bias is not None:
            layer.bias.set_value(jnp.asarray(bias, layer.bias.get_value().dtype))


def _check_rngs(rngs: Any) -> None:
    """``rngs=`` of the layer or a call: None, an ``nnx.RngStream`` or an ``nnx.Rngs``
    with a ``dropout`` stream (or a ``default`` one, which Flax falls back to)."""
    if rngs is None or isinstance(rngs, nnx.RngStream):
        return
    if not isinstance(rngs, nnx.Rngs):
        raise InvalidTypeError(
            f"rngs must be an nnx.Rngs (its 'dropout' stream drives attention dropout), "
            f"got {type(rngs).__name__}."
        )
    try:
        rngs.dropout  # noqa: B018 (a lookup; no key is drawn)
    except (AttributeError, KeyError):
        raise InvalidArgumentError(
            "rngs has no 'dropout' (or 'default') stream for attention dropout: use "
            "nnx.Rngs(0) or nnx.Rngs(params=..., dropout=...)."
        ) from None
