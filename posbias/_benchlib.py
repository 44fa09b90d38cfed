"""Measurement helpers shared by the benchmark modules (``posbias bench``).

Times are the best of ``repeats`` after a warm-up; every target reports the
ratio of posbias to a baseline measured in the same run. Peak memory is
measured in a fresh child process (VmHWM, reset first).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

GB = 2**30


@dataclasses.dataclass
class Result:
    target: str
    posbias_s: float
    baseline_s: float
    ratio: float
    goal: str
    passed: bool
    peak_gb: float | None = None
    note: str = ""


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_times(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """The best time of each of ``fns``, measured in turns (one call of each per round).

    Taking turns keeps a slow spell of a shared machine from landing on one
    side of the ratio only.
    """
    for fn in fns:
        fn()  # warm-up (compilation, caches)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def _at_most(limit: float) -> tuple[str, Callable[[float], bool]]:
    return f"<= {limit}x", lambda r: r <= limit


def _at_least(limit: float) -> tuple[str, Callable[[float], bool]]:
    return f">= {limit}x", lambda r: r >= limit


def _result(target, ours, base, goal, **extra) -> Result:
    text, ok = goal
    ratio = ours / base
    return Result(target, ours, base, ratio, text, bool(ok(ratio)), **extra)


def memory_growth(title: str, temps: list[int]) -> Result:
    """XLA temporary memory measured at doubling lengths: linear means about 2x a step."""
    growth = max(b / a for a, b in itertools.pairwise(temps))
    return Result(
        title,
        float("nan"),
        float("nan"),
        growth,
        "<= 2.5x (linear)",
        growth <= 2.5,
        peak_gb=temps[-1] / GB,
        note=" ".join(f"{t / 2**20:.0f}MiB" for t in temps),
    )


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _torch_inputs(length: int, heads: int = 16, dim: int = 64, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, length, dim, generator=gen) for _ in range(3)]


def _rss_now() -> int:
    """Resident set size now, after resetting the kernel's peak counter (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, so the peak seen later excludes imports
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """Peak resident set size since the last :func:`_rss_now` (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(call: str, module: str = "posbias.bench") -> dict[str, float]:
    """Evaluate ``<module>.<call>`` in a fresh Python process; its result dict."""
    code = f"import json, {module} as b; print(json.dumps(b.{call}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {call} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot_sweep(
    data: dict[str, list[dict[str, float]]], out_dir: str, name: str, what: str, time_label: str
) -> None:
    """``{name}.json`` and two log-log plots, ``{name}_time.png`` and ``{name}_memory.png``.

    ``data`` maps each method to points ``{"length", "seconds", "peak_gb"}``.
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, suffix in (
        ("seconds", time_label, "time"),
        ("peak_gb", "peak memory above inputs (GiB)", "memory"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, points in data.items():
            xs = [p["length"] for p in points]
            ax.plot(xs, [p[key] for p in points], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"sequence length L (H=16, D=64, {what})")
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{name}_{suffix}.png"), dpi=110)
        plt.close(fig)
