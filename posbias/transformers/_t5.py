"""The T5 family (T5, mT5, UMT5): posbias as transformers' ``"posbias"`` attention function.

These models call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with ``position_bias=``: the ``(1, H, Lq, Lk)`` tensor that the table-owning
layer's ``compute_bias`` builds (T5, mT5: block 0 of each stack, shared by the
others; UMT5: every layer its own) or zeros (cross-attention).

* :func:`posbias_attention` alone (``register()`` then
  ``from_pretrained(..., attn_implementation="posbias")``) runs posbias's
  blockwise attention with that tensor read per block of rows (exact, and
  gradients reach the table through it); the tensor itself is still built.
* After :func:`patch_stack`, layers pass :data:`LAZY` instead: posbias computes
  the bias per block from the table module (``relative_attention_bias``, read
  at every call, so it trains), with the module's bucket settings
  (``relative_attention_num_buckets``, ``relative_attention_max_distance``,
  bidirectional in the encoder), and nothing of size ``Lq × Lk`` is built.

T5 does not scale scores by ``1/√d`` (``scaling=1.0`` comes with the call).
"""

from __future__ import annotations

import dataclasses
import math
from types import MethodType
from typing import Any

import torch

import posbias

from .._core.bias_arg import BiasArg
from ..errors import InvalidArgumentError
from ..spec import BiasSpec
from . import _common


class _LazyBias:
    """``position_bias`` of a patched T5 layer: posbias computes it per block from the table."""

    def __repr__(self) -> str:
        return "<posbias lazy T5 position bias>"


LAZY = _LazyBias()


@dataclasses.dataclass(frozen=True, eq=False)
class T5Info:
    """A patched T5 attention module's bias: the module holding the table, or None (no bias)."""

    owner: Any
    spec: BiasSpec | None


def t5_spec(module: Any) -> BiasSpec:
    """posbias's ``"t5"`` spec with the module's bucket settings."""
    return posbias.get(
        "t5",
        num_heads=module.n_heads,
        num_buckets=module.relative_attention_num_buckets,
        max_distance=module.relative_attention_max_distance,
        bidirectional=not module.is_decoder,
    )


def _wants_weights(kwargs: dict[str, Any]) -> bool:
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers 5 records attentions with hooks; this is what they collect now
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def _materialised(position_bias: torch.Tensor, heads: int, q_len: int, k_len: int) -> Any:
    """A bias callable reading HF's ``(1|B, H, Lq, Lk)`` tensor at row/column indices."""
    shape = tuple(position_bias.shape)
    if len(shape) != 4 or shape[1:] != (heads, q_len, k_len):
        raise InvalidArgumentError(
            f"position_bias has shape {shape}; expected (1 or B, {heads}, {q_len}, {k_len})."
        )

    def values(q_pos: Any, k_pos: Any, dtype: str) -> torch.Tensor:
        tile = position_bias[:, :, q_pos][..., k_pos]
        return (tile[0] if tile.shape[0] == 1 else tile).to(getattr(torch, dtype))

    device = position_bias.device
    return values, {
        "q_pos": torch.arange(q_len, device=device),
        "k_pos": torch.arange(k_len, device=device),
    }


def posbias_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention interface for ``"posbias"`` (the T5 family).

    ``softmax(q·kᵀ·scaling + position_bias + mask)·v`` with posbias's blockwise
    kernels; the module's ``is_causal`` sets causality, ``attention_mask`` is the
    ``(B, Lk)`` padding mask of :func:`posbias.transformers._common.posbias_mask`.

    Args:
        module: the calling attention module (``T5Attention``, ...).
        query: ``(B, H, Lq, D)``; key, value: ``(B, H_kv, Lk, D)``.
        attention_mask: the padding mask posbias's mask interface built.
        scaling: the score scale (T5: 1.0); default ``1/√D``.
        dropout: attention dropout; only 0 (training with dropout raises).
        position_bias: :data:`LAZY` (patched layers), HF's bias tensor, or None.

    Returns:
        ``(out (B, Lq, H, D), probabilities (B, H, Lq, Lk) or None)``, as HF's
        attention functions return them; the probabilities only when attentions are
        being recorded (``output_attentions=True``: the exact materialised path).

    Raises:
        InvalidArgumentError: dropout in training, a mask it does not read, a
            position bias of the wrong shape, an unsupported model.
    """
    _common.check_model(getattr(module, "config", None))
    _common.check_dropout(float(dropout), True)
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[-2]
    options: dict[str, Any] = {}
    if position_bias is LAZY:
        info: T5Info = module._posbias_t5
        bias = None
        if info.owner is not None:
            table = info.owner.relative_attention_bias.weight
            bias = BiasArg(info.spec, width=heads, params={"table": table})
    elif position_bias is None:
        bias = None
    else:
        bias, options = _materialised(position_bias, heads, q_len, k_len)
    out, probs = _common.attend(
        query,
        key,
        value,
        bias,
        key_mask=_common.key_mask(attention_mask, batch, k_len),
        causal=bool(getattr(module, "is_causal", False)),
        scale=1 / math.sqrt(dim) if scaling is None else float(scaling),
        weights=_wants_weights(kwargs),
        **options,
    )
    return out.transpose(1, 2).contiguous(), probs


def _t5_forward(
    self: Any,
    hidden_states: torch.Tensor,
    mask: Any = None,
    key_value_states: Any = None,
    position_bias: Any = None,
    cache: Any = None,
    **kwargs: Any,
) -> Any:
    """``T5Attention.forward`` with a lazy position bias (no ``compute_bias``, no zeros)."""
    return type(self).forward(
        self,
        hidden_states,
        mask=mask,
        key_value_states=key_value_states,
        position_bias=LAZY if position_bias is None else position_bias,
        cache=cache,
        **kwargs,
    )


def _lazy_compute_bias(self: Any, *args: Any, **kwargs: Any) -> Any:
    return LAZY


def _umt5_cross_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``UMT5Attention.forward`` of a cross-attention: its zero bias is not built."""
    self.has_relative_attention_bias = True  # routes to the lazy compute_bias
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        self.has_relative_attention_bias = False


def patch_stack(stack: Any, *, per_layer_tables: bool) -> int:
    """Patch the attention modules of one T5/mT5/UMT5 stack; returns how many."""
    owner = None
    count = 0
    for block in stack.block:
        attention = block.layer[0].SelfAttention
        if per_layer_tables or attention.has_relative_attention_bias:
            owner = attention
        if owner is None:
            raise InvalidArgumentError(
                f"{type(stack).__name__}: no layer before block {count} holds a "
                "relative_attention_bias table."
            )
        attention._posbias_t5 = T5Info(owner, t5_spec(attention))
        modules = [(attention, False)]
        if len(block.layer) > 2:  # decoder: self, cross, feed-forward
            cross = block.layer[1].EncDecAttention
            cross._posbias_t5 = T5Info(None, None)
            modules.append((cross, True))
        for module, is_cross in modules:
            if per_layer_tables:
                module.compute_bias = MethodType(_lazy_compute_bias, module)
                if is_cross:
                    module.forward = MethodType(_umt5_cross_forward, module)
            else:
                module.forward = MethodType(_t5_forward, module)
            count += 1
    return count
