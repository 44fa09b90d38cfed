"""Choosing and running an attention implementation; the framework front doors' core."""

from __future__ import annotations

from typing import Any

import einops
import numpy as np

from .. import backends as _backends
from ..errors import InvalidArgumentError, InvalidTypeError
from .problem import LAYOUTS, Problem, prepare
from .reference import blockwise, reference_tile

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "flash_attn", "cudnn")

#: query rows per block of the blockwise implementation, per backend (measured
#: fastest at L = 2048 on CPU; see docs/performance.md)
DEFAULT_BLOCK_SIZE = {"torch": 256, "jax": 256, "tensorflow": 256, "numpy": 256}


def run(p: Problem, implementation: str, block_size: int) -> Any:
    """Compute ``p`` with the chosen implementation; ``(B, H, Lq, D)`` in ``p.compute``."""
    name = select(p, implementation)
    if name == "reference":
        return reference_tile(p, 0, p.q_len)
    if name in _DEVICE_PATHS:
        return _device_path(name).run(p)
    if p.xp.name == "torch":
        from ..torch import _sdpa

        return blockwise(p, _sdpa.tile_fn(p), block_size)
    return blockwise(p, reference_tile, block_size)


def select(p: Problem, implementation: str) -> str:
    """The implementation ``"auto"`` stands for, or a clear error when one cannot run.

    ============  ==========================  =====================================
    backend       auto picks                  also available
    ============  ==========================  =====================================
    numpy         reference                   blockwise
    torch         flash_attn when it applies  blockwise (SDPA tiles), reference
                  on CUDA, else blockwise
    jax           blockwise                   cudnn (GPU), reference
    tensorflow    blockwise                   reference
    ============  ==========================  =====================================
    """
    check_implementation(implementation)
    backend = p.xp.name
    if implementation == "auto":
        if backend == "numpy":
            return "reference"
        if backend == "torch" and _device_path("flash_attn").why_not(p) is None:
            return "flash_attn"
        return "blockwise"
    if implementation in _DEVICE_PATHS:
        needs, what = _DEVICE_PATHS[implementation]
        if backend != needs:
            raise InvalidArgumentError(
                f"implementation={implementation!r} runs on {what}, not {backend}."
            )
        reason = _device_path(implementation).why_not(p)
        if reason is not None:
            raise InvalidArgumentError(f"implementation={implementation!r} cannot run: {reason}")
    return implementation


#: vendor kernels: name -> (backend, what they run on); modules with why_not()/run()
_DEVICE_PATHS = {
    "flash_attn": ("torch", "PyTorch CUDA tensors"),
    "cudnn": ("jax", "JAX GPU arrays"),
}


def _device_path(name: str) -> Any:
    # plain imports, not importlib: torch.compile traces through this
    if name == "flash_attn":
        from ..torch import _flash

        return _flash
    from ..jax import _cudnn

    return _cudnn


def attend(
    xp,
    q: Any,
    k: Any,
    v: Any,
    bias: Any = None,
    *,
    implementation: str = "auto",
    block_size: int | None = None,
    **options: Any,
) -> Any:
    """Attention with an additive bias; ``options`` are :func:`prepare`'s keywords.

    See the module docstring for the rules; ``implementation`` and
    ``block_size`` choose the kernel (:func:`select`).
    """
    p = prepare(xp, q, k, v, bias, **options)
    block_size = check_block_size(block_size) or DEFAULT_BLOCK_SIZE[xp.name]
    out = run(p, implementation, block_size)
    layout = options.get("layout", "bhld")
    if layout != "bhld":
        out = einops.rearrange(out, f"b h l d -> {LAYOUTS[layout]}")
    return xp.cast(out, p.in_dtype)


def check_implementation(implementation: Any) -> str:
    """``implementation`` if it names one of :data:`IMPLEMENTATIONS`, else a clear error."""
    if implementation not in IMPLEMENTATIONS:
        raise InvalidArgumentError(
            f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}."
        )
    return implementation


def check_block_size(block_size: Any) -> int | None:
    """``block_size`` if it is None (the backend's default) or a positive int."""
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidArgumentError(
            f"block_size must be a positive int (query rows per block), got {block_size!r}."
        )
    return block_size


def functional(backend: str, layout: str):
    """Build a framework's ``attention(q, k, v, bias=None, *, ...)`` function."""

    def attention(
        q: Any,
        k: Any,
        v: Any,
        bias: Any = None,
        *,
        causal: bool = False,
        q_offset: Any = None,
        key_padding_mask: Any = None,
        segment_ids: Any = None,
        scale: float | None = None,
        q_pos: Any = None,
        k_pos: Any = None,
        implementation: str = "auto",
        block_size: int | None = None,
    ) -> Any:
        xp = _backends.load(backend)(_device_of(backend, q))
        return attend(
            xp,
            _native(xp, q),
            _native(xp, k),
            _native(xp, v),
            bias,
            layout=layout,
            causal=causal,
            q_offset=q_offset,
            key_padding_mask=key_padding_mask,
            segment_ids=segment_ids,
            scale=scale,
            q_pos=q_pos,
            k_pos=k_pos,
            implementation=implementation,
            block_size=block_size,
        )

    return attention


def _device_of(backend: str, x: Any) -> Any:
    if _backends.detect(x) == backend:
        return _backends.load(backend)().device_of(x)
    return None


def _native(xp, x: Any) -> Any:
    kind = _backends.detect(x)
    if kind == xp.name:
        return x
    if kind in (None, "numpy"):
        return xp.from_numpy(np.asarray(x))
    raise InvalidTypeError(
        f"posbias.{xp.name}.attention got a {kind} tensor; pass {xp.name} tensors "
        f"(or use posbias.{kind}.attention)."
    )
