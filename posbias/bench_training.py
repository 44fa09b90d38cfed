"""Training-step benchmarks (forward + backward): the targets of docs/benchmarks.md § Training.

A training step is ``loss = sum(attention(...)²)``, then gradients of q, k, v
and of every bias parameter. posbias runs its blockwise backward pass
(:mod:`posbias._core.backward`); the baselines are what users run otherwise:
unbiased ``F.scaled_dot_product_attention(is_causal=True)`` (the speed to
match), ``jax.nn.dot_product_attention`` with a bias gathered from the T5
table (precomputed bucket indices), and TensorFlow einsum attention with the
same materialised bias. Every timed path is checked against a reference:
gradients of the materialised-bias formula (``grad max rel err`` in the note;
the bias module's own autograd gives the bias part, for FIRE the hand-written
``scalar_mlp`` gradient that tests/test_scalar_mlp.py checks separately).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import posbias

from ._benchlib import (
    GB,
    Result,
    _at_most,
    _peak_rss,
    _rel,
    _result,
    _rss_now,
    _torch_inputs,
    best_times,
    memory_growth,
    plot_sweep,
    run_child,
)

HEADS, DIM = 16, 64


def _t5(heads: int = HEADS):
    """The decoder's T5 buckets (``bidirectional=False``): what a causal model trains."""
    return posbias.get("t5", num_heads=heads, bidirectional=False)


def _bias_spec(bias: str):
    return _t5() if bias == "t5" else posbias.get(bias, num_heads=HEADS)


def _buckets(spec, length: int) -> np.ndarray:
    """``(L, L)`` T5 bucket indices of ``d = j - i`` (precomputed, as Hugging Face does)."""
    from .backends.numpy import NumpyBackend

    d = np.arange(length)[None, :] - np.arange(length)[:, None]
    return np.asarray(spec.bucket(NumpyBackend(), d))


