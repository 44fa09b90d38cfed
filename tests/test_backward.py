"""The blockwise backward pass: gradients of q, k, v and every bias parameter.

Every registered variant, on PyTorch, JAX and TensorFlow, for the input cases
of test_fast_attention (causal, bidirectional, offsets, per-sequence offsets,
padding, packing, explicit positions, decoding; grouped-query attention
throughout), against the same framework's float64 autodiff through the
textbook formula. Errors are normwise (``max|x - ref| / max|ref|``; the bias
parameters as one vector, since some of their gradients are exactly zero,
e.g. FIRE's output bias under softmax). Plus: bit-identical gradients run to
run, zero (never NaN) gradients for rows that see no key, half-precision
inputs, and the PyTorch path really taking its Hankel/diagonal route.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_fast_attention import CASES, _inputs

import posbias
from conftest import FRAMEWORKS
from posbias.testing import _gradients as G

TOL = 1e-5


def _spec(name: str, heads: int = 4):
    """The variant with the hyper-parameters its parity examples use (2-D grids, windows)."""
    return G.spec_for(name, heads)


def _cases(spec):
    """The test_fast_attention cases that apply to ``spec`` (2-D biases: no 1-D positions)."""
    cases = dict(CASES)
    if spec.position_dims == 2:
        del cases["explicit positions"]
    return cases


#: eager JAX compiles every operation's shapes anew: fewer blocks, fewer shapes
BLOCK_SIZE = {"torch": 4, "jax": 8, "tensorflow": 4}


def _run(framework):
    def run(spec, q, k, v, kwargs, dtype, implementation):
        return G.gradients(
            framework, spec, q, k, v, kwargs, dtype, implementation, BLOCK_SIZE[framework]
        )

    return run


RUN = {name: _run(name) for name in BLOCK_SIZE}
_error, _param_error = G.normwise, G.params_error


# -------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", posbias.list_biases())
def test_gradients_equal_a_float64_reference(framework, name):
    spec = _spec(name)
    run = RUN[framework]
    for case, (q_len, k_len, kwargs) in _cases(spec).items():
        q, k, v = _inputs(2, 4, 2, q_len, k_len, seed=len(case))
        q, k, v = (t.astype(np.float32).astype(np.float64) for t in (q, k, v))
        grads, params, _ = run(spec, q, k, v, kwargs, "float32", "blockwise")
        ref, ref_params, _ = run(spec, q, k, v, kwargs, "float64", "reference")
        for g, r, label in zip(grads, ref, "qkv", strict=True):
            assert np.isfinite(g).all(), (case, label)
            assert _error(g, r) <= TOL, (case, label, _error(g, r))
        assert spec.learnable == bool(ref_params), case
        assert _param_error(params, ref_params) <= TOL, (case, _param_error(params, ref_params))


@pytest.mark.parametrize("name", ["t5", "fire", "alibi_learned"])
@pytest.mark.parametrize("case", ["causal", "left padded"])
def test_gradients_are_bit_identical_run_to_run(framework, name, case):
    spec = _spec(name)
    q_len, k_len, kwargs = CASES[case]
    q, k, v = _inputs(2, 4, 2, q_len, k_len)
    first = RUN[framework](spec, q, k, v, kwargs, "float32", "blockwise")
    second = RUN[framework](spec, q, k, v, kwargs, "float32", "blockwise")
    for a, b in zip(first[0], second[0], strict=True):
        assert np.array_equal(a, b)
    for n in first[1]:
        assert np.array_equal(first[1][n], second[1][n]), n


@pytest.mark.parametrize("name", ["t5", "alibi", "fire"])
def test_rows_without_keys_give_zero_gradients(framework, name):
    """A fully padded sequence and causal rows before the first key: zeros, never NaN."""
    spec = _spec(name)
    q, k, v = _inputs(2, 4, 2, 6, 6)
    mask = np.ones((2, 6), bool)
    mask[1] = False  # the second sequence is all padding
    for kwargs, rows in (
        (dict(causal=True, key_mask=mask), (slice(1, 2), slice(None))),
        (dict(causal=True, q_offset=-2), (slice(None), slice(0, 2))),
    ):
        (dq, dk, dv), params, out = RUN[framework](spec, q, k, v, kwargs, "float32", "blockwise")
        assert all(np.isfinite(g).all() for g in (dq, dk, dv, *params.values()))
        b, r = rows
        assert np.all(out[b, :, r] == 0) and np.all(dq[b, :, r] == 0)
        if kwargs.get("key_mask") is not None:
            assert np.all(dk[1] == 0) and np.all(dv[1] == 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs(framework, dtype):
    """Scores, softmax and gradients in float32; gradients returned in the input dtype."""
    if framework == "tensorflow" and dtype == "float16":
        pytest.skip("covered by bfloat16; TensorFlow float16 einsum is slow on CPU")
    spec = _spec("t5")
    q, k, v = _inputs(2, 4, 2, 13, 13)
    q, k, v = (t.astype(np.float32) for t in (q, k, v))
    kwargs = dict(causal=True)
    grads, params, _ = RUN[framework](spec, q, k, v, kwargs, dtype, "blockwise")
    ref, ref_params, _ = RUN[framework](spec, q, k, v, kwargs, "float32", "reference")
    tol = 3e-2 if dtype == "bfloat16" else 5e-3
    for g, r in zip(grads, ref, strict=True):
        assert _error(g, r) <= tol
    assert _param_error(params, ref_params) <= tol


def test_diagonal_sums():
    from posbias._core.backward import diagonal_sums
    from posbias.backends.numpy import NumpyBackend

    ds = np.random.default_rng(0).normal(size=(3, 5, 7))
    sums = diagonal_sums(NumpyBackend(compute_dtype="float64"), ds)
    expected = [[np.trace(m, offset=d) for d in range(-4, 7)] for m in ds]
    np.testing.assert_allclose(sums, expected, rtol=1e-12)


# --------------------------------------------------------------- PyTorch paths
torch_only = pytest.mark.skipif("torch" not in FRAMEWORKS, reason="torch not under test")


@torch_only
@pytest.mark.parametrize("name", ["t5", "alibi_learned", "kerple_log", "alibi"])
def test_torch_toeplitz_training_takes_the_hankel_path(monkeypatch, name):
    """Learnable Toeplitz biases train without a masked tile and without the engine's tiles."""
    import torch

    import posbias.torch
    from posbias._core import backward as engine
    from posbias.torch import _backward, _sdpa

    calls = []
    for module, fn in ((_sdpa, "_masked_tile"), (_backward, "_masked_partial")):
        monkeypatch.setattr(module, fn, lambda *a, fn=fn: calls.append(fn))
    monkeypatch.setattr(engine, "tile_backward", lambda *a: calls.append("engine tile"))
    bias = posbias.torch.PositionalBias(name, 4)
    q, k, v = (torch.randn(1, 4, 40, 16, requires_grad=True) for _ in range(3))
    posbias.torch.attention(q, k, v, bias, causal=True, block_size=8).sum().backward()
    assert not calls
    assert q.grad is not None and all(p.grad is not None for p in bias.parameters())


