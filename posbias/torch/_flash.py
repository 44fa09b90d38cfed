"""FlashAttention 2 (``flash_attn.flash_attn_func``) with its built-in ALiBi.

``flash_attn_func(q, k, v, softmax_scale=s, causal=c, alibi_slopes=m)`` with
``(B, L, H, D)`` fp16/bf16 CUDA tensors computes, per its documentation,

    softmax(s·q·kᵀ - m_h·|i + Lk - Lq - j|) · v      (causal: keys j <= i + Lk - Lq)

i.e. ALiBi aligned bottom-right with the symmetric ``|i - j|`` form, added after
scaling, slopes as float32 ``(H,)`` of *global* heads. That is posbias's ALiBi
when the queries sit at the default offset ``Lk - Lq`` and positions are the
slots, so posbias passes ``spec.symmetric_slopes()`` straight through.
FlashAttention repeats grouped K/V heads itself.

It is chosen automatically (``implementation="auto"``) when all of this holds;
:func:`why_not` says which condition fails.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from .._core import conventions
from .._core.problem import Problem


@functools.cache  # a failed import is not cached by Python: try once, not every call
def _load() -> Any:
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


def _on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def why_not(p: Problem) -> str | None:
    """None when FlashAttention can compute ``p`` exactly, else the reason it cannot."""
    if not _on_cuda(p.q):
        return "FlashAttention needs CUDA tensors."
    if p.in_dtype not in ("float16", "bfloat16"):
        return f"FlashAttention takes float16/bfloat16 inputs, not {p.in_dtype}."
    if p.has_attn_mask:
        return "an attn_mask is not mapped to FlashAttention; use implementation='blockwise'."
    if not (p.slot_positions and isinstance(p.q_offset, int)):
        return (
            "padding masks, segment_ids, explicit positions and per-sequence offsets "
            "are not mapped to FlashAttention; use implementation='blockwise'."
        )
    if p.q_offset != conventions.default_q_offset(p.q_len, p.k_len):
        return "FlashAttention aligns queries bottom-right; q_offset must be Lk - Lq."
    if p.gates is not None:
        return "log_gates are not mapped to FlashAttention; use implementation='blockwise'."
    if p.bias is not None and p.bias.symmetric_slopes() is None:
        return "only symmetric ALiBi (bias = -m·|i - j|) or no bias maps to FlashAttention."
    if _load() is None:
        return "flash_attn is not installed (pip install flash-attn)."
    return None


def run(p: Problem) -> torch.Tensor:
    """``(B, H, Lq, D)`` in ``p.compute`` via ``flash_attn_func``."""
    flash = _load()
    slopes = None
    if p.bias is not None:
        slopes = torch.tensor(p.bias.symmetric_slopes(), dtype=torch.float32, device=p.q.device)
    q, k, v = (t.transpose(1, 2) for t in (p.q, p.k, p.v))  # (B, L, H, D)
    out = flash.flash_attn_func(
        q, k, v, softmax_scale=p.scale, causal=p.causal, alibi_slopes=slopes
    )
    return out.transpose(1, 2).to(getattr(torch, p.compute))
