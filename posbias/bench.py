"""Benchmarks of posbias attention against the baselines users would otherwise run.

``posbias bench`` (or ``python -m posbias bench``) runs every target of
docs/benchmarks.md and prints one table: target, posbias time, baseline time,
their ratio (both measured in the same run, best of ``repeats``), pass/fail,
peak memory, library versions and thread count. ``--smoke`` runs every path at
tiny sizes (correctness only; CI does this). ``--sweep DIR`` also writes the
time and peak-memory plots versus sequence length.

Peak memory of the long-sequence targets is measured in a fresh subprocess:
the peak resident size (VmHWM, reset first) minus the resident size once q, k, v and an
output-sized buffer exist.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import numpy as np

import posbias

from . import bench_gates as _gates
from . import bench_training as _training
from ._benchlib import (
    GB,
    Result,
    _at_least,
    _at_most,
    _peak_rss,
    _rel,
    _result,
    _rss_now,
    _torch_inputs,
    best_time,
    memory_growth,
    plot_sweep,
    run_child,
)


# ------------------------------------------------------------------ PyTorch
def torch_forward(length: int, repeats: int, *, bias: str, causal: bool, goal) -> Result:
    import torch
    import torch.nn.functional as F

    import posbias.torch as pt

    q, k, v = _torch_inputs(length)
    spec = posbias.get(bias, num_heads=q.shape[1])
    with torch.no_grad():
        out = pt.attention(q, k, v, spec, causal=causal)
        sub = slice(0, min(length, 256))  # reference on a slice of rows (bottom-right)
        ref = pt.attention(
            q[:, :, sub], k, v, spec, causal=causal, q_offset=0, implementation="reference"
        )
        err = _rel(out[:, :, sub], ref)
        ours = best_time(lambda: pt.attention(q, k, v, spec, causal=causal), repeats)
        base = best_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), repeats)
    kind = "causal" if causal else "bidirectional"
    return _result(
        f"torch {kind} {bias} L={length} vs SDPA without bias",
        ours,
        base,
        goal,
        note=f"max rel err {err:.1e}",
    )


def torch_decode(cache: int, repeats: int) -> Result:
    import torch
    import torch.nn.functional as F

    import posbias.torch as pt

    q = _torch_inputs(1)[0]
    k, v = _torch_inputs(cache, seed=1)[:2]
    spec = posbias.get("alibi", num_heads=16)
    with torch.no_grad():
        out = pt.attention(q, k, v, spec, causal=True)
        ref = pt.attention(q, k, v, spec, causal=True, implementation="reference")
        ours = best_time(lambda: pt.attention(q, k, v, spec, causal=True), repeats * 20)
        base = best_time(lambda: F.scaled_dot_product_attention(q, k, v), repeats * 20)
    return _result(
        f"torch decode 1 token, {cache}-token cache, alibi vs SDPA without bias",
        ours,
        base,
        _at_most(1.3),
        note=f"max rel err {_rel(out, ref):.1e}",
    )


def materialise(backend: str, shape: tuple[int, int, int], repeats: int) -> Result:
    heads, q_len, k_len = shape
    spec = posbias.get("alibi", num_heads=heads)
    if backend == "torch":
        import torch

        fill = lambda: torch.full(shape, 1.5)  # noqa: E731
    else:
        fill = lambda: np.full(shape, 1.5, np.float32)  # noqa: E731
    ours = best_time(lambda: spec.bias(q_len, k_len, backend=backend), repeats)
    base = best_time(fill, repeats)
    # goal on bandwidth: fill time / bias time
    res = _result(
        f"{backend} spec.bias {shape} fp32: bandwidth vs fill", base, ours, _at_least(0.5)
    )
    res.posbias_s, res.baseline_s = ours, base
    return res


# ------------------------------------------------------------------ JAX
def jax_forward(length: int, repeats: int) -> Result:
    import jax

    import posbias.jax as pj

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, length, 16, 64)) for key in keys)
    spec = posbias.get("alibi", num_heads=16)
    ours_fn = jax.jit(lambda q, k, v: pj.attention(q, k, v, spec, causal=True))
    base_fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    ref = pj.attention(q, k, v, spec, causal=True, implementation="reference")
    err = _rel(ours_fn(q, k, v), ref)
    ours = best_time(lambda: ours_fn(q, k, v).block_until_ready(), repeats)
    base = best_time(lambda: base_fn(q, k, v).block_until_ready(), repeats)
    temp = [
        f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes for f in (ours_fn, base_fn)
    ]
    return _result(
        f"jax jit causal alibi L={length} vs jax.nn.dot_product_attention causal",
        ours,
        base,
        _at_most(1.0),
        peak_gb=temp[0] / GB,
        note=f"XLA temp {temp[0] / 2**20:.0f} MiB vs {temp[1] / 2**20:.0f} MiB; "
        f"max rel err {err:.1e}",
    )


def jax_memory_scaling(lengths: tuple[int, ...]) -> Result:
    """XLA temp memory per doubling of L (O(L·block) means ~2x)."""
    import jax
    import jax.numpy as jnp

    import posbias.jax as pj

    spec = posbias.get("alibi", num_heads=16)
    temps = []
    for length in lengths:
        x = jax.ShapeDtypeStruct((1, length, 16, 64), jnp.float32)
        fn = jax.jit(lambda q, k, v: pj.attention(q, k, v, spec, causal=True))
        temps.append(fn.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes)
    return memory_growth(f"jax XLA temp memory per doubling of L {lengths}", temps)


# ------------------------------------------------------------------ TensorFlow
def tensorflow_forward(length: int, repeats: int) -> Result:
    import tensorflow as tf

    import posbias.tensorflow as ptf

    rng = np.random.default_rng(0)
    q, k, v = (tf.constant(rng.standard_normal((1, length, 16, 64)), tf.float32) for _ in range(3))
    spec = posbias.get("alibi", num_heads=16)
    bias = tf.constant(spec.bias(length, length))
    visible = tf.constant(np.tril(np.ones((length, length), bool)))

    @tf.function
    def naive(q, k, v):
        scores = tf.einsum("bqhd,bkhd->bhqk", q, k) * 64**-0.5 + bias
        scores = tf.where(visible, scores, np.finfo(np.float32).min)
        return tf.einsum("bhqk,bkhd->bqhd", tf.nn.softmax(scores, -1), v)

    ours_fn = tf.function(lambda q, k, v: ptf.attention(q, k, v, spec, causal=True))
    err = _rel(ours_fn(q, k, v).numpy(), naive(q, k, v).numpy())
    ours = best_time(lambda: ours_fn(q, k, v).numpy(), repeats)
    base = best_time(lambda: naive(q, k, v).numpy(), repeats)
    return _result(
        f"tensorflow tf.function causal alibi L={length} vs einsum+materialised bias",
        ours,
        base,
        _at_most(0.7),
        note=f"max rel err {err:.1e}",
    )


# ------------------------------------------------------- long sequences (subprocess)
def _long_child(length: int, bias: str) -> dict[str, float]:
    """Run in a fresh process: peak RSS growth of one causal forward pass."""
    import torch

    import posbias.torch as pt

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, length, 64) for _ in range(3))
    out = torch.empty_like(q)
    spec = posbias.get(bias, num_heads=16)
    before = _rss_now()
    with torch.no_grad():
        start = time.perf_counter()
        out.copy_(pt.attention(q, k, v, spec, causal=True))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_above_inputs": max(0, _peak_rss() - before)}


def long_sequences(lengths: tuple[int, int], bias: str) -> Result:
    small, large = (run_child(f"_long_child({n}, {bias!r})") for n in lengths)
    growth = large["seconds"] / small["seconds"]
    peak = max(small["peak_above_inputs"], large["peak_above_inputs"]) / GB
    full = 16 * lengths[1] ** 2 * 4 / GB
    return Result(
        f"torch causal {bias} L={lengths[0]}->{lengths[1]}: time per doubling, peak memory",
        large["seconds"],
        small["seconds"],
        growth,
        "<= 4.6x and <= 1.5 GB",
        growth <= 4.6 and peak <= 1.5,
        peak_gb=peak,
        note=f"full bias would be {full:.0f} GiB",
    )


# ------------------------------------------------------------------ driver
def targets(smoke: bool) -> list[tuple[str, Callable[[], Result]]]:
    L = 128 if smoke else 2048
    reps = 1 if smoke else 5
    long = (512, 1024) if smoke else (16384, 32768)
    mat = (2, 64, 64) if smoke else (16, 4096, 4096)
    return [
        ("1", lambda: torch_forward(L, reps, bias="alibi", causal=True, goal=_at_most(1.25))),
        ("2", lambda: torch_forward(L, reps, bias="alibi", causal=False, goal=_at_most(1.3))),
        ("3", lambda: torch_forward(L, reps, bias="t5", causal=True, goal=_at_most(1.8))),
        ("4a", lambda: long_sequences(long, "alibi")),
        ("4b", lambda: long_sequences(long, "t5")),
        ("5", lambda: jax_forward(L, reps)),
        ("5m", lambda: jax_memory_scaling((L // 2, L, 2 * L))),
        ("6", lambda: tensorflow_forward(L, reps)),
        ("8", lambda: torch_decode(64 if smoke else 8192, reps)),
        ("9a", lambda: materialise("numpy", mat, reps)),
        ("9b", lambda: materialise("torch", mat, reps)),
        *_training.targets(smoke),
        *_gates.targets(smoke),
    ]


def environment() -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "posbias": posbias.__version__,
        "cpus": str(os.cpu_count()),
    }
    for name in ("torch", "jax", "tensorflow"):
        try:
            module = __import__(name)
            info[name] = module.__version__
        except ImportError:
            pass
    if "torch" in info:
        import torch

        info["torch threads"] = str(torch.get_num_threads())
    return info


def run(
    smoke: bool = False,
    only: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[tuple[str, Result]]:
    results = []
    for key, fn in targets(smoke):
        if only and key not in only and key.rstrip("abcfm") not in only:
            continue
        if progress:
            progress(f"target {key} ...")
        results.append((key, fn()))
    return results


def format_table(results: list[tuple[str, Result]], smoke: bool) -> str:
    lines = [
        "| # | target | posbias | baseline | ratio | goal | pass | peak GiB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results:
        peak = "" if r.peak_gb is None else f"{r.peak_gb:.2f}"
        verdict = "smoke" if smoke else ("PASS" if r.passed else "FAIL")
        ours, base = (
            "—" if not np.isfinite(t) else f"{t * 1e3:.2f} ms" for t in (r.posbias_s, r.baseline_s)
        )
        lines.append(
            f"| {key} | {r.target} | {ours} | {base} "
            f"| {r.ratio:.2f}x | {r.goal} | {verdict} | {peak} | {r.note} |"
        )
    env = ", ".join(f"{k} {v}" for k, v in environment().items())
    return "\n".join(lines) + f"\n\n{env}"


# ------------------------------------------------------------------ sweep + plots
def _sweep_child(length: int, method: str) -> dict[str, float]:
    """Fresh process: time and peak memory of one causal ALiBi method at ``length``."""
    import torch
    import torch.nn.functional as F

    import posbias.torch as pt

    q, k, v = _torch_inputs(length)
    spec = posbias.get("alibi", num_heads=16)
    before = _rss_now()
    calls = {
        "posbias": lambda: pt.attention(q, k, v, spec, causal=True),
        "sdpa_no_bias": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_mask_built_per_call": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=_alibi_mask(spec, length)
        ),
    }
    with torch.no_grad():
        seconds = best_time(calls[method], 2)
    return {"seconds": seconds, "peak_gb": max(0, _peak_rss() - before) / GB}


def _alibi_mask(spec, length):
    import torch

    bias = spec.bias(length, length, backend="torch")
    return bias.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))


METHODS = ("posbias", "sdpa_no_bias", "sdpa_mask_built_per_call")


def sweep(lengths: tuple[int, ...], out_dir: str) -> dict[str, list[dict[str, float]]]:
    """Time and peak memory versus L (torch, causal ALiBi); writes two PNGs and a JSON.

    Then the training sweep of :func:`posbias.bench_training.sweep` (all but the
    longest length: a materialised bias and its gradient take 8 GiB at L = 8192).
    """
    data: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for length in lengths:
        for method in METHODS:
            point = run_child(f"_sweep_child({length}, {method!r})")
            data[method].append({"length": length, **point})
    plot_sweep(data, out_dir, "sweep", "causal ALiBi", "time per forward (s)")
    _training.sweep(lengths[:-1] if len(lengths) > 2 else lengths, out_dir)
    return data