@torch_only
def test_torch_inference_keeps_the_sdpa_tiles(monkeypatch):
    """Without gradients nothing changes: no log-sum-exp, no custom Function."""
    import torch

    import posbias.torch
    from posbias._core import backward as engine

    monkeypatch.setattr(engine, "attention", lambda *a, **k: pytest.fail("custom gradient"))
    q = torch.randn(1, 4, 20, 16, requires_grad=True)
    with torch.no_grad():
        posbias.torch.attention(q, q, q, posbias.torch.PositionalBias("t5", 4), causal=True)
    posbias.torch.attention(q.detach(), q.detach(), q.detach(), "alibi", causal=True)


@torch_only
def test_torch_callable_bias_keeps_autograd_through_the_tiles():
    """A plain callable may close over trainable tensors: they still get gradients."""
    import torch

    import posbias.torch

    slope = torch.tensor(0.5, requires_grad=True)

    def bias(q_pos, k_pos, dtype):
        return (-slope * (q_pos[:, None] - k_pos[None, :]).abs().float())[None].expand(4, -1, -1)

    q = torch.randn(1, 4, 12, 16)
    posbias.torch.attention(q, q, q, bias, causal=True, block_size=4).square().sum().backward()
    assert slope.grad is not None and slope.grad != 0


@torch_only
@pytest.mark.parametrize("bias", ["alibi", "t5", None])
def test_torch_training_with_a_value_head_size_of_its_own(bias):
    """v's head size differs from q/k's (Keras value_dim): PyTorch's fused CPU kernel
    needs one head size, so these take the engine's blocks; float64 reference."""
    import torch

    import posbias.torch

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8, generator=gen), torch.randn(2, 4, 13, 8, generator=gen)
    v = torch.randn(2, 4, 13, 5, generator=gen)
    module = bias and posbias.torch.PositionalBias(bias, num_heads=4)
    grads = []
    for dtype, implementation in ((torch.float32, "auto"), (torch.float64, "reference")):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = posbias.torch.attention(
            *leaves, module, causal=True, implementation=implementation, block_size=4
        )
        out.square().sum().backward()
        params = [] if module is None else [p.grad.clone() for p in module.parameters()]
        if module is not None:
            module.zero_grad()
        grads.append([t.grad.double() for t in leaves] + [g.double() for g in params])
    for got, ref in zip(*grads, strict=True):
        assert (got - ref).abs().max() <= TOL * ref.abs().max()


