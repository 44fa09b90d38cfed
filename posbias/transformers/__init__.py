"""posbias attention inside Hugging Face transformers models: :func:`patch` and :func:`register`.

    >>> import torch, transformers, posbias.transformers
    >>> config = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    >>> model = posbias.transformers.patch(transformers.BloomForCausalLM(config).eval())
    >>> model.config._attn_implementation
    'posbias'
    >>> ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    >>> mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])   # left padding
    >>> model(ids, attention_mask=mask).logits.shape
    torch.Size([2, 5, 64])

BLOOM, MPT and Falcon (``alibi=True``) build an ALiBi tensor and run eager
attention over ``(B, H, Lq, Lk)`` scores; T5, mT5 and UMT5 build a
``(1, H, Lq, Lk)`` position bias. :func:`patch` replaces their attention by
posbias's exact blockwise attention (``posbias.torch.attention``: PyTorch SDPA
tiles): nothing of size ``Lq × Lk`` per head is built, the bias comes from
the model's own slopes or ``relative_attention_bias`` table (which still
trains), and ``generate()`` with the KV cache, left padding, gradients and
``save_pretrained`` keep working. ``output_attentions=True``
falls back to posbias's exact materialised path (and warns once).
"""

from __future__ import annotations

import copy
from types import MethodType
from typing import Any

from ..errors import InvalidArgumentError, InvalidTypeError
from . import _alibi, _common, _t5

__all__ = ["SUPPORTED", "patch", "register"]

#: ``config.model_type`` values :func:`patch` supports
SUPPORTED = ("bloom", "mpt", "falcon", "t5", "mt5", "umt5")


def register() -> None:
    """Register ``attn_implementation="posbias"`` with transformers (idempotent).

    Adds posbias's attention function to transformers' ``AttentionInterface``
    and its padding-mask builder to ``AttentionMaskInterface``, so the T5 family
    (whose attention goes through that interface) runs posbias attention with
    ``from_pretrained(name, attn_implementation="posbias")`` or
    ``model.set_attn_implementation("posbias")``. The position bias is then
    still built by transformers as a ``(1, H, Lq, Lk)`` tensor and read per
    block; :func:`patch` also removes that. Other models raise a clear error
    with ``"posbias"`` (BLOOM, MPT, Falcon: use :func:`patch`).

    Raises:
        BackendUnavailableError / ImportError: transformers or PyTorch is not installed.

    Example:
        >>> import transformers, posbias.transformers
        >>> posbias.transformers.register()
        >>> "posbias" in transformers.AttentionInterface().valid_keys()
        True
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_common.NAME, _t5.posbias_attention)
    AttentionMaskInterface.register(_common.NAME, _common.posbias_mask)


def patch(model: Any) -> Any:
    """Swap a Hugging Face model's attention for posbias attention, in place.

    Supported (``config.model_type``): ``bloom``, ``mpt``, ``falcon`` with
    ``alibi=True``, and the T5 family ``t5``, ``mt5``, ``umt5``. Each attention
    module keeps its own projections and cache updates and computes
    ``softmax(q·kᵀ·scale + bias + mask)·v`` with ``posbias.torch.attention``:

    * ALiBi models: causal, the model's own slopes (read from its
      ``build_*alibi_tensor``), in posbias's relative form ``-m_h·|i - j|``;
    * T5 family: the module's ``relative_attention_bias`` table (trainable)
      with its bucket settings, bidirectional in the encoder.

    Padding comes from the ``attention_mask`` (True/1 = real token): padded
    keys are hidden and positions are ``cumsum(mask) - 1``, so a left-padded
    sequence gets the outputs of the unpadded one. With a ``DynamicCache``
    (``generate()``'s default) new queries sit bottom-right of the cached keys.
    The model gets its own copy of its config with ``_attn_implementation =
    "posbias"`` (other models built from the same config object are not
    affected; ``save_pretrained`` does not save it and writes the unchanged
    weights: patch the reloaded model again).

    Args:
        model: a ``transformers.PreTrainedModel`` of a supported type.

    Returns:
        The same model, patched (patching twice is harmless).

    Raises:
        InvalidTypeError: ``model`` is not a transformers model.
        InvalidArgumentError: an unsupported model type, Falcon without ALiBi or
            with FlashAttention-2 modules. At call time: attention dropout in
            training mode, static caches, custom 4-D masks.

    Example:
        >>> import torch, transformers, posbias.transformers
        >>> config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
        ...                                num_heads=4, decoder_start_token_id=0)
        >>> model = transformers.T5ForConditionalGeneration(config).eval()
        >>> model = posbias.transformers.patch(model)
        >>> out = model.generate(torch.tensor([[5, 6, 7, 1]]), max_new_tokens=3, min_new_tokens=3)
        >>> out.shape
        torch.Size([1, 4])
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise InvalidTypeError(
            f"patch() takes a transformers PreTrainedModel, got {type(model).__name__}."
        )
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise InvalidArgumentError(
            f"posbias.transformers.patch supports {', '.join(SUPPORTED)}; got a {model_type!r} "
            f"model ({type(model).__name__})."
        )
    register()
    count = _PATCHERS[model_type](model)
    if count == 0:
        raise InvalidArgumentError(f"{type(model).__name__} has no attention module to patch.")
    _own_configs(model)
    return model


