"""PyTorch FlexAttention hooks: a bias as ``score_mod``, masks as ``mask_mod``.

FlexAttention (``torch.nn.attention.flex_attention``) calls
``score_mod(score, b, h, q_idx, kv_idx)`` on the *scaled* score of every
visible (query, key) pair, so adding the bias there is posbias's post-scale
contract. ``q_idx``/``kv_idx`` are indices into the query and key tensors; the
offsets turn them into positions (``q_offset`` defaults to ``Lk - Lq``,
bottom-right, like everywhere in posbias).

* Symmetric ALiBi (``spec.symmetric_slopes()``) is computed in closed form,
  ``m_h · -|kv - q|`` in float32: bit-identical to ``spec.bias``.
* Any other Toeplitz bias reads a ``(H, Lq + Lk - 1)`` table of its values per
  diagonal (built once, by ``spec.bias``), so nothing ``Lq × Lk`` exists.
* Other biases depend on both positions; pass them to
  :func:`posbias.torch.attention` instead.

Example:
    >>> import posbias, posbias.torch, torch
    >>> from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    >>> q = torch.randn(1, 4, 8, 16)
    >>> spec = posbias.get("alibi", num_heads=4)
    >>> mask = create_block_mask(
    ...     posbias.torch.mask_mod(causal=True, q_len=8, k_len=8), 1, None, 8, 8, device="cpu"
    ... )
    >>> out = flex_attention(q, q, q, score_mod=spec.score_mod(8, 8), block_mask=mask)
    >>> ref = posbias.torch.attention(q, q, q, spec, causal=True)
    >>> bool((out - ref).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InvalidArgumentError
from ..spec import BiasSpec


def score_mod(
    spec: BiasSpec,
    q_len: int | None = None,
    k_len: int | None = None,
    *,
    q_offset: int | None = None,
    k_offset: int = 0,
    params: Any = None,
    device: Any = None,
) -> Any:
    """The ``score_mod`` adding ``spec``'s bias (see :meth:`posbias.BiasSpec.score_mod`)."""
    slopes = spec.symmetric_slopes() if not spec.learnable else None
    if q_offset is None:
        if q_len is None or k_len is None:
            raise InvalidArgumentError(
                "score_mod needs q_len and k_len (or q_offset) to align the queries bottom-right."
            )
        q_offset = k_len - q_len
    shift = int(k_offset) - int(q_offset)  # position difference = kv_idx - q_idx + shift
    if slopes is None and (q_len is None or k_len is None):
        _check_toeplitz(spec)
        raise InvalidArgumentError(
            "score_mod of a table-based bias needs q_len and k_len to size its table."
        )
    lo, hi = (0, 0) if slopes is not None else (shift - (q_len - 1), shift + k_len - 1)
    diff = _difference_mod(spec, slopes, lo, hi, params, device)

    def posbias_score_mod(score, b, h, q_idx, kv_idx):
        return score + diff(h, kv_idx - q_idx + shift)

    return posbias_score_mod


def positions_score_mod(
    spec: BiasSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, *, params: Any = None
) -> Any:
    """A ``score_mod`` for indices into position tables: bias at ``(q_pos[q_idx], k_pos[kv_idx])``.

    For shards whose tokens are not contiguous (zigzag, packed documents): the
    difference ``k_pos[kv_idx] - q_pos[q_idx]`` indexes the per-difference table.
    """
    slopes = spec.symmetric_slopes() if not spec.learnable else None
    lo = int(k_pos.min()) - int(q_pos.max())
    hi = int(k_pos.max()) - int(q_pos.min())
    diff = _difference_mod(spec, slopes, lo, hi, params, q_pos.device)

    def posbias_score_mod(score, b, h, q_idx, kv_idx):
        return score + diff(h, k_pos[kv_idx] - q_pos[q_idx])

    return posbias_score_mod


def _check_toeplitz(spec: BiasSpec) -> None:
    if not spec.toeplitz or spec.position_dims != 1:
        raise InvalidArgumentError(
            f"{spec.name or type(spec).__name__} depends on both positions, not only on "
            "their difference: no small score_mod table exists. Use "
            "posbias.torch.attention(q, k, v, spec), which never builds the full bias."
        )


def _difference_mod(spec: BiasSpec, slopes: Any, lo: int, hi: int, params: Any, device: Any):
    """``diff(h, d)``: the bias of head ``h`` at position difference ``d = k - q`` in ``[lo, hi]``.

    Closed form for symmetric ALiBi (bit-identical to ``spec.bias``), else a
    ``(H, hi - lo + 1)`` table of the bias per difference, built once by ``spec.bias``.
    """
    if slopes is not None:
        # a writable float32 copy: spec.slopes is read-only, which torch warns about
        m = torch.as_tensor(np.array(slopes, dtype=np.float32), device=device)
        return lambda h, d: m[h] * (-d.abs()).to(torch.float32)
    _check_toeplitz(spec)
    differences = torch.arange(lo, hi + 1, device=device)
    table = spec.bias(
        q_pos=torch.zeros(1, dtype=differences.dtype, device=device),
        k_pos=differences,
        params=params,
        backend="torch",
    )[:, 0, :]  # (H, hi - lo + 1): the bias at difference lo + t
    return lambda h, d: table[h, d - lo]


def mask_mod(
    *,
    causal: bool = False,
    q_len: int | None = None,
    k_len: int | None = None,
    q_offset: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> Any:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` with posbias's masking rules.

    ``causal`` aligns bottom-right (query ``r`` sits at key slot
    ``q_offset + r``, default ``Lk - Lq``); ``key_padding_mask`` ``(B, Lk)``
    hides padded keys; ``segment_ids`` ``(B, Lk)`` keeps attention inside a
    segment. Use it with ``create_block_mask`` so fully hidden blocks are skipped.
    """
    if q_offset is None:
        if causal and (q_len is None or k_len is None):
            raise InvalidArgumentError("a causal mask_mod needs q_len and k_len (or q_offset).")
        q_offset = (k_len - q_len) if q_len is not None and k_len is not None else 0
    offset = int(q_offset)

    def posbias_mask_mod(b, h, q_idx, kv_idx):
        slot = q_idx + offset
        keep = kv_idx >= 0
        if causal:
            keep = keep & (kv_idx <= slot)
        if key_padding_mask is not None:
            keep = keep & key_padding_mask[b, kv_idx]
        if segment_ids is not None:
            keep = keep & (segment_ids[b, kv_idx] == segment_ids[b, slot])
        return keep

    return posbias_mask_mod
