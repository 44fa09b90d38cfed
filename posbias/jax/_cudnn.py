"""JAX on GPU: ``jax.nn.dot_product_attention(..., implementation="cudnn")``.

cuDNN's fused attention takes the bias as a ``(1, H, Lq, Lk)`` tensor (it
*reads* it, so this path keeps an ``H × Lq × Lk`` bias in GPU memory: use it
for the speed of cuDNN at moderate lengths, the blockwise path for long ones).
cuDNN needs float16/bfloat16 inputs on a GPU; its ``is_causal`` mask is aligned
top-left, so the queries must start at slot 0 of the keys (``Lq == Lk`` by
default). posbias builds the bias in float32 and casts it to the input dtype.

Opt in with ``implementation="cudnn"``; :func:`why_not` says why it cannot run.
"""

from __future__ import annotations

from typing import Any

from .._core.problem import Problem


def why_not(p: Problem) -> str | None:
    """None when the cuDNN path can compute ``p``, else the reason it cannot."""
    import jax

    try:
        platforms = {d.platform for d in p.q.devices()}
    except Exception:  # a tracer under jit: its placement is the default backend's
        platforms = {jax.default_backend()}
    if platforms != {"gpu"}:
        return "cuDNN attention needs arrays on a GPU."
    if p.in_dtype not in ("float16", "bfloat16"):
        return f"cuDNN attention takes float16/bfloat16 inputs, not {p.in_dtype}."
    if p.has_attn_mask:
        return "an attn_mask is not mapped to cuDNN attention; use implementation='blockwise'."
    if not (isinstance(p.q_offset, int) and p.segment_ids is None and p.key_mask is None):
        return "padding masks, segment_ids and per-sequence offsets are not mapped to cuDNN."
    if p.causal and p.q_offset != 0:
        return "cuDNN's causal mask is aligned top-left: queries must start at key slot 0."
    return None


def run(p: Problem) -> Any:
    """``(B, H, Lq, D)`` in ``p.compute``."""
    import jax
    import jax.numpy as jnp

    bias = p.bias_tile(0, p.q_len, p.k_len)
    if bias is not None:
        bias = bias.astype(p.q.dtype)
        if bias.ndim == 3:
            bias = bias[None]
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (p.q, p.k, p.v))  # (B, L, H, D)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, scale=p.scale, is_causal=p.causal, implementation="cudnn"
    )
    return jnp.swapaxes(out, 1, 2).astype(p.compute)
