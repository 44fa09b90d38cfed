"""``xp.scalar_mlp``: FIRE's ``1 → W → H`` ReLU MLP of every element, heads first.

Every backend against a NumPy float64 formula; PyTorch's chunked CPU path with its
hand-written gradient against the plain operations' autograd (float64), across
chunk boundaries, with leading batch axes, higher derivatives and ``torch.func``.
"""

from __future__ import annotations

import numpy as np
import pytest

from posbias import backends
from posbias.testing import to_numpy


def _inputs(shape, width=32, heads=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.5, 1.5, size=shape)
    return x, *(rng.normal(size=s) for s in [(width,), (width,), (width, heads), (heads,)])


def _formula(x, w1, b1, w2, b2):
    hidden = np.maximum(x[..., None] * w1 + b1, 0.0)
    return np.moveaxis(hidden @ w2 + b2, -1, -3)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 4)])
def test_every_backend_equals_the_formula(backend, shape):
    xp = backends.load(backend)(compute_dtype="float64" if backend == "numpy" else "float32")
    inputs = _inputs(shape)
    got = to_numpy(xp.scalar_mlp(*(xp.constant(a) for a in inputs)))
    np.testing.assert_allclose(got, _formula(*inputs), rtol=1e-5, atol=1e-5)


def _torch():
    torch = pytest.importorskip("torch")
    from posbias.backends import torch as bt

    return torch, bt


@pytest.mark.parametrize("shape", [(3, 4), (40, 300), (2, 70, 80)])  # 1 to 3 chunks
def test_torch_chunks_and_gradient_equal_plain_autograd(shape):
    torch, bt = _torch()
    xp = bt.TorchBackend(compute_dtype="float64")
    assert int(np.prod(shape)) <= 3 * bt.MLP_CHUNK
    leaves = [torch.tensor(a, requires_grad=True) for a in _inputs(shape, seed=len(shape))]
    cot = torch.randn((*shape[:-2], 8, *shape[-2:]), dtype=torch.float64)
    fast = xp.scalar_mlp(*leaves)
    plain = super(bt.TorchBackend, xp).scalar_mlp(*leaves)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(fast, leaves, cot)
    expected = torch.autograd.grad(plain, leaves, cot)
    for name, g, e in zip(["x", "w1", "b1", "w2", "b2"], grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)
    again = torch.autograd.grad(xp.scalar_mlp(*leaves), leaves, cot)
    assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))  # deterministic


def test_torch_higher_derivatives_and_torch_func():
    torch, bt = _torch()
    xp = bt.TorchBackend(compute_dtype="float64")
    leaves = tuple(torch.tensor(a, requires_grad=True) for a in _inputs((3, 4), width=5))
    assert torch.autograd.gradcheck(lambda *t: xp.scalar_mlp(*t), leaves)
    assert torch.autograd.gradgradcheck(lambda *t: xp.scalar_mlp(*t), leaves)
    x, *rest = (t.detach() for t in leaves)
    got = torch.func.grad(lambda x: xp.scalar_mlp(x, *rest).sum())(x)
    plain = torch.func.grad(lambda x: super(bt.TorchBackend, xp).scalar_mlp(x, *rest).sum())(x)
    torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-12)


def test_torch_float32_keeps_its_dtype_and_mixed_dtypes_take_the_plain_path():
    torch, bt = _torch()
    xp = bt.TorchBackend(compute_dtype="float32")
    inputs = [torch.tensor(a, dtype=torch.float32) for a in _inputs((6, 9))]
    out = xp.scalar_mlp(*inputs)
    assert out.dtype == torch.float32 and out.shape == (8, 6, 9)
    np.testing.assert_allclose(out.numpy(), _formula(*_inputs((6, 9))), rtol=1e-5, atol=1e-5)
    assert not bt._chunked_mlp_applies(inputs[0].double(), *inputs[1:])


def test_torch_checkpointing_forward_mode_and_autocast_around_fire():
    """Non-reentrant activation checkpointing (the saved tensors are unpacked once),
    forward-mode AD (dual tensors take the plain operations) and ``torch.autocast``
    (the chunks compute in float32, as every bias) around FIRE."""
    torch, _ = _torch()
    import torch.autograd.forward_ad as fwd
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    import posbias.torch as pt

    torch.manual_seed(0)
    fire = pt.PositionalBias("fire", num_heads=4)
    q0 = torch.randn(1, 4, 40, 8)
    calls = {
        "bias module + SDPA": lambda q: F.scaled_dot_product_attention(
            q, q, q, attn_mask=fire(40, 40)
        ),
        "posbias attention": lambda q: pt.attention(q, q, q, fire, causal=True),
    }
    for name, fn in calls.items():
        grads = []
        for wrapped in (fn, lambda q, fn=fn: checkpoint(fn, q, use_reentrant=False)):
            fire.zero_grad()
            q = q0.clone().requires_grad_()
            wrapped(q).square().sum().backward()
            grads.append([q.grad, *(p.grad.clone() for p in fire.parameters())])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    w1 = fire.params["w1"].detach()
    tangent = torch.randn_like(w1)
    with fwd.dual_level():
        out = torch.func.functional_call(fire, {"params.w1": fwd.make_dual(w1, tangent)}, (6, 6))
        got = fwd.unpack_dual(out).tangent
    want = torch.func.jvp(
        lambda w: torch.func.functional_call(fire, {"params.w1": w}, (6, 6)), (w1,), (tangent,)
    )[1]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = fire(30, 30)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, fire(30, 30), rtol=0, atol=0)
