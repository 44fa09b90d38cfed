"""NumPy: the float64 reference attention.

    >>> import numpy as np
    >>> from posbias.numpy import attention
    >>> q = k = v = np.ones((1, 2, 3, 4))
    >>> attention(q, k, v, bias="alibi", causal=True).shape
    (1, 2, 3, 4)

Layout ``(B, H, L, D)`` like PyTorch's SDPA. Inputs are computed in float64
(the reference); the output is float64.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from ._core import conventions
from ._core import dispatch as _dispatch
from ._core import layers as _layers
from ._core import problem as _problem
from .backends.numpy import NumpyBackend
from .errors import InvalidTypeError

__all__ = ["MultiHeadAttention", "PositionalBias", "attention"]


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
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
) -> np.ndarray:
    """The float64 reference attention with an additive positional bias, layout ``(B, H, L, D)``.

    ``out = softmax(q·kᵀ·scale + bias[h, i, j] + mask)·v``: the bias is added
    after the scaling (ALiBi, Press et al. 2022, arXiv:2108.12409; as in
    FlashAttention, BLOOM and MPT). Everything is computed in float64 from the
    given floating inputs: this is the reference the other frameworks are
    checked against (``posbias parity``).

    Args:
        q: ``(B, H, Lq, D)`` floating queries.
        k: ``(B, H_kv, Lk, D)`` keys; ``H`` a multiple of ``H_kv`` (grouped-query attention).
        v: ``(B, H_kv, Lk, D)`` values.
        bias: a registered name (built with ``H`` heads), a ``BiasSpec``, its
            config dict, a callable ``bias(q_pos=, k_pos=, dtype=)`` or None. Its
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
        attn_mask: ``(B, H, Lq, Lk)`` or broadcastable (PyTorch SDPA's rule):
            bool with True = takes part, or additive float (``-inf`` hides a
            pair exactly like False). Combined with ``causal``/``key_mask``;
            positions unchanged; rows it hides completely are 0.
        log_gates: ``(B, H, Lk)`` floating per-token log-gates ``g <= 0`` (one per
            query head and key slot; FoX ``logsigmoid``, CABLE ``-softplus``): adds
            ``Σ_{s=j+1..i} g[s]`` for key slot ``j <= i`` (the query's own slot ``i``),
            on top of ``bias`` (data-dependent ALiBi, docs/gates.md). Computed in float32
            without subtracting large cumulative sums; padded keys contribute 0; gradients
            flow to it. Queries must sit at key slots (``0 <= q_offset <= Lk - Lq``).
        log_gates_after: ``(B, H, Lk)`` log-gates of keys after the query, for
            ``causal=False`` (required there with ``log_gates``): adds
            ``Σ_{s=i+1..j} g'[s]`` for ``j > i``.
        dropout_p: attention dropout probability in ``[0, 1)`` (zeroed
            probabilities, survivors scaled by ``1 / (1 - dropout_p)``); the
            reference computes the ``(B, H, Lq, Lk)`` probabilities anyway.
        dropout_rng: None (fresh entropy), an int seed or a
            ``numpy.random.Generator``.
        implementation: ``"auto"`` (= ``"reference"``), ``"reference"`` or ``"blockwise"``.
        block_size: query rows per block (default 256).

    Returns:
        ``(B, H, Lq, D)`` float64. A query row with no visible key is 0.

    Raises:
        InvalidTypeError: a non-floating ``q``/``k``/``v``, a mask of the wrong
            dtype, a non-bool ``causal``, ``key_padding_mask=`` (use ``key_mask``).
        InvalidArgumentError: shapes that disagree, a bias of another head
            count, a bad ``scale``, offset or position array, an implementation
            that cannot run; an ``attn_mask`` that does not broadcast or holds NaN or ``+inf``.
        BackendError: tensors of another framework.

    Example:
        >>> import numpy as np, posbias.numpy
        >>> q = k = v = np.ones((1, 4, 6, 8), np.float32)
        >>> out = posbias.numpy.attention(q, k, v, "alibi", causal=True)
        >>> out.shape, out.dtype
        ((1, 4, 6, 8), dtype('float64'))
    """
    return _dispatch.attention(
        "numpy",
        "bhld",
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
        compute_dtype="float64",
        out_dtype="float64",
    )


class PositionalBias(_layers.BiasParamsMixin):
    """The bias with its learnable parameters, in NumPy: ``pb(q_len, k_len)`` → ``(H, Lq, Lk)``.

    The float64 reference of :class:`posbias.torch.PositionalBias` and its JAX
    and Keras twins: same arguments, same seeded initialisation, same portable
    parameters (``export_params()`` / ``load_params()``).

    Args:
        bias: registered name, ``BiasSpec`` or config dict.
        num_heads: head count when ``bias`` is a name.
        seed: seed of the NumPy initialisation of learnable parameters
            (a non-negative int).
        **hyper: hyper-parameters of the named bias.

    Learnable parameters live in ``pb.params`` as float64 arrays holding
    float32 values: ``spec.init_params(seed)`` rounded to float32 as the other
    frameworks store them, or the float32 values given to ``load_params``.
    So the reference computes, in float64, with exactly the parameters the
    float32 frameworks hold.

    Call: ``pb(q_len=None, k_len=None, *, q_pos=None, k_pos=None, q_offset=None,
    k_offset=None, heads=None, dtype="float64")`` with the arguments of
    :meth:`posbias.BiasSpec.bias`; returns a NumPy array ``(h, Lq, Lk)`` (or
    ``(B, h, Lq, Lk)`` for batched positions) of ``dtype`` (default float64:
    this is the reference).

    Raises:
        InvalidTypeError: ``seed`` is not an int.
        InvalidArgumentError: ``seed`` is negative; bad bias arguments.

    Example:
        >>> pb = PositionalBias("kerple_log", 2, seed=0)
        >>> sorted(pb.export_params())
        ['r1', 'r2']
        >>> pb.load_params({"r1": [1.0, 2.0], "r2": [1.0, 1.0]})
        >>> pb(1, 3).round(4).tolist()
        [[[-1.0986, -0.6931, 0.0]], [[-2.1972, -1.3863, 0.0]]]
    """

    def __init__(
        self, bias: Any = "alibi", num_heads: int | None = None, *, seed: int = 0, **hyper: Any
    ) -> None:
        self.spec = _layers.make_spec(bias, num_heads, hyper)
        self.params: dict[str, np.ndarray] = {}
        self._write_params(self._initial_params(seed))

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
        dtype: Any = "float64",
    ) -> np.ndarray:
        return self._bias("numpy", q_len, k_len, q_pos, k_pos, q_offset, k_offset, heads, dtype)

    def _read_param(self, name: str) -> np.ndarray:
        return self.params[name]

    def _write_param(self, name: str, value: np.ndarray) -> None:
        self.params[name] = np.asarray(value, dtype=np.float32).astype(np.float64)

    def __repr__(self) -> str:
        return f"PositionalBias({self.spec!r})"


class MultiHeadAttention(_layers.PortableWeightsMixin):
    """Float64 reference of the multi-head attention layers (no training).

    Holds portable weights and computes exactly what
    :class:`posbias.torch.MultiHeadAttention`, :class:`posbias.jax.MultiHeadAttention`
    and :class:`posbias.tensorflow.MultiHeadAttention` compute, in float64.
    Arguments and call as there (``mha(x, key=None, value=None, *, key_mask=None,
    segment_ids=None, attn_mask=None, need_weights=False)``: ``key``/``value``
    make it cross-attention, ``need_weights=True`` also returns the
    ``(B, H, Lq, Lk)`` probabilities); ``layer.positional_bias`` is a :class:`PositionalBias`
    (seeded like the other frameworks' layers) or None, and
    ``portable_weights()`` / ``load_portable_weights()`` carry its learnable
    parameters too. ``gate="forgetting"`` / ``"cable"`` is the frameworks'
    forget gate (FoX, arXiv:2503.02130; CABLE, arXiv:2503.08067), its
    ``"gate.kernel"`` / ``"gate.bias"`` projection computed in float64 here.

    Example:
        >>> import numpy as np
        >>> mha = MultiHeadAttention(16, 4, causal=True, num_kv_heads=2)
        >>> mha(np.ones((1, 5, 16))).shape
        (1, 5, 16)
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
        gate: str | None = None,
        **removed: Any,
    ) -> None:
        if "dropout" in removed:
            raise InvalidTypeError(
                "posbias.numpy.MultiHeadAttention has no dropout (it is the float64 "
                "reference, for inference and parity checks): use a framework's layer."
            )
        conventions.reject_unknown(
            "posbias.numpy.MultiHeadAttention", removed, inspect.signature(type(self)).parameters
        )
        self.mha_config = _layers.MHAConfig.create(
            embed_dim,
            num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            causal=causal,
            use_bias=use_bias,
            implementation=implementation,
            block_size=block_size,
            gate=gate,
        )
        self.positional_bias = _layers.layer_bias(
            bias, num_heads, PositionalBias, lambda: PositionalBias(bias, num_heads, seed=seed)
        )
        self.weights: dict[str, np.ndarray] = {}
        self._init_projections(seed)

    def _read_projection(self, name: str) -> tuple[Any, Any]:
        return self.weights[f"{name}.kernel"], self.weights.get(f"{name}.bias")

    def _write_projection(self, name: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        self.weights[f"{name}.kernel"] = kernel
        if bias is not None:
            self.weights[f"{name}.bias"] = bias

    def _project(self, name: str, x: np.ndarray) -> np.ndarray:
        out = x.astype(np.float64) @ self.weights[f"{name}.kernel"].astype(np.float64)
        bias = self.weights.get(f"{name}.bias")  # use_bias=True, and always for the gate
        return out if bias is None else out + bias.astype(np.float64)

    def _backend(self) -> NumpyBackend:
        return NumpyBackend()

    def init_cache(self, batch_size: int, capacity: int) -> _problem.KVCache:
        return _layers.init_cache(NumpyBackend(), self.mha_config, batch_size, capacity, "float64")

    def __call__(
        self,
        x: Any,
        key: Any = None,
        value: Any = None,
        *,
        key_mask: Any = None,
        segment_ids: Any = None,
        attn_mask: Any = None,
        cache: _problem.KVCache | None = None,
        need_weights: bool = False,
        **removed: Any,
    ) -> Any:
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
            need_weights=need_weights,
            removed=removed,
        )
