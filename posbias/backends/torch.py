"""PyTorch backend."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from ..errors import BackendError
from ._base import Backend, check_dtype_name, is_seed, rng_error

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


class TorchBackend(Backend):
    name = "torch"
    xp = torch

    def native_dtype(self, name: str) -> Any:
        return _DTYPES[check_dtype_name(name, tuple(_DTYPES))]

    def dtype_name(self, dtype: Any) -> str | None:
        if isinstance(dtype, torch.dtype):
            return str(dtype).removeprefix("torch.")
        return None

    def from_numpy(self, array: np.ndarray) -> Any:
        # as_tensor would share posbias's read-only cached arrays (and warn): copy those
        # (under torch.compile an array is a traced tensor, without flags)
        if not torch.compiler.is_compiling() and not array.flags.writeable:
            array = array.copy()
        return torch.as_tensor(array, device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.float().numpy().astype(ml_dtypes.bfloat16)
        return x.numpy()

    def arange(self, n: int) -> Any:
        return torch.arange(n, device=self.device)

    def cast(self, x: Any, name: str) -> Any:
        return x.to(self.native_dtype(name))

    def is_integer(self, x: Any) -> bool:
        return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)

    def device_of(self, x: Any) -> Any:
        return x.device

    @classmethod
    def check_device(cls, device: Any) -> Any:
        if isinstance(device, torch.device):  # e.g. a tensor's or a module's: usable as is
            return device
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError):
            raise BackendError(
                f"device={device!r} is not a torch device; pass e.g. 'cpu', 'cuda:0' or a "
                "torch.device."
            ) from None
        available = {
            "cpu": True,
            "meta": True,
            "cuda": torch.cuda.is_available(),
            "mps": torch.backends.mps.is_available(),
        }
        if not available.get(parsed.type, False):
            raise BackendError(f"device={device!r}: {parsed.type} is not available here.")
        return parsed

    def on_other_device(self, x: Any) -> Any:
        if self.device is None:
            return None
        mine = torch.device(self.device)
        same = x.device.type == mine.type and mine.index in (None, x.device.index)
        return None if same else x.device

    def minimum(self, a, b):
        return torch.clamp(a, max=b) if not torch.is_tensor(b) else torch.minimum(a, b)

    def maximum(self, a, b):
        return torch.clamp(a, min=b) if not torch.is_tensor(b) else torch.maximum(a, b)

    def relu(self, x):
        return torch.relu(x)

    def sigmoid(self, x):
        return torch.sigmoid(x)

    def scalar_mlp(self, x, w1, b1, w2, b2):
        if not _chunked_mlp_applies(x, w1, b1, w2, b2):
            return super().scalar_mlp(x, w1, b1, w2, b2)
        plain = lambda *inputs: (super(TorchBackend, self).scalar_mlp(*inputs),)  # noqa: E731
        fn = self.custom_gradient(_mlp_forward, _mlp_backward, recompute=plain)
        return fn(x, w1, b1, w2, b2)[0]

    def sum(self, x, axis):
        return torch.sum(x, dim=axis)

    def take_axis(self, x, index, axis):
        return torch.index_select(x, axis, torch.as_tensor(index, device=x.device))

    def stack(self, tensors, axis):
        return torch.stack(tensors, dim=axis)

    def concat(self, tensors, axis):
        return torch.cat(tensors, dim=axis)

    def any(self, x, axis):
        return torch.any(x, dim=axis)

    fast_toeplitz = True

    def toeplitz(self, g, rows: int, cols: int):
        return g.unfold(-1, cols, 1).flip(-2)  # flip copies into a contiguous tensor

    def gather_last(self, x, index):
        return torch.gather(x, -1, index.to(torch.int64))

    def cumsum(self, x, axis):
        return torch.cumsum(x, dim=axis)

    def flip(self, x, axis):
        return torch.flip(x, dims=(axis,))

    def pad_last(self, x, before: int, after: int):
        return torch.nn.functional.pad(x, (before, after))

    def amax(self, x, axis, keepdims=False):
        return torch.amax(x, dim=axis, keepdim=keepdims)

    def sum_keepdims(self, x, axis):
        return torch.sum(x, dim=axis, keepdim=True)

    def zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=self.native_dtype(dtype), device=self.device)

    rng_kinds = "None (PyTorch's global RNG), an int seed or a torch.Generator"

    def uniform(self, rng: Any, shape: tuple[int, ...]) -> Any:
        if is_seed(rng):
            rng = torch.Generator(device=self.device or "cpu").manual_seed(int(rng))
        elif rng is not None and not isinstance(rng, torch.Generator):
            raise rng_error(self, rng)
        device = rng.device if rng is not None else self.device
        return torch.rand(shape, generator=rng, device=device).to(self.device)

    def is_concrete(self, x) -> bool:
        return not torch.compiler.is_compiling()

    autodiff = True

    def stop_gradient(self, x):
        return x.detach()

    def custom_gradient(self, forward, backward, recompute=None):
        return lambda *inputs: _CustomGradient.apply(forward, backward, recompute, *inputs)

    def vjp(self, fn, params):
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            value = fn(leaves)

        def pullback(cotangent):
            names = list(leaves)
            grads = torch.autograd.grad(
                value, [leaves[n] for n in names], cotangent, allow_unused=True
            )
            return {
                n: torch.zeros_like(leaves[n]) if g is None else g
                for n, g in zip(names, grads, strict=True)
            }

        return value.detach(), pullback


#: elements of ``x`` per chunk of :meth:`TorchBackend.scalar_mlp`: a chunk's hidden layer
#: (``W × 8192`` float32, 1 MiB for FIRE's W = 32) stays in cache across its operations
MLP_CHUNK = 8192


def _chunked_mlp_applies(x, w1, b1, w2, b2) -> bool:
    """CPU tensors of one floating dtype, eager (no ``torch.func`` transform, no
    ``torch.compile``, whose own fusion works on the plain operations), no forward-mode
    dual tensor (the hand-written gradient is reverse mode only)."""
    tensors = (x, w1, b1, w2, b2)
    return (
        all(torch.is_tensor(t) and t.device.type == "cpu" for t in tensors)
        and not any(_forward_ad.unpack_dual(t).tangent is not None for t in tensors)
        and x.dtype in (torch.float32, torch.float64)
        and all(t.dtype == x.dtype for t in tensors)
        and x.dim() >= 2
        and w1.dim() == b1.dim() == b2.dim() == 1
        and w2.dim() == 2
        and w1.shape == b1.shape == w2.shape[:1]
        and b2.shape == w2.shape[1:]
        and not torch._C._are_functorch_transforms_active()
        and not torch.compiler.is_compiling()
    )


def _mlp_hidden(xs, w1, b1):
    """``relu(w1 ⊗ xs + b1)``: the hidden layer ``(W, n)`` of a chunk ``xs`` ``(n,)``."""
    return torch.addmm(b1[:, None], w1[:, None], xs[None, :]).relu_()


def _mlp_forward(x, w1, b1, w2, b2):
    """``scalar_mlp`` chunk by chunk, heads first: ``(H, n)`` products need no transpose;
    in the inputs' dtype, also under ``torch.autocast`` (a bias is computed in float32)."""
    flat = x.reshape(-1)
    heads, size = w2.shape[1], flat.shape[0]
    out = x.new_empty((heads, size))
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for s in range(0, size, MLP_CHUNK):
            hidden = _mlp_hidden(flat[s : s + MLP_CHUNK], w1, b1)
            out[:, s : s + MLP_CHUNK] = torch.addmm(b2[:, None], w2.t(), hidden)
    out = torch.movedim(out.view(heads, *x.shape), 0, -3)  # (..., H, Lq, Lk)
    return (out,), (x, w1, b1, w2)


