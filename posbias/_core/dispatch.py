"""Choosing and running an attention implementation; the framework front doors' core.

Kernels register themselves: a framework package calls :func:`register_kernel`
when it is imported (``posbias.torch`` registers its SDPA tiles and
FlashAttention, ``posbias.jax`` cuDNN), so this module imports no kernel and no
framework. :func:`select` picks what ``implementation="auto"`` stands for, or
says why an explicitly requested kernel cannot run; :func:`attention` is what
every framework's ``attention`` function calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import einops

from .. import backends as _backends
from ..errors import InvalidArgumentError
from . import backward as _backward
from . import conventions
from . import weights as _weights
from .checks import check_rate
from .problem import LAYOUTS, Problem, prepare
from .reference import blockwise, reference_tile

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "flash_attn", "cudnn")

#: query rows per block of the blockwise implementation, per backend (measured
#: fastest at L = 2048 on CPU; see docs/performance.md)
DEFAULT_BLOCK_SIZE = {"torch": 256, "jax": 256, "tensorflow": 256, "numpy": 256}

#: the keyword arguments of every framework's ``attention`` (the signatures agree)
ATTENTION_KEYWORDS = (
    "causal",
    "q_offset",
    "key_mask",
    "segment_ids",
    "scale",
    "q_pos",
    "k_pos",
    "attn_mask",
    "log_gates",
    "log_gates_after",
    "dropout_p",
    "dropout_rng",
    "implementation",
    "block_size",
)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """An attention implementation of one framework.

    Attributes:
        name: the ``implementation=`` value (``"blockwise"``, ``"flash_attn"``, ...).
        backend: the backend whose tensors it takes.
        runs_on: what it needs, in words (for errors), e.g. ``"PyTorch CUDA tensors"``.
        why_not: ``why_not(p)`` → None when it can compute ``p`` exactly, else the reason.
        run: ``run(p)`` → ``(B, H, Lq, D)`` in ``p.compute`` (a whole-problem kernel).
        tile: ``tile(p)`` → a tile function ``(p, r0, r1) -> rows`` for :func:`blockwise`.
        blocks: ``blocks(p, block_size)`` → rows: a whole blockwise computation
            (with its own backward pass), used instead of ``tile`` when given.
        auto: ``implementation="auto"`` picks it whenever ``why_not`` says it can run.
    """

    name: str
    backend: str
    runs_on: str
    why_not: Callable[[Problem], str | None] | None = None
    run: Callable[[Problem], Any] | None = None
    tile: Callable[[Problem], Any] | None = None
    blocks: Callable[[Problem, int], Any] | None = None
    auto: bool = False


_KERNELS: dict[tuple[str, str], Kernel] = {}
#: vendor kernels and what they run on, known before their framework is imported
_VENDOR = {"flash_attn": "PyTorch CUDA tensors", "cudnn": "JAX GPU arrays"}


def register_kernel(kernel: Kernel) -> Kernel:
    """Make ``kernel`` available to :func:`select` (a framework package calls this on import)."""
    _KERNELS[(kernel.backend, kernel.name)] = kernel
    return kernel


def run(p: Problem, implementation: str, block_size: int) -> Any:
    """Compute ``p`` with the chosen implementation; ``(B, H, Lq, D)`` in ``p.compute``."""
    name = select(p, implementation)
    if p.q_len == 0 or p.k_len == 0:  # no rows, or rows that see no key: zeros
        return _empty(p)
    if name == "reference":
        return reference_tile(p, 0, p.q_len)
    if name == "blockwise":
        kernel = _KERNELS.get((p.xp.name, "blockwise"))
        if kernel is not None and kernel.blocks is not None:
            return kernel.blocks(p, block_size)
        if kernel is None and p.xp.autodiff and _backward.supported(p):
            # the blockwise backward pass (posbias._core.backward): JAX, TensorFlow
            return _backward.attention(p, block_size)[0]
        return blockwise(p, reference_tile if kernel is None else kernel.tile(p), block_size)
    return _KERNELS[(p.xp.name, name)].run(p)


def _empty(p: Problem) -> Any:
    """The zeros of a problem without rows or keys, still a function of the empty input
    (so that autodiff finds a graph: zero gradients, not a "no grad" error)."""
    xp = p.xp
    zeros = xp.zeros((p.batch, p.heads, p.q_len, xp.shape(p.v)[-1]), p.compute)
    empty = p.q if p.q_len == 0 else p.v  # (B, H, 0, D): sums over its length axis are 0
    total = xp.sum_keepdims(xp.sum_keepdims(xp.cast(empty, p.compute), -1), 2)
    return zeros + total[:, :1]


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
        for (owner, name), kernel in _KERNELS.items():
            if owner == backend and kernel.auto and kernel.why_not(p) is None:
                return name
        return "reference" if backend == "numpy" else "blockwise"
    if implementation in ("reference", "blockwise"):
        return implementation
    kernel = _KERNELS.get((backend, implementation))
    if kernel is None:
        raise InvalidArgumentError(
            f"implementation={implementation!r} runs on {_VENDOR[implementation]}, not {backend}."
        )
    reason = kernel.why_not(p)
    if reason is not None:
        raise InvalidArgumentError(f"implementation={implementation!r} cannot run: {reason}")
    return implementation


def attend(
    xp,
    q: Any,
    k: Any,
    v: Any,
    bias: Any = None,
    *,
    implementation: str = "auto",
    block_size: int | None = None,
    out_dtype: str | None = None,
    dropout_p: Any = 0.0,
    dropout_rng: Any = None,
    **options: Any,
) -> Any:
    """Attention with an additive bias; ``options`` are :func:`prepare`'s keywords.

    See :mod:`posbias._core.problem` for the rules; ``implementation`` and
    ``block_size`` choose the kernel (:func:`select`); the output has
    ``out_dtype`` (default: the queries' dtype). ``dropout_p > 0`` (attention
    dropout, SDPA's name) runs the exact materialised path
    (:mod:`posbias._core.weights`): each probability is kept with probability
    ``1 - dropout_p`` (uniforms from ``xp.uniform(dropout_rng, ...)``, the
    framework's RNG) and scaled by ``1 / (1 - dropout_p)``, zeroed otherwise.
    """
    check_implementation(implementation)
    block_size = check_block_size(block_size) or DEFAULT_BLOCK_SIZE[xp.name]
    rate = check_rate("dropout_p", dropout_p)
    if dropout_rng is not None:
        xp.uniform(dropout_rng, (0,))  # a clear error for a wrong rng, also when unused
    if rate > 0:
        if implementation not in ("auto", "reference"):
            raise InvalidArgumentError(
                f"dropout_p={rate} runs the exact materialised path (the probabilities are "
                f"dropped), not implementation={implementation!r}: use 'auto' or 'reference'."
            )

        def drop(probs: Any) -> Any:
            keep = xp.uniform(dropout_rng, tuple(xp.shape(probs))) >= rate
            return xp.where(keep, probs / (1.0 - rate), 0.0)

        out, _ = _weights.attend_with_weights(
            xp, q, k, v, bias, out_dtype=out_dtype, dropout=drop, **options
        )
        return out
    p = prepare(xp, q, k, v, bias, **options)
    out = run(p, implementation, block_size)
    layout = options.get("layout", "bhld")
    if layout != "bhld":
        out = einops.rearrange(out, f"b h l d -> {LAYOUTS[layout]}")
    return xp.cast(out, out_dtype or p.in_dtype)


def attention(
    backend: str, layout: str, q: Any, k: Any, v: Any, bias: Any, removed: dict, **options: Any
) -> Any:
    """The body of ``posbias.<backend>.attention``: reject unknown keywords, then :func:`attend`.

    ``removed`` holds the keyword arguments the public signature does not name
    (``key_padding_mask=`` gets an error explaining ``key_mask``).
    """
    conventions.reject_unknown(f"posbias.{backend}.attention", removed, ATTENTION_KEYWORDS)
    xp = _backends.load(backend)(_device_of(backend, q))
    return attend(xp, q, k, v, bias, layout=layout, **options)


def _device_of(backend: str, x: Any) -> Any:
    if _backends.detect(x) == backend:
        return _backends.load(backend)().device_of(x)
    return None


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
