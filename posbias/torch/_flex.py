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
* Forget gates (``log_gates=``, FoX, CABLE): :func:`gate_score_mod` reads
  ``G = cumsum(g)`` from a captured ``(B, H, Lk)`` table pair and composes
  with any of the above (``score_mod=``).

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

import torch

from .._core import conventions
from .._core import gates as _gates
from .._core import problem as _problem
from .._core.checks import MAX_POSITION, check_int
from ..errors import InvalidArgumentError, InvalidTypeError
from ..spec import BiasSpec
from ._sdpa import cumsum_hi_lo


def score_mod(
    spec: BiasSpec,
    q_len: int | None = None,
    k_len: int | None = None,
    *,
    q_offset: int | None = None,
    k_offset: int = 0,
    key_mask: torch.Tensor | None = None,
    params: Any = None,
    device: Any = None,
) -> Any:
    """The ``score_mod`` adding ``spec``'s bias (see :meth:`posbias.BiasSpec.score_mod`)."""
    q_len, k_len, q_offset = _read_lengths(q_len, k_len, q_offset)
    k_offset = check_int("k_offset", k_offset)
    if key_mask is not None:
        return _padded_score_mod(spec, q_len, k_len, q_offset, key_mask, params)
    slopes = spec.symmetric_slopes() if not spec.learnable else None
    if q_offset is None:
        if q_len is None or k_len is None:
            raise InvalidArgumentError(
                "score_mod needs q_len and k_len (or q_offset) to align the queries bottom-right."
            )
        q_offset = conventions.default_q_offset(q_len, k_len)
    shift = k_offset - q_offset  # position difference = kv_idx - q_idx + shift
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


def _padded_score_mod(spec, q_len, k_len, q_offset, key_mask, params) -> Any:
    """Bias positions of a padded batch, as posbias attention derives them: ``cumsum - 1``."""
    if q_len is None or k_len is None:
        raise InvalidArgumentError("a score_mod with key_mask needs q_len and k_len.")
    _check_mask("key_mask", key_mask, boolean=True)
    if tuple(key_mask.shape[1:]) != (k_len,):
        raise InvalidArgumentError(
            f"key_mask must have shape (B, k_len={k_len}), got {tuple(key_mask.shape)}."
        )
    if q_offset is None:
        q_offset = conventions.default_q_offset(q_len, k_len)
    from ..backends.torch import TorchBackend

    xp = TorchBackend(key_mask.device)
    k_pos = conventions.positions_from_mask(xp, key_mask)  # (B, Lk)
    slots = (torch.arange(q_len, device=key_mask.device) + q_offset).clamp(0, k_len - 1)
    q_pos = k_pos[:, slots]  # the position of each query's slot (as posbias attention)
    return positions_score_mod(spec, q_pos, k_pos, params=params)


def _check_mask(name: str, mask: Any, *, boolean: bool) -> None:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise InvalidTypeError(f"{name} must be a 2-D (B, Lk) torch tensor, got {mask!r}.")
    if boolean != (mask.dtype == torch.bool) or mask.is_floating_point():
        expected = "bool (True for a real key)" if boolean else "integer"
        raise InvalidTypeError(f"{name} must be {expected}, got dtype {mask.dtype}.")


def _read_lengths(q_len: Any, k_len: Any, q_offset: Any) -> tuple[Any, Any, Any]:
    """Strictly read the lengths (None or >= 1) and offset (None or an int) of a hook."""
    q_len, k_len = (
        None if n is None else check_int(name, n, minimum=1)
        for name, n in (("q_len", q_len), ("k_len", k_len))
    )
    if q_offset is not None:
        q_offset = check_int("q_offset", q_offset, minimum=-MAX_POSITION, maximum=MAX_POSITION)
    return q_len, k_len, q_offset


def positions_score_mod(
    spec: BiasSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, *, params: Any = None
) -> Any:
    """A ``score_mod`` for indices into position tables: bias at ``(q_pos[q_idx], k_pos[kv_idx])``.

    For shards whose tokens are not contiguous (zigzag, packed documents) and
    padded batches: the difference ``k_pos[kv_idx] - q_pos[q_idx]`` indexes the
    per-difference table. Tables are ``(L,)``, or ``(B, L)`` per sequence.
    """
    slopes = spec.symmetric_slopes() if not spec.learnable else None
    lo = int(k_pos.min()) - int(q_pos.max())
    hi = int(k_pos.max()) - int(q_pos.min())
    diff = _difference_mod(spec, slopes, lo, hi, params, q_pos.device)
    if q_pos.ndim == 2:

        def batched_score_mod(score, b, h, q_idx, kv_idx):
            (q, q_in), (k, k_in) = _take(q_pos, q_idx, b), _take(k_pos, kv_idx, b)
            return score + _nan_unless(q_in & k_in, diff(h, k - q))

        return batched_score_mod

    def posbias_score_mod(score, b, h, q_idx, kv_idx):
        (q, q_in), (k, k_in) = _take(q_pos, q_idx), _take(k_pos, kv_idx)
        return score + _nan_unless(q_in & k_in, diff(h, k - q))

    return posbias_score_mod