@torch_only
@pytest.mark.parametrize("learnable", [False, True])
def test_torch_func_transforms_and_double_backward(learnable):
    """torch.func (grad, vmap of grad) and backward(create_graph=True) equal the
    reference implementation's (the hand-written backward writes in place)."""
    import torch
    from torch.func import grad, vmap

    import posbias.torch as pt

    bias = pt.PositionalBias("t5", num_heads=2).double() if learnable else "alibi"
    q = torch.randn(1, 2, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(x, implementation="auto"):
        out = pt.attention(x, x, x, bias, causal=True, implementation=implementation)
        return out.pow(2).sum()

    ref = grad(lambda x: loss(x, "reference"))(q)
    assert (grad(loss)(q) - ref).abs().max() < 1e-12
    batched = vmap(grad(loss))(torch.stack([q, 2 * q]))
    assert (batched[0] - ref).abs().max() < 1e-12
    second = []
    for implementation in ("auto", "reference"):
        x = q.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(x, implementation), x, create_graph=True)
        g.square().sum().backward()
        params = [p.grad.clone() for p in bias.parameters()] if learnable else []
        if learnable:
            bias.zero_grad()
        second.append([g.detach(), x.grad, *params])
    for got, want in zip(*second, strict=True):
        assert (got - want).abs().max() < 1e-12 * max(1.0, want.abs().max())


@torch_only
def test_torch_gradients_do_not_depend_on_threads():
    """Head groups shared out to threads: any thread count gives the same result."""
    import torch

    import posbias.torch

    threads = torch.get_num_threads()
    bias = posbias.torch.PositionalBias("t5", 4)
    q0, k0, v0 = (torch.randn(2, 4, 33, 16) for _ in range(3))
    grads = []
    for count in (1, 2):
        torch.set_num_threads(count)
        try:
            bias.zero_grad()
            leaves = [t.clone().requires_grad_() for t in (q0, k0, v0)]
            posbias.torch.attention(*leaves, bias, causal=True).square().sum().backward()
            grads.append([t.grad for t in leaves] + [p.grad.clone() for p in bias.parameters()])
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    assert torch.get_num_threads() == threads