def _mlp_backward(saved, cotangents):
    """Gradients of ``scalar_mlp`` per chunk, its hidden layer recomputed (never saved):
    ``dw2 = h·dᵀ``, ``dh = [h > 0] ∘ (w2·d)``, ``db1 = Σ dh``, ``dw1 = dh·x``,
    ``dx = w1·dh``, ``db2 = Σ d``; sums in a fixed order (deterministic)."""
    x, w1, b1, w2 = saved
    (dout,) = cotangents
    heads = w2.shape[1]
    if dout is None:
        dout = x.new_zeros((*x.shape[:-2], heads, *x.shape[-2:]))
    d = torch.movedim(dout.to(x.dtype), -3, 0).reshape(heads, -1)
    flat = x.reshape(-1)
    dx = torch.empty_like(flat)
    dw1, db1, dw2 = torch.zeros_like(w1), torch.zeros_like(b1), torch.zeros_like(w2)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for s in range(0, flat.shape[0], MLP_CHUNK):
            xs, ds = flat[s : s + MLP_CHUNK], d[:, s : s + MLP_CHUNK]
            hidden = _mlp_hidden(xs, w1, b1)
            dw2.addmm_(hidden, ds.t())
            dh = torch.ops.aten.threshold_backward(torch.mm(w2, ds), hidden, 0)
            db1 += dh.sum(1)
            dw1.addmv_(dh, xs)
            torch.mv(dh.t(), w1, out=dx[s : s + MLP_CHUNK])
    return dx.view_as(x), dw1, db1, dw2, d.sum(1)


class _CustomGradient(torch.autograd.Function):
    """``Backend.custom_gradient`` as a ``torch.autograd.Function``."""

    @staticmethod
    def forward(ctx, forward, backward, recompute, *inputs):
        outputs, saved = forward(*inputs)
        ctx.backward_fn, ctx.recompute = backward, recompute
        ctx.save_for_backward(*inputs, *saved)
        ctx.count = len(inputs)
        return outputs

    @staticmethod
    def backward(ctx, *cotangents):
        tensors = ctx.saved_tensors  # unpacked once (torch.utils.checkpoint allows no more)
        inputs, saved = tensors[: ctx.count], tensors[ctx.count :]
        if torch.is_grad_enabled() and ctx.recompute is not None:
            # backward(create_graph=True): a gradient that is itself differentiable, through
            # the same function in plain operations (the hand-written one writes in place)
            return (None, None, None, *_differentiable_grads(ctx.recompute, inputs, cotangents))
        return (None, None, None, *ctx.backward_fn(saved, cotangents))


def _differentiable_grads(recompute, inputs, cotangents) -> list[Any]:
    """The vector-Jacobian product of ``recompute`` at ``inputs``, with its own graph."""
    # one node per argument (q, k and v may be one tensor): a gradient per argument
    inputs = [x.view_as(x) if x.requires_grad else x for x in inputs]
    outputs = recompute(*inputs)
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if c is not None]
    wanted = [i for i, x in enumerate(inputs) if x.requires_grad]
    grads = torch.autograd.grad(
        [o for o, _ in pairs],
        [inputs[i] for i in wanted],
        [c for _, c in pairs],
        create_graph=True,
        allow_unused=True,
    )
    result: list[Any] = [None] * len(inputs)
    for i, g in zip(wanted, grads, strict=True):
        result[i] = g
    return result
