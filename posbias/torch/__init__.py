"""PyTorch layers: ``PositionalBias``, ``MultiHeadAttention`` and ``attention``.

    >>> import torch
    >>> from posbias.torch import MultiHeadAttention
    >>> mha = MultiHeadAttention(64, 8, bias="alibi", causal=True)
    >>> mha(torch.randn(2, 10, 64)).shape
    torch.Size([2, 10, 64])

Layout of :func:`attention`: ``(B, H, L, D)``, like
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .._core import dispatch as _dispatch
from .._core import layers as _layers
from .._core import problem as _problem
from .._core.dispatch import Kernel, register_kernel
from ..backends.torch import TorchBackend
from ..spec import BiasSpec
from . import _backward, _flash, _sdpa
from ._flex import gate_score_mod, mask_mod

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "PositionalBias",
    "attention",
    "gate_score_mod",
    "mask_mod",
]

KVCache = _problem.KVCache

register_kernel(
    Kernel("blockwise", "torch", "PyTorch tensors", tile=_sdpa.tile_fn, blocks=_backward.blocks)
)
register_kernel(
    Kernel(
        "flash_attn",
        "torch",
        "PyTorch CUDA tensors",
        why_not=_flash.why_not,
        run=_flash.run,
        auto=True,
    )
)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
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
) -> torch.Tensor:
    """Attention with an additive positional bias, layout ``(B, H, L, D)``.

    ``out = softmax(q·kᵀ·scale + bias[h, i, j] + mask)·v``: the bias is added
    after the scaling (ALiBi, Press et al. 2022, arXiv:2108.12409; as in
    FlashAttention, BLOOM and MPT). Scores and softmax are float32 (float64 for
    float64 inputs); the output has ``q``'s dtype. Like
    ``torch.nn.functional.scaled_dot_product_attention``, but the bias is never
    built as an ``(H, Lq, Lk)`` tensor: blocks of query rows run SDPA on a
    per-block bias (a zero-copy Hankel view for Toeplitz biases), so memory
    stays ``O(H·block·Lk)`` (docs/performance.md).

    Args:
        q: ``(B, H, Lq, D)`` floating queries.
        k: ``(B, H_kv, Lk, D)`` keys; ``H`` a multiple of ``H_kv`` (grouped-query attention).
        v: ``(B, H_kv, Lk, D)`` values.
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
        attn_mask: as SDPA's: broadcastable to ``(B, H, Lq, Lk)``; bool True =
            the pair *takes part*, or float, added to the scores after the bias
            (``-inf`` = False). Bias positions are unchanged (``key_mask`` moves
            them); a row it hides completely outputs 0; no gradient reaches it.
        log_gates: ``(B, H, Lk)`` floating per-token log-gates ``g <= 0`` (one per
            query head and key slot; FoX ``logsigmoid``, CABLE ``-softplus``): adds
            ``Σ_{s=j+1..i} g[s]`` for key slot ``j <= i`` (the query's own slot ``i``),
            on top of ``bias`` (data-dependent ALiBi, docs/gates.md). Computed in float32
            without subtracting large cumulative sums; padded keys contribute 0; gradients
            flow to it. Queries must sit at key slots (``0 <= q_offset <= Lk - Lq``).
        log_gates_after: ``(B, H, Lk)`` log-gates of keys after the query, for
            ``causal=False`` (required there with ``log_gates``): adds
            ``Σ_{s=i+1..j} g'[s]`` for ``j > i``.
        dropout_p: attention dropout, SDPA's: each probability is zeroed with
            probability ``dropout_p`` in ``[0, 1)`` and the others are scaled by
            ``1 / (1 - dropout_p)`` (whenever > 0, as in SDPA: pass 0.0 in
            eval). It runs the exact materialised path (``O(B·H·Lq·Lk)``).
        dropout_rng: None (PyTorch's global RNG, ``torch.manual_seed``), an
            int seed or a ``torch.Generator``.
        implementation: ``"auto"``, ``"blockwise"`` (SDPA tiles),
            ``"reference"`` or ``"flash_attn"`` (CUDA fp16/bf16, symmetric ALiBi).
        block_size: query rows per block (default 256).

    Returns:
        ``(B, H, Lq, D)`` in ``q``'s dtype. A query row with no visible key is 0.

    Raises:
        InvalidTypeError: a non-floating ``q``/``k``/``v``, a mask of the wrong
            dtype, a non-bool ``causal``, ``key_padding_mask=`` (use ``key_mask``).
        InvalidArgumentError: shapes that disagree, a bias of another head
            count, a bad ``scale``, offset or position array, an implementation
            that cannot run; an ``attn_mask`` of another shape or with NaN/``+inf``.
        BackendError: tensors of another framework.

    Example:
        >>> import torch, posbias.torch
        >>> q = k = v = torch.ones(1, 4, 6, 8)
        >>> out = posbias.torch.attention(q, k, v, "alibi", causal=True)
        >>> out.shape, out.dtype
        (torch.Size([1, 4, 6, 8]), torch.float32)
    """
    return _dispatch.attention(
        "torch",
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
    )


class PositionalBias(_layers.BiasParamsMixin, nn.Module):
    """The bias as a module: ``bias_module(q_len, k_len)`` → ``(H, Lq, Lk)`` float32.

    Args:
        bias: registered name, ``BiasSpec`` or config dict.
        num_heads: head count when ``bias`` is a name.
        seed: seed of the NumPy initialisation of learnable parameters (an int >= 0).
        **hyper: hyper-parameters of the named bias.

    Learnable variants hold their parameters as ``nn.Parameter`` in
    ``module.params`` (``export_params()`` / ``load_params()`` move them to
    and from a portable ``dict`` of NumPy arrays). The bias is always computed
    in float32 (constants are cast from float64 at each call, parameters are
    cast up), also after ``module.to(torch.bfloat16)``: ask for another
    ``dtype=`` explicitly.
    """

    def __init__(
        self, bias: Any = "alibi", num_heads: int | None = None, *, seed: int = 0, **hyper: Any
    ) -> None:
        super().__init__()
        self.spec: BiasSpec = _layers.make_spec(bias, num_heads, hyper)
        self.params = nn.ParameterDict(
            {k: nn.Parameter(torch.as_tensor(v)) for k, v in self._initial_params(seed).items()}
        )
        # Tracks the module's device (.to / .cuda); not saved in the state dict.
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    def forward(
        self,
        q_len: int | None = None,
        k_len: int | None = None,
        *,
        q_pos: Any = None,
        k_pos: Any = None,
        q_offset: Any = None,
        k_offset: Any = None,
        heads: Any = None,
        dtype: Any = torch.float32,
    ) -> torch.Tensor:
        device = q_pos.device if isinstance(q_pos, torch.Tensor) else self._device_anchor.device
        args = (q_len, k_len, q_pos, k_pos, q_offset, k_offset, heads, dtype, device)
        return self._bias("torch", *args)

    def _read_param(self, name: str) -> torch.Tensor:
        return self.params[name]

    def _write_param(self, name: str, value: np.ndarray) -> None:
        with torch.no_grad():
            self.params[name].copy_(torch.as_tensor(value))

    def extra_repr(self) -> str:
        return repr(self.spec)


class MultiHeadAttention(_layers.PortableWeightsMixin, nn.Module):
    """Multi-head self- or cross-attention with a positional bias, GQA and a KV cache.

    Args:
        embed_dim: model width ``E``.
        num_heads: query heads ``H``.
        bias: registered name, ``BiasSpec``, config dict or None (default ``"alibi"``).
        causal: causal self-attention (required for KV-cache decoding).
        num_kv_heads: K/V heads (default ``H``; fewer for grouped-query attention).
        head_dim: per-head size (default ``E // H``).
        use_bias: biases in the projections.
        implementation: the attention kernel, as in :func:`attention` (default
            ``"auto"``; docs/performance.md).
        block_size: query rows per block of the blockwise kernel (default 256).
        seed: seed of the NumPy initialisation shared by every framework.
        dropout: attention dropout, ``nn.MultiheadAttention``'s: the probability
            in ``[0, 1)`` of zeroing each attention probability while training
            (the others scaled by ``1 / (1 - dropout)``), with PyTorch's RNG
            (``torch.manual_seed`` reproduces it); off after ``model.eval()``.
            While it is on, the exact materialised path runs (``O(B·H·Lq·Lk)``
            memory, docs/layers.md).
        gate: a data-dependent forget gate on top of ``bias`` (self-attention only):
            ``"forgetting"`` (FoX, Lin et al. 2025, arXiv:2503.02130:
            ``g = logsigmoid(x·W + b)``), ``"cable"`` (CABLE, Veisi et al. 2025,
            arXiv:2503.08067: ``g = -softplus(x·W + b)``) or None. The layer owns the
            projection ``gate_proj = nn.Linear(E, H)`` (``2·H`` outputs when
            ``causal=False``: ``log_gates`` then ``log_gates_after``, as
            x-transformers' ``DataDependentAlibi``), initialised as in both papers'
            code (kernel ``N(0, 0.02²)``, bias 0) and computed in float32; query
            slot ``i`` and key slot ``j <= i`` get ``Σ_{s=j+1..i} g[s]`` (the
            ``log_gates=`` of :func:`attention`; ``log_gates(x)`` returns them).
            Padding, packing and KV-cache decoding work as without a gate (the
            cache keeps the per-slot ``g``).

    Call: ``mha(x, key=None, value=None, *, key_mask=None, segment_ids=None,
    attn_mask=None)`` → ``(B, Lq, E)``, ``nn.MultiheadAttention``'s argument
    order: ``key``/``value`` ``(B, Lk, E)`` make it cross-attention (a missing
    ``key`` is ``x``, a missing ``value`` is ``key``), the bias aligned
    bottom-right (the last query sits at the last key). ``key_mask`` ``(B, Lk)``
    (True = real key; ``key_padding_mask=`` is an error saying so) and
    ``attn_mask`` are :func:`attention`'s (``attn_mask`` broadcastable to
    ``(B, H, Lq, Lk)``, bool True = takes part, or float added to the scores).
    With ``cache=`` (self-attention only) it returns ``(out, new_cache)`` (see
    :meth:`init_cache`). ``need_weights=True`` also returns the attention
    probabilities ``(B, H, Lq, Lk)`` per head, ``(out, weights)`` (then
    ``(out, weights, new_cache)`` with a cache), from the exact path that
    *materialises* them (``O(B·H·Lq·Lk)`` memory, no blockwise kernel). The
    default is False, unlike ``nn.MultiheadAttention``'s ``need_weights=True``
    (which averages over heads): posbias never builds the ``Lq × Lk`` scores
    unless asked, and returns ``out`` alone, as it always has.

    Attributes:
        positional_bias: the :class:`PositionalBias` module (None for
            ``bias=None``); the same name in every framework. (``bias`` would
            collide with PyTorch's projection biases, ``use_bias=``.)

    ``portable_weights()`` / ``load_portable_weights(d)`` move the whole layer,
    the bias's learnable parameters included (``"positional_bias.<name>"``),
    to and from any framework's layer.

    Example:
        >>> import torch
        >>> mha = MultiHeadAttention(32, 4, causal=True, num_kv_heads=2)
        >>> x = torch.randn(1, 6, 32)
        >>> cache = mha.init_cache(batch_size=1, capacity=8)
        >>> y1, cache = mha(x[:, :4], cache=cache)        # prefill
        >>> y2, cache = mha(x[:, 4:], cache=cache)        # two more tokens
        >>> torch.allclose(torch.cat([y1, y2], 1), mha(x), atol=1e-6)
        True

    A Forgetting Transformer layer (no positional bias, FoX's forget gate):

        >>> fox = MultiHeadAttention(32, 4, bias=None, causal=True, gate="forgetting")
        >>> fox(x).shape, fox.log_gates(x).shape      # log_gates: (B, H, L), all <= 0
        (torch.Size([1, 6, 32]), torch.Size([1, 4, 6]))
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
        dropout: float = 0.0,
        gate: str | None = None,
    ) -> None:
        super().__init__()
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
        shapes = self.mha_config.shapes()
        for name in self._projection_names():
            fan_in, fan_out = shapes[f"{name}.kernel"]
            linear = nn.Linear(fan_in, fan_out, bias=f"{name}.bias" in shapes)
            setattr(self, f"{name}_proj", linear)
        self.positional_bias = _layers.layer_bias(
            bias, num_heads, PositionalBias, lambda: PositionalBias(bias, num_heads, seed=seed)
        )
        self._init_projections(seed)

    def forward(
        self,
        x: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        key_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        **removed: Any,
    ) -> Any:
        weight = self.q_proj.weight
        rate = self.mha_config.dropout
        drop = None
        if self.training and rate > 0:  # nn.Dropout's rule: model.eval() turns it off

            def drop(probs: torch.Tensor) -> torch.Tensor:
                return nn.functional.dropout(probs, rate, training=True)

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
            dropout=drop,
            removed=removed,
            weight_dtype=TorchBackend().dtype_name(weight.dtype),
        )

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, f"{name}_proj")
        if name == "gate":  # computed in x's dtype (float32), also in a bfloat16 module
            return nn.functional.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
        return layer(x)

    def _backend(self) -> TorchBackend:
        return TorchBackend(self.q_proj.weight.device)

    def init_cache(self, batch_size: int, capacity: int, dtype: Any = None) -> KVCache:
        """An empty KV cache on this module's device (dtype: the module's by default)."""
        weight = self.q_proj.weight
        dtype = weight.dtype if dtype is None else dtype
        return _layers.init_cache(
            TorchBackend(weight.device), self.mha_config, batch_size, capacity, dtype
        )

    def _read_projection(self, name: str) -> tuple[Any, Any]:
        layer = getattr(self, f"{name}_proj")
        bias = None if layer.bias is None else layer.bias.detach().float().cpu().numpy()
        return layer.weight.detach().float().cpu().numpy().T, bias

    def _write_projection(self, name: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        layer = getattr(self, f"{name}_proj")
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(kernel.T))
            if layer.bias is not None:
                layer.bias.copy_(torch.as_tensor(bias))
