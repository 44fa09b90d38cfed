"""The ``posbias`` command line: ``list``, ``show`` and ``parity``.

    posbias list [PATTERN]
    posbias show NAME [--heads H] [--length L] [--param KEY=VALUE ...]
    posbias plot NAME [--heads H] [--length L] [-o file.png]
    posbias parity [--variants V,...] [--backends B,...] [--dtypes D,...] [--json PATH]

``posbias parity`` is the main job: the parity matrix of registered variants ×
installed backends × dtypes against the NumPy float64 reference. It prints one
row per cell with the worst error and pass/fail and exits with status 1 if any
cell fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import __version__, registry
from . import backends as _backends
from . import testing as _testing
from .errors import PosBiasError
from .testing import _gradients as _grads
from .testing import _layers as _lp


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _param(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw  # a bare string such as schedule=geometric


def _cmd_list(args: argparse.Namespace) -> int:
    names = registry.list_biases(args.pattern)
    if not names:
        print(f"no bias matches {args.pattern!r}", file=sys.stderr)
        return 1
    classes = registry.registered()
    width = max(len(n) for n in names)
    for name in names:
        cls = classes[name]
        flags = ",".join(f for f in ("toeplitz", "linear", "learnable") if getattr(cls, f))
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:<{width}}  {flags or '-':<25}  {summary}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    spec = registry.get(args.name, num_heads=args.heads, **dict(args.param or []))
    print(repr(spec))
    print(f"toeplitz={spec.toeplitz} linear={spec.linear} learnable={spec.learnable}")
    if hasattr(spec, "slopes"):
        print("slopes:", np.array2string(np.asarray(spec.slopes), precision=8, max_line_width=100))
    values = np.asarray(spec.bias(q_len=args.length, k_len=args.length, dtype="float64"))
    heads = (
        range(spec.num_heads)
        if args.all_heads
        else sorted({0, spec.num_heads // 2, spec.num_heads - 1})
    )
    for h in heads:
        print(f"\nhead {h}: bias[i, j] for i, j in 0..{args.length - 1} (rows: queries)")
        print(np.array2string(values[h], precision=4, suppress_small=True, max_line_width=120))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_bias

    spec = registry.get(args.name, num_heads=args.heads, **dict(args.param or []))
    output = args.output or f"{args.name.replace('/', '_')}.png"
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
    backend_names = args.backends or _testing.backends_under_test()
    backend_names = [_backends.canonical_name(b) for b in backend_names]
    for name in backend_names:
        _backends.load(name)
    interactive = sys.stderr.isatty()

    def progress(done: int, total: int, cell: _testing.CellResult) -> None:
        if args.quiet:
            return
        status = "ok" if cell.passed else "FAIL"
        line = (
            f"[{done}/{total}] {cell.variant} / {cell.backend} / {cell.dtype}: "
            f"{status} ({cell.seconds:.1f}s)"
        )
        end = "\r" if interactive and done < total else "\n"
        print(f"{line:<79}", end=end, file=sys.stderr, flush=True)

    cells = _testing.run_parity(
        args.variants,
        backend_names,
        args.dtypes,
        progress=progress,
        head_counts=args.head_counts,
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
            {None: "-", True: "yes", False: "NO"}[c.bitwise],
            {None: "-", True: "exact", False: "close"}[c.tiles_exact],
            "pass" if c.passed else "FAIL",
        )
        for c in cells
    ]
    _print_table(header, rows)
    layer_cells = [] if args.no_layers else _layer_parity_table(backend_names, args)
    grad_cells = [] if args.no_layers else _gradient_parity_table(backend_names, args)
    layer_cells = layer_cells + grad_cells
    failed = [c for c in cells if not c.passed]
    for cell in failed:
        print(f"\n{cell.variant} / {cell.backend} / {cell.dtype} failed:")
        for failure in cell.failures[:10]:
            print("  " + failure)
    failed_layers = [c for c in layer_cells if not c.passed]
    for cell in failed_layers:
        print(f"\nattention / {cell.backend} / {cell.dtype} failed:")
        for failure in cell.failures[:10]:
            print("  " + failure)
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
            "attention_cells": [{**dataclasses.asdict(c), "passed": c.passed} for c in layer_cells],
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    return 1 if failed else 0


def _gradient_parity_table(backend_names, args) -> list[_grads.GradientCell]:
    """Gradients of q, k, v and of every learnable bias's parameters, across frameworks."""
    variants = args.variants and [
        v for v in args.variants if registry.get(v, num_heads=4).learnable
    ]
    cells = _grads.check_gradients(backend_names, variants or None)
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
    return cells


def _layer_parity_table(backend_names, args) -> list[_lp.LayerCell]:
    """Attention functions and layers vs the NumPy float64 reference, per framework."""
    frameworks = [b for b in backend_names if b != "numpy"]
    jobs = [(b, d) for b in frameworks for d in args.dtypes if d in _lp.ATTENTION_TOLERANCES]
    jobs += [(b, "layers") for b in frameworks]
    cells = []
    for done, (backend, kind) in enumerate(jobs, 1):
        if kind == "layers":
            cell = _lp.check_layers(backend)
            cell.dtype = "float32 MultiHeadAttention"
        else:
            cell = _lp.check_functional(backend, kind)
            cell.dtype = f"{kind} attention()"
        cells.append(cell)
        if not args.quiet:
            status = "ok" if cell.passed else "FAIL"
            line = f"[{done}/{len(jobs)}] attention / {backend} / {cell.dtype}: {status}"
            print(f"{line:<79}", file=sys.stderr, flush=True)
    if cells:
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
    return cells


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
        type=_csv,
        default=list(_testing.DEFAULT_DTYPES),
        help="comma list (default: float32,float16,bfloat16)",
    )
    p.add_argument(
        "--head-counts",
        type=lambda v: [int(x) for x in _csv(v)],
        default=list(_testing.HEAD_COUNTS),
        help="default 1,3,8,12,16,20",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
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
    p.add_argument("--devices", type=int, default=4, help="sequence shards (default 4)")
    p.add_argument("--lengths", default="4096,16384,65536", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
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
    p.add_argument("--heads", type=int, default=heads, help=f"number of heads (default {heads})")
    p.add_argument(
        "--length", type=int, default=length, help=f"query/key length (default {length})"
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

    only = args.only.split(",") if args.only else None
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

    comm.ensure_devices(args.devices)
    rows = comm.report(
        [int(n) for n in args.lengths.split(",")],
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
