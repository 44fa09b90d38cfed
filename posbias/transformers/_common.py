"""What every patched Hugging Face attention shares: masks, the attention call, the fallback.

Masks. A patched model runs with ``config._attn_implementation = "posbias"``;
transformers' mask builders (``create_causal_mask``, ``create_bidirectional_mask``)
then call :func:`posbias_mask`, which returns the ``(B, Lk)`` padding mask
(True = real token, Hugging Face's polarity and posbias's ``key_mask``) instead
of an ``(B, 1, Lq, Lk)`` matrix — or a ``(B, 0)`` tensor when nothing is padded
(a tensor, not None: MPT calls ``.to(torch.bool)`` on the result). Causality
is the attention module's, positions of a padded batch are
``cumsum(key_mask) - 1`` (what BLOOM and Falcon build their ALiBi from), and
new queries sit bottom-right of the cached keys.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

from .. import torch as posbias_torch
from .._core import weights as _weights
from ..backends.torch import TorchBackend
from ..errors import InvalidArgumentError

#: the attention implementation name patched models run with (and ``register()`` adds)
NAME = "posbias"
#: models whose attention goes through transformers' attention interface
T5_FAMILY = ("t5", "mt5", "umt5")

#: configs of models patched by posbias.transformers.patch (by id; configs are unhashable)
_PATCHED: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_WARNED: set[str] = set()


def mark_patched(config: Any) -> None:
    _PATCHED[id(config)] = config


def is_patched(config: Any) -> bool:
    return _PATCHED.get(id(config)) is config


def check_model(config: Any) -> None:
    """A clear error when ``attn_implementation="posbias"`` meets a model it does not serve."""
    if config is None or is_patched(config):
        return
    model_type = getattr(config, "model_type", None)
    if model_type not in T5_FAMILY:
        raise InvalidArgumentError(
            f'attn_implementation="posbias" serves the T5 family ({", ".join(T5_FAMILY)}) '
            f"through transformers' attention interface, not {model_type!r}; for BLOOM, MPT and "
            "Falcon with ALiBi call posbias.transformers.patch(model)."
        )


def posbias_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    config: Any = None,
    device: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' mask interface for ``"posbias"``: the ``(B, Lk)`` padding mask.

    Returns:
        ``(B, kv_length)`` bool (True = real token), or ``(B, 0)`` bool when no key is padded.

    Raises:
        InvalidArgumentError: a mask pattern posbias does not read yet (sliding windows,
            packed sequences, overlays), a static-shape cache, or an unsupported model.
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    check_model(config)
    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise InvalidArgumentError(
            f"posbias attention reads causal or bidirectional masks with padding only, got the "
            f"mask function {getattr(mask_function, '__name__', mask_function)!r} (sliding "
            "windows, packed sequences and mask overlays are not supported yet)."
        )
    static = not isinstance(q_offset, int) or q_offset + q_length != kv_length
    if kv_offset != 0 or (mask_function is causal_mask_function and static):
        raise InvalidArgumentError(
            f"posbias attention places new queries bottom-right of the cached keys (a "
            f"DynamicCache); this cache holds {kv_length} slots for {q_length} new tokens at "
            f"offset {q_offset} (a static or sliding cache). Use the default DynamicCache."
        )
    if device is None and attention_mask is not None:
        device = attention_mask.device
    nothing = torch.zeros((batch_size, 0), dtype=torch.bool, device=device)
    if attention_mask is None:
        return nothing
    mask = attention_mask.to(torch.bool)[:, -kv_length:]
    if mask.shape != (batch_size, kv_length):
        raise InvalidArgumentError(
            f"the attention mask has shape {tuple(attention_mask.shape)}; posbias attention "
            f"needs one entry per key: ({batch_size}, {kv_length})."
        )
    return nothing if bool(mask.all()) else mask


def key_mask(mask: Any, batch: int, k_len: int) -> torch.Tensor | None:
    """The ``key_mask`` of a mask :func:`posbias_mask` built (None: nothing padded)."""
    if mask is None:
        return None
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.dtype == torch.bool):
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise InvalidArgumentError(
            f"posbias attention got an attention mask of shape {shape}; it reads the (B, L) "
            "padding masks that attn_implementation='posbias' builds (posbias.transformers.patch "
            "sets it). Custom 4-D masks are not supported yet."
        )
    if mask.shape[-1] == 0:
        return None
    if tuple(mask.shape) != (batch, k_len):
        raise InvalidArgumentError(
            f"the padding mask has shape {tuple(mask.shape)} but the attention has {batch} "
            f"sequences of {k_len} keys."
        )
    return mask


def check_dropout(p: float, training: bool) -> None:
    if training and p > 0:
        raise InvalidArgumentError(
            f"attention dropout p={p} in training mode is not supported yet by posbias "
            "attention (it needs the blockwise backward engine): set the config's attention "
            "dropout to 0 for training, or call model.eval()."
        )


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Any,
    *,
    key_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    weights: bool = False,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """posbias attention of ``(B, H, L, D)`` tensors; ``(out, probabilities or None)``.

    With ``weights=True`` (``output_attentions=True``) the exact materialised path
    runs and says so once.
    """
    if not weights:
        out = posbias_torch.attention(
            q, k, v, bias, causal=causal, key_mask=key_mask, scale=scale, **options
        )
        return out, None
    if "weights" not in _WARNED:
        _WARNED.add("weights")
        warnings.warn(
            "output_attentions=True: posbias computes the attention probabilities on its exact "
            "materialised path, which needs O(B·H·Lq·Lk) memory; the blockwise kernels never "
            "hold them. Leave output_attentions off for long sequences.",
            UserWarning,
            stacklevel=3,
        )
    return _weights.attend_with_weights(
        TorchBackend(q.device),
        q,
        k,
        v,
        bias,
        causal=causal,
        key_mask=key_mask,
        scale=scale,
        **options,
    )


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)`` → ``(B, L, H·D)``."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)
