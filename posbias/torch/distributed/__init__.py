"""Sequence- and head-parallel attention with biases over ``torch.distributed``.

Every rank passes its *local shard*; the bias is never communicated: each rank
computes its tiles from global positions and global head indices.

* :func:`ring_attention` — sequence (context) parallelism. Each rank holds a
  block of the sequence with every head; key/value blocks travel around the
  ring (``batch_isend_irecv``, ``world - 1`` steps) and the partial results are
  merged exactly by log-sum-exp. Causal attention skips hidden blocks;
  ``order="zigzag"`` balances that work across ranks.
* :func:`head_parallel_attention` — Ulysses-style: one ``all_to_all_single``
  turns sequence shards into head shards (all tokens, ``H / world`` heads), each
  rank attends with the bias of its *global* heads, a second all-to-all turns
  the output back into sequence shards.
* :func:`shard_score_mod` — a FlexAttention ``score_mod`` for a query shard
  against gathered keys, mapping shard-local indices to global positions.

Both attention functions are differentiable (the communication is wrapped in
autograd functions whose backward runs the reverse exchange). Gradients of a
learnable bias module's parameters are each rank's share: all-reduce them as
you do for any replicated parameter (``DistributedDataParallel`` does).

Before communicating, the ranks exchange their shapes and options once
(one small ``all_gather``); a mismatch raises :class:`posbias.DistributedError`
on every rank instead of hanging.

Run with e.g. ``torchrun --nproc-per-node 2 script.py`` (``gloo`` on CPU,
``nccl`` on GPU); see docs/distributed.md.
"""

from __future__ import annotations

from typing import Any

import torch

from ..._core.bias_arg import read_bias
from ...errors import InvalidArgumentError
from ._comm import traffic
from ._layout import layout_positions, shard
from ._ring import ring_attention
from ._ulysses import head_parallel_attention

__all__ = [
    "head_parallel_attention",
    "layout_positions",
    "ring_attention",
    "shard",
    "shard_score_mod",
    "traffic",
]


def shard_score_mod(bias: Any, q_pos: Any, k_pos: Any, *, num_heads: int | None = None):
    """A FlexAttention ``score_mod`` for shard-local indices with global positions.

    Context-parallel FlexAttention runs each rank's query shard against keys
    gathered from every rank; ``score_mod`` then sees shard-local indices
    ``q_idx``/``kv_idx``. This maps them through the position tables and adds
    the bias at ``d = k_pos[kv_idx] - q_pos[q_idx]``: symmetric ALiBi in closed
    form, other Toeplitz biases (T5, KERPLE, Sandwich, ...) from a small table
    of their values per difference. Global heads ``0..H-1``.

    Args:
        bias: registered name (with ``num_heads``), ``BiasSpec`` or
            ``posbias.torch.PositionalBias`` module.
        q_pos: ``(Lq_local,)`` global positions of this rank's queries.
        k_pos: ``(Lk,)`` global positions of the keys it attends to.
        num_heads: head count when ``bias`` is a name.

    Example:
        >>> import torch, posbias.torch
        >>> from torch.nn.attention.flex_attention import flex_attention
        >>> from posbias.torch.distributed import shard_score_mod
        >>> q = torch.randn(1, 4, 8, 16)
        >>> pos = torch.arange(8)
        >>> mod = shard_score_mod("alibi", pos[4:], pos, num_heads=4)   # rank 1 of 2
        >>> out = flex_attention(q[:, :, 4:], q, q, score_mod=mod)
        >>> ref = posbias.torch.attention(q, q, q, "alibi")[:, :, 4:]
        >>> bool((out - ref).abs().max() < 1e-5)
        True
    """
    from .._flex import positions_score_mod

    arg = read_bias(bias, num_heads)
    if arg is None or arg.spec is None:
        raise InvalidArgumentError(
            "shard_score_mod needs a bias with a spec: a registered name (with num_heads=), a "
            f"BiasSpec, its config dict or a PositionalBias; got {type(bias).__name__}."
        )
    # copies: views of one another (pos[4:], pos) make torch.compile guard on aliasing
    q_pos, k_pos = (torch.as_tensor(p).to(torch.long, copy=True) for p in (q_pos, k_pos))
    if q_pos.ndim != 1 or k_pos.ndim != 1:
        raise InvalidArgumentError("shard_score_mod takes 1-D q_pos and k_pos position tables.")
    return positions_score_mod(arg.spec, q_pos, k_pos, params=arg.current_params())
