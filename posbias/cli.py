"""The ``posbias`` command line: ``list``, ``show``, ``plot``, ``parity``, ``bench`` and ``comm``.

    posbias list [PATTERN]
    posbias show NAME [--heads H] [--length L] [--param KEY=VALUE ...] [--all-heads]
    posbias plot NAME [--heads H] [--length L] [--param KEY=VALUE ...] [-o file.png]
    posbias parity [--variants V,...] [--backends B,...] [--dtypes D,...]
                   [--head-counts H,...] [--json PATH] [--quiet] [--no-layers]
    posbias bench [--smoke] [--only IDS] [--json PATH] [--sweep DIR]
    posbias comm [--devices N] [--lengths L,...] [--batch B] [--heads H]
                 [--kv-heads H] [--dim D] [--dtype DTYPE] [--no-measure] [--json PATH]

* ``list``: registered biases with their properties (``toeplitz``,
  ``symmetric_slopes`` — what :meth:`~posbias.BiasSpec.symmetric_slopes` says
  for the variant's first parity example — and ``learnable``) and a summary line.
* ``show``: a bias's properties, slopes and small bias matrices; ``plot``: the
  same as per-head heatmaps in a PNG (needs matplotlib).
* ``parity`` is the main job: the parity matrix of registered variants ×
  installed backends × dtypes against the NumPy float64 reference, then the
  attention function / layer parity. It prints one row per cell with the worst
  error and pass/fail and exits with status 1 if any cell fails.
* ``bench``: the attention benchmarks of docs/benchmarks.md (ratios against
  baselines measured in the same run).
* ``comm``: bytes sent by distributed attention versus all-gathering the bias
  (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import __version__, registry
from . import backends as _backends
from . import testing as _testing
from .errors import InvalidArgumentError, PosBiasError
from .testing import _gradients as _grads
from .testing import _layers as _lp


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _positive(value: str) -> int:
    """An argparse type: an integer >= 1 (a bad one exits with status 2 and says so)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def _positive_csv(value: str) -> list[int]:
    return [_positive(v) for v in _csv(value)]


def _dtypes(value: str) -> list[str]:
    names = _csv(value)
    unknown = [n for n in names if n not in _testing.TOLERANCES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown dtypes {unknown or value!r}; choose from {list(_testing.TOLERANCES)}"
        )
    return names


def _param(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw  # a bare string such as schedule=geometric


def _cmd_list(args: argparse.Namespace) -> int:
    pattern = args.pattern.lower()  # names are lower case
    if not any(ch in pattern for ch in "*?["):  # a bare word: a substring
        pattern = f"*{pattern}*"
    names = registry.list_biases(pattern)
    if not names:
        print(f"no bias matches {args.pattern!r}", file=sys.stderr)
        return 1
    classes = registry.registered()
    width = max(len(n) for n in names)
    for name in names:
        cls = classes[name]
        # symmetric slopes may depend on hyper-parameters: ask a built example
        flags = ",".join(_flags(cls.parity_examples(1)[0]))
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:<{width}}  {flags or '-':<35}  {summary}")
    return 0


def _flags(spec: Any) -> list[str]:
    """The properties ``list`` prints: toeplitz, symmetric_slopes, learnable."""
    values = {
        "toeplitz": spec.toeplitz,
        "symmetric_slopes": spec.symmetric_slopes() is not None,
        "learnable": spec.learnable,
    }
    return [flag for flag, on in values.items() if on]


