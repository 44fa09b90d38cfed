"""Forget-gate benchmarks (``log_gates=``): the targets of docs/benchmarks.md § Forget gates.

Causal attention with FoX-style log-gates ``g = logsigmoid(x + 3)`` (``≈ −0.05``,
``(B, H, L)``) and no positional bias, against what users run otherwise:

* **13a** PyTorch forward vs unbiased ``F.scaled_dot_product_attention(is_causal=True)``
  (the speed to match);
* **13b** PyTorch training step (gradients of q, k, v and ``g``) vs the unbiased
  SDPA causal training step;
* **13m** peak memory of that training step at a long length (a fresh process);
* **13c** JAX ``jit`` forward vs ``jax.nn.dot_product_attention`` with the gate
  bias precomputed (materialised ``(1, H, L, L)``, built outside the timed call).

Every timed path is checked against the materialised formula.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

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
    run_child,
)

HEADS, DIM = 16, 64


def _log_gates(length: int, seed: int = 3) -> np.ndarray:
    """``(1, H, L)`` FoX-style log-gates ``logsigmoid(x + 3)``, ``x ~ N(0, 1)`` (``≈ −0.05``)."""
    x = np.random.default_rng(seed).standard_normal((1, HEADS, length)) + 3.0
    return (-np.logaddexp(0.0, -x)).astype(np.float32)


def _gate_bias(g: np.ndarray) -> np.ndarray:
    """The materialised causal gate bias ``(B, H, L, L)`` (float32; -inf above the diagonal)."""
    total = np.cumsum(g.astype(np.float64), -1)
    bias = total[..., :, None] - total[..., None, :]
    length = g.shape[-1]
    bias[..., np.triu(np.ones((length, length), bool), 1)] = -np.inf
    return bias.astype(np.float32)


# ------------------------------------------------------------------ PyTorch
def torch_forward(length: int, repeats: int, goal) -> Result:
    import torch
    import torch.nn.functional as F

    import posbias.torch as pt

    q, k, v = _torch_inputs(length, HEADS, DIM)
    g = torch.from_numpy(_log_gates(length))
    with torch.no_grad():
        out = pt.attention(q, k, v, causal=True, log_gates=g)
        sub = slice(0, min(length, 256))  # reference on the first rows (the bias materialised)
        mask = torch.from_numpy(_gate_bias(g.numpy())[:, :, sub])
        ref = F.scaled_dot_product_attention(q[:, :, sub], k, v, attn_mask=mask)
        err = _rel(out[:, :, sub], ref)
        t_ours, t_base = best_times(
            [
                lambda: pt.attention(q, k, v, causal=True, log_gates=g),
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            ],
            repeats,
        )
    return _result(
        f"torch causal log_gates L={length} vs SDPA causal without bias",
        t_ours,
        t_base,
        goal,
        note=f"max rel err {err:.1e}",
    )


def torch_training(length: int, repeats: int, goal) -> Result:
    import torch
    import torch.nn.functional as F

    import posbias.torch as pt

    leaves = [t.requires_grad_() for t in _torch_inputs(length, HEADS, DIM)]
    gates = torch.from_numpy(_log_gates(length)).requires_grad_()

    def step(fn, with_gates):
        params = [*leaves, gates] if with_gates else leaves
        for t in params:
            t.grad = None
        fn(*leaves).square().sum().backward()
        return [t.grad for t in params]

    def ours(q, k, v):
        return pt.attention(q, k, v, causal=True, log_gates=gates)

    def materialised(q, k, v):  # autograd through the (B, H, L, L) bias: the reference
        total = torch.cumsum(gates.double(), -1)
        bias = (total[..., :, None] - total[..., None, :]).float()
        hidden = torch.ones(length, length, dtype=torch.bool).triu(1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(hidden, -1e30))

    grads = step(ours, True)
    ref = step(materialised, True)
    err = max(_rel(a, b) for a, b in zip(grads, ref, strict=True))
    del ref

    def base(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    t_ours, t_base = best_times([lambda: step(ours, True), lambda: step(base, False)], repeats)
    return _result(
        f"torch train step (fwd+bwd, dq dk dv dg) causal log_gates L={length} vs SDPA causal",
        t_ours,
        t_base,
        goal,
        note=f"grad max rel err {err:.1e}",
    )


def _memory_child(length: int, sdpa: bool = False) -> dict[str, float]:
    """Fresh process: peak RSS growth of one training step (inputs and their gradients
    excluded); ``sdpa``: the unbiased SDPA causal step instead (for comparison)."""
    import torch
    import torch.nn.functional as F

    import posbias.torch as pt

    leaves = [t.requires_grad_() for t in _torch_inputs(length, HEADS, DIM)]
    leaves.append(torch.from_numpy(_log_gates(length)).requires_grad_())
    for t in leaves:  # gradients accumulate into these: part of the inputs
        t.grad = torch.zeros_like(t)
    q, k, v, g = leaves
    before = _rss_now()
    start = time.perf_counter()
    if sdpa:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = pt.attention(q, k, v, causal=True, log_gates=g)
    out.square().sum().backward()
    del out
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_above_inputs": max(0, _peak_rss() - before)}


def torch_training_memory(length: int, limit_gb: float) -> Result:
    child = run_child(f"_memory_child({length})", "posbias.bench_gates")
    sdpa = run_child(f"_memory_child({length}, sdpa=True)", "posbias.bench_gates")
    peak = child["peak_above_inputs"] / GB
    full = HEADS * length**2 * 4 / GB  # the gate bias materialised (float32)
    return Result(
        f"torch train step causal log_gates L={length}: peak memory above inputs",
        child["seconds"],
        float("nan"),
        peak,
        f"<= {limit_gb} GiB",
        peak <= limit_gb,
        peak_gb=peak,
        note=f"unbiased SDPA causal step: {sdpa['peak_above_inputs'] / GB:.2f} GiB; "
        f"the materialised gate bias alone: {full:.1f} GiB",
    )


# ------------------------------------------------------------------ JAX
def jax_forward(length: int, repeats: int) -> Result:
    import jax
    import jax.numpy as jnp

    import posbias.jax as pj

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, length, HEADS, DIM)) for key in keys)
    g_bhl = _log_gates(length)
    g = jnp.asarray(np.swapaxes(g_bhl, 1, 2))  # (B, L, H)
    bias = jnp.asarray(_gate_bias(g_bhl))  # (1, H, L, L), precomputed outside the timed call
    ours_fn = jax.jit(lambda q, k, v, g: pj.attention(q, k, v, causal=True, log_gates=g))
    base_fn = jax.jit(
        lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True)
    )
    err = _rel(ours_fn(q, k, v, g), base_fn(q, k, v, bias))
    t_ours, t_base = best_times(
        [
            lambda: ours_fn(q, k, v, g).block_until_ready(),
            lambda: base_fn(q, k, v, bias).block_until_ready(),
        ],
        repeats,
    )
    temp = [
        f.lower(*a).compile().memory_analysis().temp_size_in_bytes
        for f, a in ((ours_fn, (q, k, v, g)), (base_fn, (q, k, v, bias)))
    ]
    return _result(
        f"jax jit causal log_gates L={length} vs jax.nn.dot_product_attention + precomputed "
        "gate bias",
        t_ours,
        t_base,
        _at_most(1.0),
        peak_gb=temp[0] / GB,
        note=f"XLA temp {temp[0] / 2**20:.0f} MiB vs {temp[1] / 2**20:.0f} MiB; "
        f"max rel err {err:.1e}",
    )


def targets(smoke: bool) -> list[tuple[str, Any]]:
    """The forget-gate targets of ``posbias bench`` (keys 13*)."""
    length = 128 if smoke else 2048
    reps = 1 if smoke else 5
    long = 256 if smoke else 16384
    return [
        ("13a", lambda: torch_forward(length, reps, _at_most(1.3))),
        ("13b", lambda: torch_training(length, reps, _at_most(1.6))),
        ("13m", lambda: torch_training_memory(long, 0.5)),
        ("13c", lambda: jax_forward(length, reps)),
    ]
