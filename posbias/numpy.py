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

_attention_fn = _dispatch.functional("numpy", "bhld")


def attention(q: Any, k: Any, v: Any, bias: Any = None, **kwargs: Any) -> np.ndarray:
    """Reference attention in float64: ``softmax(q·kᵀ·scale + bias + mask)·v``.

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H_kv, Lk, D)`` with ``H % H_kv == 0``.
        bias: a registered name, a :class:`~posbias.BiasSpec` or None.
        **kwargs: ``causal``, ``q_offset``, ``key_padding_mask``, ``segment_ids``,
            ``scale``, ``q_pos``, ``k_pos``, ``implementation``, ``block_size``,
            as in :func:`posbias.torch.attention`.

    Returns:
        ``(B, H, Lq, D)`` float64.
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    return _attention_fn(q, k, v, bias, **kwargs)


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
        key_padding_mask: Any = None,
        segment_ids: Any = None,
        cache: _problem.KVCache | None = None,
    ) -> Any:
        return _layers.mha_forward(
            NumpyBackend(),
            self.mha_config,
            self._project,
            np.asarray(x, dtype=np.float64),
            self.spec,
            key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
            cache=cache,
        )