def _cmd_show(args: argparse.Namespace) -> int:
    spec = registry.get(args.name, num_heads=args.heads, **dict(args.param or []))
    print(repr(spec))
    print(
        f"toeplitz={spec.toeplitz} symmetric_slopes={spec.symmetric_slopes() is not None} "
        f"learnable={spec.learnable} bit_identical={spec.bit_identical}"
    )
    if hasattr(spec, "slopes"):
        print("slopes:", np.array2string(np.asarray(spec.slopes), precision=8, max_line_width=100))
    from .plot import bias_matrix, describe_positions

    values = bias_matrix(spec, args.length)
    heads = (
        range(spec.num_heads)
        if args.all_heads
        else sorted({0, spec.num_heads // 2, spec.num_heads - 1})
    )
    for h in heads:
        print(f"\nhead {h}: bias[i, j] for {describe_positions(spec, args.length)} (rows: queries)")
        print(np.array2string(values[h], precision=4, suppress_small=True, max_line_width=120))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_bias

    spec = registry.get(args.name, num_heads=args.heads, **dict(args.param or []))
    output = args.output or f"{args.name.replace('/', '_')}.png"
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output) or not output.lower().endswith((".png", ".pdf", ".svg")):
        raise InvalidArgumentError(f"-o {output!r}: give a file name ending in .png, .pdf or .svg.")
    if not os.path.isdir(folder):
        raise InvalidArgumentError(
            f"cannot write {output!r}: the folder {folder!r} does not exist."
        )
    plot_bias(spec, length=args.length, path=output)
    print(f"wrote {output}")
    return 0


def _versions(backend_names: Sequence[str]) -> dict[str, str]:
    versions = {
        "posbias": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for name in backend_names:
        module = sys.modules.get(_backends.BACKENDS[name][0])
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


def _cmd_parity(args: argparse.Namespace) -> int:
    for name in args.variants or []:  # before any framework is imported
        registry._lookup(name)
    from tqdm import tqdm

    started = time.perf_counter()
    backend_names = args.backends or _testing.backends_under_test()
    backend_names = [_backends.canonical_name(b) for b in backend_names]
    for name in backend_names:
        _backends.load(name)
    if args.compile_cache and "jax" in backend_names:
        _use_compile_cache(args.compile_cache)
    bar = tqdm(
        total=1,
        unit="cell",
        desc="posbias parity",
        file=sys.stderr,
        disable=args.quiet,
        mininterval=0.5 if sys.stderr.isatty() else 15.0,
        dynamic_ncols=True,
    )

    def progress(done: int, total: int, cell: Any) -> None:
        bar.total = total
        status = "ok" if cell.passed else "FAIL"
        what = getattr(cell, "variant", "attention")
        bar.set_postfix_str(f"{what} / {cell.backend} / {cell.dtype}: {status}", refresh=False)
        bar.update(done - bar.n)

    learnable = args.variants and [
        v for v in args.variants if registry.get(v, num_heads=4).learnable
    ]
    with bar:
        cells, layer_cells, grad_cells = _testing._run_matrix(
            args.variants,
            backend_names,
            args.dtypes,
            head_counts=args.head_counts,
            progress=progress,
            compiled=args.jit,
            jobs=args.jobs,
            attention=not args.no_layers,
            gradients=not args.no_layers,
            gradient_variants=learnable or None,
        )
    versions = _versions(backend_names)
    print("posbias parity: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    header = (
        "variant",
        "backend",
        "dtype",
        "checks",
        "max abs err",
        "max rel err",
        "tol used",
        "-0.0",
        "bitwise",
        "tiles",
        "result",
    )
    rows = [
        (
            c.variant,
            c.backend,
            c.dtype,
            str(c.checks),
            f"{c.max_abs_error:.3g}",
            f"{c.max_rel_error:.3g}",
            f"{c.tolerance_used:.2g}",
            str(c.negative_zeros) if c.negative_zeros else "-",
            {None: "-", True: "yes", False: "NO"}[c.bitwise],
            {None: "-", True: "exact", False: "close"}[c.tiles_exact],
            "pass" if c.passed else "FAIL",
        )
        for c in cells
    ]
    _print_table(header, rows)
    if layer_cells:
        _print_layer_table(layer_cells)
    _print_gradient_table(grad_cells)
    attention_cells, layer_cells = layer_cells, layer_cells + grad_cells
    failed = [c for c in cells if not c.passed]
    for cell in failed:
        print(f"\n{cell.variant} / {cell.backend} / {cell.dtype} failed:")
        for failure in cell.failures[:10]:
            print("  " + failure)
    failed_layers = [c for c in layer_cells if not c.passed]
    for cell in failed_layers:
        what = getattr(cell, "variant", "attention")
        print(f"\n{what} / {cell.backend} / {cell.dtype} failed:")
        for failure in cell.failures[:10]:
            print("  " + failure)
    elapsed = time.perf_counter() - started
    mode = "jitted" if args.jit else "op by op"
    print(f"\nsummary ({elapsed:.0f} s, {args.jobs} job(s), JAX {mode}):")
    _print_summary(backend_names, cells, layer_cells)
    print(
        f"\nbias cells: {len(cells) - len(failed)} pass, {len(failed)} fail "
        f"(tolerances rtol/atol per dtype: {_testing.TOLERANCES})"
    )
    if layer_cells:
        print(
            f"attention cells: {len(layer_cells) - len(failed_layers)} pass, "
            f"{len(failed_layers)} fail (normwise tolerances: {_lp.ATTENTION_TOLERANCES})"
        )
    failed = failed + failed_layers
    if args.json:
        report = {
            "versions": versions,
            "tolerances": _testing.TOLERANCES,
            "cells": [c.as_dict() for c in cells],
            "attention_tolerances": _lp.ATTENTION_TOLERANCES,
            "attention_cells": [
                {**dataclasses.asdict(c), "passed": c.passed} for c in attention_cells
            ],
            "gradient_tolerance": _grads.GRADIENT_TOLERANCE,
            "gradient_cells": [{**dataclasses.asdict(c), "passed": c.passed} for c in grad_cells],
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    return 1 if failed else 0


def _use_compile_cache(path: str) -> None:
    """JAX's persistent compilation cache in ``path``, for every program however small."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _print_gradient_table(cells: list[_grads.GradientCell]) -> None:
    """Gradients of q, k, v and of every learnable bias's parameters, across frameworks."""
    if cells:
        print(
            "\ngradient parity (same parameters and inputs; error = max|x-ref| / max|ref| of "
            "q, k, v and of the bias parameters as one vector):"
        )
        header = ("variant", "backend", "vs", "checks", "max error", "tolerance", "result")
        rows = [
            (
                c.variant,
                c.backend,
                c.reference,
                str(c.checks),
                f"{c.max_error:.3g}",
                str(_grads.GRADIENT_TOLERANCE),
                "pass" if c.passed else "FAIL",
            )
            for c in cells
        ]
        _print_table(header, rows)


def _print_layer_table(cells: list[_lp.LayerCell]) -> None:
    """Attention functions and layers vs the NumPy float64 reference, per framework."""
    print("\nattention parity (same weights and inputs; error = max|x-ref| / max|ref|):")
    header = ("backend", "what", "checks", "max error", "tolerance", "result")
    rows = [
        (
            c.backend,
            c.dtype,
            str(c.checks),
            f"{c.max_error:.3g}",
            str(_lp.ATTENTION_TOLERANCES[c.dtype.split()[0]]),
            "pass" if c.passed else "FAIL",
        )
        for c in cells
    ]
    _print_table(header, rows)


def _print_summary(backend_names, cells, layer_cells) -> None:
    """One row per backend: cells passed, checks, worst relative error, seconds."""
    header = ("backend", "bias cells", "checks", "worst rel err", "attention cells", "seconds")
    rows = []
    for backend in backend_names:
        mine = [c for c in cells if c.backend == backend]
        layers = [c for c in layer_cells if c.backend == backend]
        passed = sum(c.passed for c in mine)
        layers_passed = sum(c.passed for c in layers)
        rows.append(
            (
                backend,
                f"{passed}/{len(mine)} pass",
                str(sum(c.checks for c in mine) + sum(c.checks for c in layers)),
                f"{max((c.max_rel_error for c in mine), default=0.0):.3g}",
                f"{layers_passed}/{len(layers)} pass" if layers else "-",
                f"{sum(c.seconds for c in mine) + sum(c.seconds for c in layers):.1f}",
            )
        )
    _print_table(header, rows)


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posbias",
        description="Additive attention positional biases, identical in NumPy, PyTorch, "
        "JAX and TensorFlow.",
    )
    parser.add_argument("--version", action="version", version=f"posbias {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered biases")
    p.add_argument("pattern", nargs="?", default="*", help="glob pattern, e.g. 'alibi*'")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("show", help="print a bias's slopes and a small matrix")
    _add_bias_arguments(p, heads=8, length=6)
    p.add_argument("--all-heads", action="store_true", help="print every head's matrix")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("plot", help="draw a bias as heatmaps per head (needs matplotlib)")
    _add_bias_arguments(p, heads=4, length=32)
    p.add_argument("-o", "--output", help="PNG path (default NAME.png)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("parity", help="run the cross-framework parity matrix")
    p.add_argument("--variants", type=_csv, default=None, help="comma list (default: all)")
    p.add_argument(
        "--backends",
        type=_csv,
        default=None,
        help="comma list (default: $POSBIAS_TEST_BACKENDS or all installed)",
    )
    p.add_argument(
        "--dtypes",
        type=_dtypes,
        default=list(_testing.DEFAULT_DTYPES),
        help="comma list (default: float32,float16,bfloat16)",
    )
    p.add_argument(
        "--head-counts",
        type=_positive_csv,
        default=list(_testing.HEAD_COUNTS),
        help="default 1,3,8,12,16,20",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--jobs",
        type=_positive,
        default=_testing.default_jobs(),
        help="worker threads for the JAX work (default: the CPU count)",
    )
    p.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="keep JAX's compiled programs in DIR, so that a rerun skips compilation",
    )
    p.add_argument(
        "--jit",
        action="store_true",
        help=(
            "run each variant's JAX cells as one jitted program; biases from lengths alone "
            "are then constant-folded by XLA, not run by its kernels (default: op by op)"
        ),
    )
    p.add_argument(
        "--no-layers", action="store_true", help="skip the attention function / layer parity"
    )
    p.set_defaults(func=_cmd_parity)

    p = sub.add_parser("bench", help="run the attention benchmarks (docs/benchmarks.md)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: correctness, not speed")
    p.add_argument("--only", help="comma-separated target ids, e.g. 1,2,5")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--sweep", metavar="DIR", help="also plot time/memory versus L into DIR")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "comm",
        help="bytes sent by distributed attention vs all-gathering the bias (docs/distributed.md)",
    )
    p.add_argument("--devices", type=_positive, default=4, help="sequence shards (default 4)")
    p.add_argument(
        "--lengths",
        type=_positive_csv,
        default=[4096, 16384, 65536],
        help="comma-separated sequence lengths, each a multiple of 2 x devices (zigzag)",
    )
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--heads", type=_positive, default=32)
    p.add_argument("--kv-heads", type=_positive, default=8)
    p.add_argument("--dim", type=_positive, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--no-measure", action="store_true", help="closed forms only (no JAX compilation)"
    )
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=_cmd_comm)
    return parser


