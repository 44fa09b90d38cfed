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

from typing import Any

import numpy as np

from ._core import dispatch as _dispatch
from ._core import layers as _layers
from ._core import problem as _problem
from .backends.numpy import NumpyBackend

__all__ = ["MultiHeadAttention", "attention"]


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
        implementation: ``"auto"`` (= ``"reference"``), ``"reference"`` or ``"blockwise"``.
        block_size: query rows per block (default 256).

    Returns:
        ``(B, H, Lq, D)`` float64. A query row with no visible key is 0.

    Raises:
        InvalidTypeError: a non-floating ``q``/``k``/``v``, a mask of the wrong
            dtype, a non-bool ``causal``, ``key_padding_mask=`` (use ``key_mask``).
        InvalidArgumentError: shapes that disagree, a bias of another head
            count, a bad ``scale``, offset or position array, an implementation
            that cannot run.
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
        implementation=implementation,
        block_size=block_size,
        compute_dtype="float64",
        out_dtype="float64",
    )


class MultiHeadAttention(_layers.PortableWeightsMixin):
    """Float64 reference of the multi-head attention layers (no training).

    Holds portable weights and computes exactly what
    :class:`posbias.torch.MultiHeadAttention`, :class:`posbias.jax.MultiHeadAttention`
    and :class:`posbias.tensorflow.MultiHeadAttention` compute, in float64.

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
        self.spec = None if bias is None else _layers.make_spec(bias, num_heads, {})
        self.weights = _layers.init_weights(self.mha_config, seed)

    def _read_projection(self, name: str) -> tuple[Any, Any]:
        return self.weights[f"{name}.kernel"], self.weights.get(f"{name}.bias")

    def _write_projection(self, name: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        self.weights[f"{name}.kernel"] = kernel
        if bias is not None:
            self.weights[f"{name}.bias"] = bias

    def _project(self, name: str, x: np.ndarray) -> np.ndarray:
        out = x @ self.weights[f"{name}.kernel"].astype(np.float64)
        if self.mha_config.use_bias:
            out = out + self.weights[f"{name}.bias"].astype(np.float64)
        return out

    def init_cache(self, batch_size: int, capacity: int) -> _problem.KVCache:
        return _layers.init_cache(NumpyBackend(), self.mha_config, batch_size, capacity, "float64")

    def __call__(
        self,
        x: Any,
        *,
        key_mask: Any = None,
        segment_ids: Any = None,
        cache: _problem.KVCache | None = None,
        **removed: Any,
    ) -> Any:
        return _layers.mha_forward(
            NumpyBackend(),
            self.mha_config,
            self._project,
            np.asarray(x, dtype=np.float64),
            self.spec,
            key_mask=key_mask,
            segment_ids=segment_ids,
            cache=cache,
            removed=removed,
        )
