"""BLOOM, MPT and Falcon (``alibi=True``): their attention forwards, on posbias attention.

Each model builds an ALiBi tensor itself (``(B·H, 1, L)`` key-only, or
``(H, 1, max_seq_len)``) and runs eager attention over ``(B, H, Lq, Lk)``
scores. The patched forwards keep each model's own projections, head split,
cache update and output projection, and replace the scores, bias, mask and
softmax by one posbias attention call: causal, ALiBi in posbias's relative form
``-m_h·|i - j|`` (equal to the key-only form under a causal mask), positions
from the padding mask. The slopes are read from the model's own code (its
``build_*alibi_tensor`` at two positions), so they are the model's exactly:

* BLOOM: the paper's slopes; scores ``q·kᵀ/√d + alibi``.
* MPT: ``alibi_bias_max = 8`` (what ``MptModel`` passes), scale ``softmax_scale``.
* Falcon: slopes rounded to bfloat16 (``build_alibi_tensor`` does), and the bias is
  scaled by ``1/√d`` like the scores (``(q·kᵀ + alibi)/√d``), as in Falcon's SDPA path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import posbias

from ..spec import BiasSpec
from . import _common


@dataclasses.dataclass(frozen=True)
class AlibiInfo:
    """What a patched ALiBi attention module computes with."""

    spec: BiasSpec
    scale: float


def alibi_spec(slopes: np.ndarray, *, multiplier: float = 1.0) -> BiasSpec:
    """``posbias.get("alibi", ...)`` with exactly these float32 ``slopes`` (times ``multiplier``).

    The named paper slopes when they agree bit for bit in float32 (then FlashAttention's
    ``alibi_slopes`` path and the diagonal-table cache apply), else ``custom_slopes``.
    """
    slopes = np.asarray(slopes, dtype=np.float32)
    heads = int(slopes.shape[0])
    paper = posbias.get("alibi", num_heads=heads)
    if np.array_equal(np.float32(paper.slopes), slopes):
        if multiplier == 1.0:
            return paper
        return posbias.get("alibi", num_heads=heads, scale=multiplier)
    return posbias.get(
        "alibi", num_heads=heads, custom_slopes=tuple(float(s) * multiplier for s in slopes)
    )


def bloom_info(module: Any) -> AlibiInfo:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    ones = torch.ones((1, 2), dtype=torch.long)
    slopes = build_alibi_tensor(ones, module.num_heads, torch.float32)[:, 0, 1]
    return AlibiInfo(alibi_spec(slopes.numpy()), float(module.inv_norm_factor))


def mpt_info(module: Any) -> AlibiInfo:
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    alibi = build_mpt_alibi_tensor(module.n_heads, 2)  # m·(j - 1), MptModel's alibi_bias_max=8
    return AlibiInfo(alibi_spec(-alibi[:, 0, 0].float().numpy()), float(module.softmax_scale))


def falcon_info(module: Any) -> AlibiInfo:
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    ones = torch.ones((1, 2), dtype=torch.long)
    slopes = build_alibi_tensor(ones, module.num_heads, torch.float32)[:, 0, 1]
    scale = float(module.inv_norm_factor)
    return AlibiInfo(alibi_spec(slopes.numpy(), multiplier=scale), scale)


def _attend(
    self: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout_p: Any, weights: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ALiBi models' attention once their projections and cache update are done:
    causal, padded keys from Hugging Face's 2-D mask, the model's ALiBi and scale."""
    info: AlibiInfo = self._posbias
    _common.check_dropout(dropout_p, self.training)
    return _common.attend(
        query,
        key,
        value,
        info.spec,
        key_mask=_common.key_mask(attention_mask, query.shape[0], key.shape[-2]),
        causal=True,
        scale=info.scale,
        weights=bool(weights),
    )


def bloom_forward(
    self: Any,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor,
    attention_mask: Any,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``BloomAttention.forward`` with posbias attention (``alibi`` is not read)."""
    from transformers.models.bloom.modeling_bloom import dropout_add

    query, key, value = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    context, probs = _attend(
        self, query, key, value, attention_mask, self.attention_dropout.p, output_attentions
    )
    context = _common.merge_heads(context)
    if self.pretraining_tp > 1 and self.slow_but_exact:  # as BloomAttention does it
        slices = self.hidden_size / self.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(self.pretraining_tp):
            part = slice(int(i * slices), int((i + 1) * slices))
            output = output + F.linear(context[:, :, part], self.dense.weight[:, part])
    else:
        output = self.dense(context)
    output = dropout_add(output, residual, self.hidden_dropout, self.training)
    return output, probs


def mpt_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_bias: Any,
    cache: Any = None,
    attention_mask: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``MptAttention.forward`` with posbias attention (``position_bias`` is not read)."""
    batch_size, seq_length = hidden_states.shape[:2]
    mixed = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed = mixed.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (
        t.reshape(batch_size, seq_length, self.n_heads, self.head_dim).transpose(1, 2)
        for t in mixed.chunk(3, dim=2)
    )
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    weights = getattr(self, "_posbias_weights", False)
    context, probs = _attend(self, query, key, value, attention_mask, self.attn_dropout_p, weights)
    return self.out_proj(_common.merge_heads(context)), probs


def mpt_block_forward(self: Any, *args: Any, output_attentions: bool = False, **kwargs: Any) -> Any:
    """``MptBlock.forward``, telling its attention whether the probabilities are wanted."""
    self.attn._posbias_weights = bool(output_attentions)
    try:
        return type(self).forward(self, *args, output_attentions=output_attentions, **kwargs)
    finally:
        self.attn._posbias_weights = False


def falcon_forward(
    self: Any,
    hidden_states: torch.Tensor,
    alibi: Any,
    attention_mask: Any,
    position_ids: Any = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``FalconAttention.forward`` (``alibi=True``) with posbias attention."""
    num_kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query, key, value = self._split_heads(self.query_key_value(hidden_states))
    batch_size, q_length, _, _ = query.shape
    query = query.transpose(1, 2).reshape(batch_size, self.num_heads, q_length, self.head_dim)
    key = key.transpose(1, 2).reshape(batch_size, num_kv_heads, q_length, self.head_dim)
    value = value.transpose(1, 2).reshape(batch_size, num_kv_heads, q_length, self.head_dim)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    context, probs = _attend(
        self, query, key, value, attention_mask, self.attention_dropout.p, output_attentions
    )
    return self.dense(_common.merge_heads(context)), probs
