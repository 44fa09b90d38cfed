"""Keras 3 layers on every Keras backend: ``PositionalBias`` and ``MultiHeadAttention``.

    >>> import numpy as np
    >>> from posbias.keras import MultiHeadAttention
    >>> mha = MultiHeadAttention(num_heads=8, key_dim=8, bias="alibi")
    >>> x = np.ones((2, 10, 64), "float32")
    >>> tuple(mha(x, x, use_causal_mask=True).shape)
    (2, 10, 64)

Written for Keras' JAX, PyTorch and TensorFlow backends alike (``KERAS_BACKEND``):
the layers take that backend's native tensors and compute with its posbias
engine (``posbias.jax``, ``posbias.torch``, ``posbias.tensorflow``), so the
blockwise kernels run and the ``(H, Lq, Lk)`` bias is never built. Keras'
conventions hold: ``MultiHeadAttention(num_heads, key_dim, ...)`` called as
``layer(query, value, key=None, attention_mask=None, use_causal_mask=False,
return_attention_scores=False, training=None)``, masking with propagation,
``get_config``/``from_config``, ``.keras`` files that load on any backend,
``fit`` and ``jit_compile``, dtype policies. ``posbias.tensorflow`` keeps its
posbias-style layers (``MultiHeadAttention(embed_dim, num_heads, ...)``, KV
cache) for the TensorFlow backend.
"""

from __future__ import annotations

from ._bias import PositionalBias
from ._mha import MultiHeadAttention

__all__ = ["MultiHeadAttention", "PositionalBias"]