# ------------------------------------------------------------------ PyTorch
def torch_training(length: int, repeats: int, *, bias: str, learnable: bool, goal) -> Result:
    """Causal training step with ``bias`` (a trained ``PositionalBias`` when ``learnable``)."""
    import torch
    import torch.nn.functional as F

    import posbias.torch as pt

    spec = _bias_spec(bias)
    module = pt.PositionalBias(spec) if learnable else None
    leaves = [t.requires_grad_() for t in _torch_inputs(length, HEADS, DIM)]
    params = list(module.parameters()) if module is not None else []

    def step(fn):
        for t in leaves + params:
            t.grad = None
        fn(*leaves).square().sum().backward()
        return [t.grad for t in leaves + params]

    ours = lambda q, k, v: pt.attention(q, k, v, module or spec, causal=True)  # noqa: E731
    grads = step(ours)
    # gradient reference: SDPA with the materialised bias (and its autograd) + causal mask
    hidden = torch.ones(length, length, dtype=torch.bool).triu(1)

    def materialised(q, k, v):
        values = (
            module(length, length)
            if module is not None
            else spec.bias(length, length, backend="torch")
        )
        mask = values.masked_fill(hidden, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    err = _grad_error(grads, step(materialised), len(params))
    base = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    t_ours, t_base = best_times([lambda: step(ours), lambda: step(base)], repeats)
    kind = f"learnable {bias}" if learnable else f"fixed {bias}"
    return _result(
        f"torch train step (fwd+bwd) causal {kind} L={length} vs SDPA causal",
        t_ours,
        t_base,
        goal,
        note=f"grad max rel err {err:.1e}",
    )


def _grad_error(grads: list, ref: list, params: int) -> float:
    """Largest normwise error of q, k, v and of the bias parameters as one vector (some of
    their gradients are exactly zero: FIRE's output bias under softmax)."""
    import torch

    split = len(grads) - params
    errors = [_rel(a, b) for a, b in zip(grads[:split], ref[:split], strict=True)]
    if params:
        flat = [torch.cat([g.reshape(-1) for g in gs[split:]]) for gs in (grads, ref)]
        errors.append(_rel(*flat))
    return max(errors)


def _memory_child(length: int, bias: str) -> dict[str, float]:
    """Fresh process: peak RSS growth of one training step (inputs and their gradients excluded)."""
    import torch

    import posbias.torch as pt

    torch.manual_seed(0)
    leaves = [t.requires_grad_() for t in _torch_inputs(length, HEADS, DIM)]
    for t in leaves:  # gradients accumulate into these: part of the inputs
        t.grad = torch.zeros_like(t)
    module = pt.PositionalBias(_bias_spec(bias))
    before = _rss_now()
    start = time.perf_counter()
    pt.attention(*leaves, module, causal=True).square().sum().backward()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_above_inputs": max(0, _peak_rss() - before)}


def torch_training_memory(length: int, bias: str, limit_gb: float) -> Result:
    child = run_child(f"_memory_child({length}, {bias!r})", "posbias.bench_training")
    peak = child["peak_above_inputs"] / GB
    full = 2 * HEADS * length**2 * 4 / GB  # the bias and its gradient, materialised
    return Result(
        f"torch train step causal learnable {bias} L={length}: peak memory above inputs",
        child["seconds"],
        float("nan"),
        peak,
        f"<= {limit_gb} GiB",
        peak <= limit_gb,
        peak_gb=peak,
        note=f"a materialised bias + its gradient: {full:.1f} GiB",
    )


# ------------------------------------------------------------------ JAX
def _jax_steps(length: int):
    """``(ours, baseline, args)``: jitted gradients of a learnable-T5 causal loss."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import posbias.jax as pj

    spec = _t5()
    graphdef, state = nnx.split(pj.PositionalBias(spec))
    table = nnx.to_pure_dict(state)["param_table"]
    buckets = jnp.asarray(_buckets(spec, length))

    def ours(state, q, k, v):
        out = pj.attention(q, k, v, nnx.merge(graphdef, state), causal=True)
        return jnp.sum(out**2)

    def baseline(table, q, k, v):
        bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # (1, H, L, L)
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True)
        return jnp.sum(out**2)

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    qkv = [jax.random.normal(key, (1, length, HEADS, DIM)) for key in keys]
    argnums = (0, 1, 2, 3)
    return (
        jax.jit(jax.grad(ours, argnums=argnums)),
        jax.jit(jax.grad(baseline, argnums=argnums)),
        (state, *qkv),
        (table, *qkv),
    )


def jax_training(length: int, repeats: int) -> Result:
    import jax
    from flax import nnx

    ours_fn, base_fn, ours_args, base_args = _jax_steps(length)
    ours, base = ours_fn(*ours_args), base_fn(*base_args)
    grads = [nnx.to_pure_dict(ours[0])["param_table"], *ours[1:]]
    err = max(_rel(a, b) for a, b in zip(grads, base, strict=True))

    def run(fn, args):
        return lambda: jax.block_until_ready(fn(*args))

    t_ours, t_base = best_times([run(ours_fn, ours_args), run(base_fn, base_args)], repeats)
    temp = [
        f.lower(*a).compile().memory_analysis().temp_size_in_bytes
        for f, a in ((ours_fn, ours_args), (base_fn, base_args))
    ]
    return _result(
        f"jax jit(grad) causal learnable t5 L={length} vs jax.nn.dot_product_attention + "
        "gathered bias",
        t_ours,
        t_base,
        _at_most(1.0),
        peak_gb=temp[0] / GB,
        note=f"XLA temp {temp[0] / 2**20:.0f} MiB vs {temp[1] / 2**20:.0f} MiB; "
        f"grad max rel err {err:.1e}",
    )


def jax_training_memory(lengths: tuple[int, ...]) -> Result:
    """XLA temp memory of ``jit(grad)`` per doubling of L (linear means about 2x)."""
    temps = []
    for length in lengths:
        ours_fn, _, ours_args, _ = _jax_steps(length)
        temps.append(ours_fn.lower(*ours_args).compile().memory_analysis().temp_size_in_bytes)
    return memory_growth(
        f"jax jit(grad) learnable t5: XLA temp memory per doubling of L {lengths}", temps
    )


# ------------------------------------------------------------------ TensorFlow
def tensorflow_training(length: int, repeats: int) -> Result:
    import tensorflow as tf

    import posbias.tensorflow as ptf

    spec = _t5()
    module = ptf.PositionalBias(spec)
    table = module.bias_params["table"]
    buckets = tf.constant(_buckets(spec, length))
    visible = tf.constant(np.tril(np.ones((length, length), bool)))
    rng = np.random.default_rng(0)
    q, k, v = (tf.constant(rng.standard_normal((1, length, HEADS, DIM)), tf.float32) for _ in "qkv")

    def grads(attend):
        @tf.function(autograph=False)  # nothing to convert; autograph misreads nested defs
        def step(q, k, v):
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                loss = tf.reduce_sum(attend(q, k, v) ** 2)
            return tape.gradient(loss, [q, k, v, table])

        return step

    def naive(q, k, v):
        bias = tf.transpose(tf.gather(table, buckets), [2, 0, 1])  # (H, L, L)
        scores = tf.einsum("bqhd,bkhd->bhqk", q, k) * DIM**-0.5 + bias
        scores = tf.where(visible, scores, np.finfo(np.float32).min)
        return tf.einsum("bhqk,bkhd->bqhd", tf.nn.softmax(scores, -1), v)

    ours_fn = grads(lambda q, k, v: ptf.attention(q, k, v, module, causal=True))
    base_fn = grads(naive)
    dense = [tf.convert_to_tensor(g).numpy() for g in ours_fn(q, k, v)]
    ref = [tf.convert_to_tensor(g).numpy() for g in base_fn(q, k, v)]
    err = max(_rel(a, b) for a, b in zip(dense, ref, strict=True))

    def run(fn):
        return lambda: [tf.convert_to_tensor(g).numpy() for g in fn(q, k, v)]

    t_ours, t_base = best_times([run(ours_fn), run(base_fn)], repeats)
    return _result(
        f"tensorflow tf.function train step causal learnable t5 L={length} vs einsum + "
        "materialised bias",
        t_ours,
        t_base,
        _at_most(0.7),
        note=f"grad max rel err {err:.1e}",
    )


# ------------------------------------------------------------------ sweep
#: training steps compared in the sweep (each point a fresh process)
METHODS = ("posbias learnable t5", "sdpa causal, no bias", "hf-style t5 mask + sdpa")


def _sweep_child(length: int, method: str) -> dict[str, float]:
    """Fresh process: time and peak memory of one causal training step at ``length``."""
    import torch
    import torch.nn.functional as F

    import posbias.torch as pt

    spec = _t5()
    module = pt.PositionalBias(spec)
    leaves = [t.requires_grad_() for t in _torch_inputs(length, HEADS, DIM)]
    buckets = torch.as_tensor(_buckets(spec, length))
    hidden = torch.ones(length, length, dtype=torch.bool).triu(1)

    def hf_style(q, k, v):  # the table gathered into an (H, L, L) mask on every call
        table = module.params["table"]
        mask = table[buckets].permute(2, 0, 1).masked_fill(hidden, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    calls = {
        METHODS[0]: lambda q, k, v: pt.attention(q, k, v, module, causal=True),
        METHODS[1]: lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        METHODS[2]: hf_style,
    }

    def step():
        for t in [*leaves, *module.parameters()]:
            t.grad = None
        calls[method](*leaves).square().sum().backward()

    step()  # warm-up
    before = _rss_now()
    start = time.perf_counter()
    step()
    return {"seconds": time.perf_counter() - start, "peak_gb": max(0, _peak_rss() - before) / GB}


def sweep(lengths: tuple[int, ...], out_dir: str) -> dict[str, list[dict[str, float]]]:
    """Training step time and peak memory versus L (PyTorch, causal, learnable T5 table):
    ``train_sweep.json``, ``train_sweep_time.png``, ``train_sweep_memory.png``."""
    data: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for length in lengths:
        for method in METHODS:
            point = run_child(f"_sweep_child({length}, {method!r})", "posbias.bench_training")
            data[method].append({"length": length, **point})
    plot_sweep(data, out_dir, "train_sweep", "causal, learnable T5", "time per training step (s)")
    return data


def targets(smoke: bool) -> list[tuple[str, Any]]:
    """The training targets of ``posbias bench`` (keys 7, 10*, 11*, 12)."""
    length = 128 if smoke else 2048
    reps = 1 if smoke else 5
    long = 256 if smoke else 8192

    def torch_target(bias, learnable, limit):
        return lambda: torch_training(
            length, reps, bias=bias, learnable=learnable, goal=_at_most(limit)
        )

    return [
        ("7", torch_target("alibi", False, 1.25)),
        ("10a", torch_target("t5", True, 1.5)),
        ("10b", torch_target("alibi_learned", True, 1.5)),
        ("10c", torch_target("kerple_log", True, 1.5)),
        ("10f", torch_target("fire", True, 2.5)),
        ("10m", lambda: torch_training_memory(long, "t5", 0.5)),
        ("11", lambda: jax_training(length, reps)),
        ("11m", lambda: jax_training_memory((length // 2, length, 2 * length))),
        ("12", lambda: tensorflow_training(length, reps)),
    ]