def _add_bias_arguments(p: argparse.ArgumentParser, *, heads: int, length: int) -> None:
    """NAME, --heads, --length and --param: how `show` and `plot` pick a bias."""
    p.add_argument("name")
    p.add_argument(
        "--heads", type=_positive, default=heads, help=f"number of heads (default {heads})"
    )
    p.add_argument(
        "--length", type=_positive, default=length, help=f"query/key length (default {length})"
    )
    p.add_argument(
        "--param",
        type=_param,
        action="append",
        metavar="KEY=VALUE",
        help="extra hyper-parameter, value as JSON (repeatable)",
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    only = _csv(args.only) if args.only else None
    known = [key for key, _ in bench.targets(args.smoke)]
    unknown = [
        o for o in only or [] if o not in known and o not in {k.rstrip("abm") for k in known}
    ]
    if unknown or only == []:
        raise InvalidArgumentError(
            f"--only {args.only!r}: unknown targets {unknown}; known: {known}."
        )
    results = bench.run(smoke=args.smoke, only=only, progress=lambda m: print(m, file=sys.stderr))
    print(bench.format_table(results, args.smoke))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "environment": bench.environment(),
                    "results": [{"id": k, **dataclasses.asdict(r)} for k, r in results],
                },
                f,
                indent=1,
            )
    if args.sweep:
        lengths = (128, 256) if args.smoke else (512, 1024, 2048, 4096, 8192)
        bench.sweep(lengths, args.sweep)
    failed = [k for k, r in results if not r.passed]
    return 1 if failed and not args.smoke else 0


def _cmd_comm(args: argparse.Namespace) -> int:
    from . import comm

    pieces = 2 * args.devices  # zigzag: two chunks per device
    bad = [n for n in args.lengths if n % pieces]
    if bad:
        raise InvalidArgumentError(
            f"--lengths {bad} do not split into {pieces} equal chunks ({args.devices} devices, "
            "zigzag); pick multiples of 2 x devices."
        )
    if args.heads % args.kv_heads:
        raise InvalidArgumentError(
            f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}."
        )
    comm.ensure_devices(args.devices)
    rows = comm.report(
        args.lengths,
        args.devices,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads,
        dim=args.dim,
        dtype=args.dtype,
        measure=not args.no_measure,
    )
    print(
        f"MiB per device per forward call: B={args.batch}, H={args.heads}, "
        f"H_kv={args.kv_heads}, D={args.dim}, {args.dtype}, {args.devices} devices"
    )
    print(comm.format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows], f, indent=1)
    mismatched = [r for r in rows if r.ring_measured not in (None, r.ring)]
    return 1 if mismatched else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PosBiasError as exc:
        print(f"posbias: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