def _take(table: torch.Tensor, index: torch.Tensor, *lead: Any) -> tuple[Any, Any]:
    """``(table[*lead, index], index is inside table)``: never out of bounds.

    A ``score_mod`` built for some lengths and used on a longer problem would read
    outside its tables: an IndexError in eager mode, whatever memory holds (or a
    wrapped negative index) when compiled. The callers turn such entries into NaN.
    """
    size = table.shape[-1]
    inside = (index >= 0) & (index < size)
    return table[(*lead, index.clamp(0, size - 1))], inside


def _nan_unless(inside: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` where ``inside``, NaN elsewhere: a misuse shows, never a wrong number."""
    return torch.where(inside, value, torch.full_like(value, float("nan")))


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
        m = torch.tensor(slopes, dtype=torch.float32, device=device)  # a copy: slopes are read-only
        return lambda h, d: m[h] * (-d.abs()).to(torch.float32)
    _check_toeplitz(spec)
    differences = torch.arange(lo, hi + 1, device=device)
    table = spec.bias(
        q_pos=torch.zeros(1, dtype=differences.dtype, device=device),
        k_pos=differences,
        params=params,
        backend="torch",
    )[:, 0, :]  # (H, hi - lo + 1): the bias at difference lo + t

    def table_diff(h, d):
        value, inside = _take(table, d - lo, h)
        return _nan_unless(inside, value)

    return table_diff


def mask_mod(
    *,
    causal: bool = False,
    q_len: int | None = None,
    k_len: int | None = None,
    q_offset: int | None = None,
    key_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    **removed: Any,
) -> Any:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` with posbias's masking rules.

    ``causal`` aligns bottom-right (query ``r`` sits at key slot
    ``q_offset + r``, default ``Lk - Lq``); ``key_mask`` ``(B, Lk)`` bool, True
    for a real key, hides padded keys; ``segment_ids`` ``(B, Lk)`` keeps
    attention inside a segment. Use it with ``create_block_mask`` so fully
    hidden blocks are skipped. (It hides keys only: the bias positions of a
    ``score_mod`` are its offsets.)
    """
    conventions.reject_unknown(
        "posbias.torch.mask_mod",
        removed,
        ("causal", "q_len", "k_len", "q_offset", "key_mask", "segment_ids"),
    )
    causal = conventions.check_bool("causal", causal)
    q_len, k_len, q_offset = _read_lengths(q_len, k_len, q_offset)
    for name, mask, boolean in (("key_mask", key_mask, True), ("segment_ids", segment_ids, False)):
        if mask is not None:
            _check_mask(name, mask, boolean=boolean)
    if q_offset is None:
        if causal and (q_len is None or k_len is None):
            raise InvalidArgumentError("a causal mask_mod needs q_len and k_len (or q_offset).")
        known = q_len is not None and k_len is not None
        q_offset = conventions.default_q_offset(q_len, k_len) if known else 0
    offset = int(q_offset)

    def posbias_mask_mod(b, h, q_idx, kv_idx):
        slot = q_idx + offset
        keep = kv_idx >= 0
        if causal:
            keep = keep & conventions.diagonal_visible(kv_idx - slot)
        if key_mask is not None:
            keep = keep & key_mask[b, kv_idx]
        if segment_ids is not None:
            keep = keep & (segment_ids[b, kv_idx] == segment_ids[b, slot])
        return keep

    return posbias_mask_mod


def gate_score_mod(
    log_gates: torch.Tensor,
    q_len: int | None = None,
    *,
    log_gates_after: torch.Tensor | None = None,
    causal: bool = True,
    q_offset: Any = None,
    key_mask: torch.Tensor | None = None,
    score_mod: Any = None,
) -> Any:
    """A FlexAttention ``score_mod`` adding the forget-gate bias of ``log_gates=``.

    ``score + G[b, h, i] − G[b, h, kv_idx]`` with ``G = cumsum(log_gates)`` and
    ``i = q_offset + q_idx`` the query's own key slot (``q_offset`` defaults to
    ``Lk − q_len``: bottom-right, as :func:`posbias.torch.attention`), i.e.
    ``Σ_{s = kv_idx+1 .. i} g[s]``. With ``causal=False`` the keys after the
    query get ``Σ_{s = i+1 .. kv_idx} g'[s]`` from ``log_gates_after``. The
    arguments mean what they mean in :func:`posbias.torch.attention` and are
    checked by the same code (``(B, H, Lk)`` floating gates ``<= 0``; queries at
    key slots; ``key_mask`` padded keys contribute 0). The score_mod adds the
    bias only: pair it with :func:`mask_mod` (``causal=True``, ``key_mask``,
    ``segment_ids``: contiguous segments need no more, the sum between two
    tokens of one segment stays inside it) in a ``create_block_mask``.

    ``score_mod``: another ``score_mod`` (e.g. ``spec.score_mod(Lq, Lk)``)
    applied first, so a positional bias and the gates add in one call.

    **Precision.** ``G`` grows like ``L·|g|`` and a float32 table of ``G`` would
    lose the digits of nearby pairs (at ``L = 32768``, ``g ≈ −0.05``:
    ``|G| ≈ 1638``, float32 steps ``1.2e-4`` against a bias of ``≈ −0.05``). So
    ``G`` is summed in float64 (on the CPU for MPS tensors) and captured as a
    float32 pair ``hi + lo`` (``hi = float32(G)``, ``lo = float32(G − hi)``);
    the score_mod adds ``(hi[i] − hi[j]) + (lo[i] − lo[j])``: the float32
    rounding of the exact difference (about ``2⁻²⁴`` relative to the pair's
    bias, at any length that fits in memory), at the cost of two more gathers
    per score than a single table. The gradient to ``log_gates`` flows through
    the captured tables where FlexAttention's backward runs (CUDA, or eager on
    CPU; its compiled CPU backward does not exist).

    Raises:
        InvalidArgumentError: as :func:`posbias.torch.attention` with ``log_gates=``;
            neither ``q_len`` nor ``q_offset`` (the query slots are unknown).
        InvalidTypeError: non-tensor or non-floating gates, a non-bool ``key_mask``.
    """
    from ..backends.torch import TorchBackend

    causal = conventions.check_bool("causal", causal)
    if not isinstance(log_gates, torch.Tensor) or log_gates.ndim != 3:
        raise InvalidTypeError(
            "log_gates must be a (B, H, Lk) torch tensor of log-gates (<= 0), got "
            f"{type(log_gates).__name__} of shape {tuple(getattr(log_gates, 'shape', ()))}."
        )
    batch, heads, k_len = log_gates.shape
    xp = TorchBackend(log_gates.device)
    q_len = None if q_len is None else check_int("q_len", q_len, minimum=1)
    q_offset = _problem.read_q_offset(xp, q_offset, batch)
    if q_offset is None:
        if q_len is None:
            raise InvalidArgumentError(
                "gate_score_mod needs q_len (or q_offset) to place the queries at their key slots."
            )
        q_offset = conventions.default_q_offset(q_len, k_len)
    if key_mask is not None:
        key_mask = _problem.check_mask(xp, "key_mask", key_mask, batch, k_len, boolean=True)
    gates = _gates.read(
        xp,
        log_gates,
        log_gates_after,
        layout="bhld",
        batch=batch,
        heads=heads,
        k_len=k_len,
        q_len=q_len or 1,
        causal=causal,
        q_offset=q_offset,
        key_mask=key_mask,
        segment_ids=None,
        compute="float32",
        native=_problem.native,
    )
    before = cumsum_hi_lo(gates.before)
    after = None if gates.after is None else cumsum_hi_lo(gates.after)
    if isinstance(q_offset, int):
        offset = torch.tensor([q_offset], device=log_gates.device)
    else:
        offset = q_offset.reshape(-1).to(log_gates.device)
    per_batch = offset.numel() > 1

    def posbias_gate_score_mod(score, b, h, q_idx, kv_idx):
        if score_mod is not None:
            score = score_mod(score, b, h, q_idx, kv_idx)
        slot = q_idx + offset[b if per_batch else 0]
        bias = _difference(before, b, h, slot, kv_idx)
        if after is not None:
            bias = torch.where(kv_idx > slot, _difference(after, b, h, kv_idx, slot), bias)
        return score + bias

    return posbias_gate_score_mod


def _difference(table: tuple[torch.Tensor, torch.Tensor], b, h, i, j) -> torch.Tensor:
    """``G[b, h, i] − G[b, h, j]`` from the ``(hi, lo)`` pair; NaN for a slot outside it."""
    hi, lo = table
    (hi_i, inside_i), (hi_j, inside_j) = _take(hi, i, b, h), _take(hi, j, b, h)
    (lo_i, _), (lo_j, _) = _take(lo, i, b, h), _take(lo, j, b, h)
    return _nan_unless(inside_i & inside_j, (hi_i - hi_j) + (lo_i - lo_j))