def _own_configs(model: Any) -> None:
    """Give the model (and its submodules) copies of their configs, set to ``"posbias"``.

    Another model built from the same config object keeps its attention: only
    this model's masks and attention calls see ``_attn_implementation = "posbias"``.
    """
    from transformers import PretrainedConfig

    copies: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if not isinstance(config, PretrainedConfig):
            continue
        if _common.is_patched(config):
            continue
        if id(config) not in copies:
            own = copy.deepcopy(config)
            own._attn_implementation_internal = _common.NAME
            _common.mark_patched(own)
            copies[id(config)] = own
        module.config = copies[id(config)]


def _patch_modules(model: Any, cls: type, info: Any, forward: Any) -> int:
    count = 0
    for module in model.modules():
        if isinstance(module, cls):
            module._posbias = info(module)
            module.forward = MethodType(forward, module)
            count += 1
    return count


def _patch_bloom(model: Any) -> int:
    from transformers.models.bloom.modeling_bloom import BloomAttention

    return _patch_modules(model, BloomAttention, _alibi.bloom_info, _alibi.bloom_forward)


def _patch_mpt(model: Any) -> int:
    from transformers.models.mpt.modeling_mpt import MptAttention, MptBlock

    for block in model.modules():
        if isinstance(block, MptBlock):
            block.forward = MethodType(_alibi.mpt_block_forward, block)
    return _patch_modules(model, MptAttention, _alibi.mpt_info, _alibi.mpt_forward)


def _patch_falcon(model: Any) -> int:
    from transformers.models.falcon.modeling_falcon import FalconAttention, FalconFlashAttention2

    if not getattr(model.config, "alibi", False):
        raise InvalidArgumentError(
            "this Falcon model uses rotary position embeddings (config.alibi=False): there is "
            "no positional bias for posbias to compute."
        )
    if any(isinstance(m, FalconFlashAttention2) for m in model.modules()):
        raise InvalidArgumentError(
            "Falcon's FlashAttention-2 modules do not support ALiBi; load the model with "
            'attn_implementation="sdpa" or "eager", then patch it.'
        )
    return _patch_modules(model, FalconAttention, _alibi.falcon_info, _alibi.falcon_forward)


def _patch_t5_family(stack_cls: type, per_layer_tables: bool) -> Any:
    def patch_model(model: Any) -> int:
        stacks = [m for m in model.modules() if isinstance(m, stack_cls)]
        return sum(_t5.patch_stack(s, per_layer_tables=per_layer_tables) for s in stacks)

    return patch_model


def _patch_t5(model: Any) -> int:
    from transformers.models.t5.modeling_t5 import T5Stack

    return _patch_t5_family(T5Stack, False)(model)


def _patch_mt5(model: Any) -> int:
    from transformers.models.mt5.modeling_mt5 import MT5Stack

    return _patch_t5_family(MT5Stack, False)(model)


def _patch_umt5(model: Any) -> int:
    from transformers.models.umt5.modeling_umt5 import UMT5Stack

    return _patch_t5_family(UMT5Stack, True)(model)


_PATCHERS = {
    "bloom": _patch_bloom,
    "mpt": _patch_mpt,
    "falcon": _patch_falcon,
    "t5": _patch_t5,
    "mt5": _patch_mt5,
    "umt5": _patch_umt5,
}