@torch_only
def test_torch_blocks_are_shared_by_cost():
    """Causal blocks cost in proportion to their keys: the costliest go first to the least
    loaded thread (a round robin left one thread 10% more work), the same way every run."""
    from posbias.torch._backward import _balanced

    costs = [256 * (i + 1) for i in range(8)]  # 8 causal blocks of 256 rows
    shares = _balanced(costs, 2)
    assert sorted(i for s in shares for i in s) == list(range(8))
    assert [sum(costs[i] for i in s) for s in shares] == [sum(costs) // 2] * 2
    assert shares == _balanced(costs, 2) and all(s == sorted(s) for s in shares)
    assert _balanced([5, 5, 5], 3) == [[0], [1], [2]]
    assert _balanced([3], 1) == [[0]]


@torch_only
def test_torch_worker_threads_stay_single_threaded(monkeypatch):
    """Every task of the backward's thread pool runs single-threaded PyTorch operations,
    even in a thread new to PyTorch whose first operation comes after another task has
    finished (PyTorch initialises a thread's count lazily from the last value any thread
    set: a worker that set it back let the next new thread run its reductions on two
    threads, and the gradients of the first call differed from the second in the last
    bits). The caller's count is back afterwards."""
    import threading

    import torch

    from posbias.torch import _backward

    monkeypatch.setattr(_backward, "_POOLS", {})  # new threads, as at a process's first call
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    started = threading.Event()
    try:

        def quick():  # returns once the other task runs in a thread of its own
            started.wait(5)

        def late():
            started.set()
            time.sleep(0.2)  # the other task has returned by now
            torch.ones(100_000).sum()  # this thread's first parallel operation
            return torch.get_num_threads()

        assert _backward._parallel([quick, late]) == [None, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
        for pool in _backward._POOLS.values():
            pool.shutdown()


# ------------------------------------------------------------------ rings
@pytest.mark.skipif("jax" not in FRAMEWORKS, reason="jax not under test")
@pytest.mark.parametrize("padded", [False, True])
def test_jax_sequence_sharded_tiles_use_the_blockwise_backward(monkeypatch, padded):
    """sharded_attention over a sequence mesh: each tile is a block of the engine's backward
    (its lse gradient included); gradients equal single-device attention."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import Mesh

    import posbias.jax as pj
    from posbias._core import backward as engine

    calls = []
    original = engine.attention
    monkeypatch.setattr(engine, "attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    devices = np.array(jax.devices()[:4])
    mesh = Mesh(devices, ("seq",))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 4, 8)), jnp.float32) for _ in "qkv")
    kwargs = dict(causal=True)
    if padded:
        mask = np.ones((2, 16), bool)
        mask[0, :5] = False
        kwargs["key_mask"] = jnp.asarray(mask)
    module = pj.PositionalBias("t5", 4, seed=1)

    def loss_ref(m, q, k, v):
        return jnp.sum(pj.attention(q, k, v, m, implementation="reference", **kwargs) ** 2)

    def loss(m, q, k, v):
        out = pj.sharded_attention(q, k, v, m, mesh=mesh, seq_axis="seq", **kwargs)
        return jnp.sum(out**2)

    expected = jax.tree.leaves(nnx.grad(loss_ref, argnums=(0, 1, 2, 3))(module, q, k, v))
    got = jax.tree.leaves(nnx.jit(nnx.grad(loss, argnums=(0, 1, 2, 3)))(module, q, k, v))
    assert calls
    for g, e in zip(got, expected, strict=True):
        assert float(jnp.max(jnp.abs(g - e)) / jnp.max(jnp.abs(e))) < 1e-5


# ------------------------------------------------------------ gradient parity
@pytest.mark.skipif(len(FRAMEWORKS) < 2, reason="gradient parity needs two frameworks")
def test_gradient_parity_cells_pass():
    """The same parameters give the same gradients in every framework (posbias parity)."""
    cells = G.check_gradients(FRAMEWORKS, ["t5", "kerple_log", "alibi_learned", "fire"])
    assert len(cells) == 4 * (len(FRAMEWORKS) - 1)
    for cell in cells:
        assert cell.passed, (cell.variant, cell.backend, cell.failures)
        assert cell.checks == len(G.cases()) and cell.max_error > 0
