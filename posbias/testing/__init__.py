"""Parity harness: check any bias spec on every backend against NumPy float64.

Reusable for your own variants::

    import posbias.testing as pt
    pt.assert_parity(my_spec)                  # raises AssertionError on failure
    report = pt.run_parity(["alibi"])          # what ``posbias parity`` runs

What is checked for each ``(spec, backend, dtype)`` cell, over the cases of
:func:`default_cases` (lengths incl. 1×1, ``q_len != k_len`` both ways,
offsets, batched positions and offsets, head subsets in any order):

* **reference**: ``|x - ref| <= atol + rtol·|ref|`` elementwise against the
  NumPy float64 result, with :data:`TOLERANCES` per dtype (float16 references
  are clipped to ±65504 first, as posbias saturates float16 biases);
* **bitwise**: for closed-form specs (``spec.bit_identical``), the bytes equal the
  NumPy backend's result in the same dtype — float32 ALiBi is bit-identical on
  all four backends;
* **tiles**: any split of queries, keys and heads, computed separately and
  concatenated, equals the full bias (bit-exactly for closed-form specs).

Backends under test: all installed ones, or the comma-separated list in the
environment variable ``POSBIAS_TEST_BACKENDS``; a listed backend that cannot
be imported is an error, never a silent skip.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .. import backends as _backends
from ..errors import BackendUnavailableError, PosBiasError
from ..registry import _lookup, isolated, list_biases
from ..spec import BiasSpec

__all__ = [
    "DEFAULT_DTYPES",
    "HEAD_COUNTS",
    "TOLERANCES",
    "Case",
    "CellResult",
    "assert_parity",
    "backends_under_test",
    "check_cell",
    "default_cases",
    "isolated_registry",
    "run_parity",
    "tile_mismatch",
    "to_numpy",
]

#: ``dtype -> (rtol, atol)`` for comparisons against the float64 reference.
#: float32 values are a float32 product of float32-rounded constants (≤ 2 ulp);
#: float16 / bfloat16 add one round-to-nearest cast (half an ulp: 2^-11, 2^-8).
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-12, 1e-300),
    "float32": (1e-6, 1e-12),
    "float16": (1e-3, 1e-7),
    "bfloat16": (8e-3, 1e-30),
}
DEFAULT_DTYPES = ("float32", "float16", "bfloat16")
HEAD_COUNTS = (1, 3, 8, 12, 16, 20)
ENV_VAR = "POSBIAS_TEST_BACKENDS"

isolated_registry = isolated


def backends_under_test() -> list[str]:
    """Installed backends, or those named in ``$POSBIAS_TEST_BACKENDS`` (checked)."""
    requested = os.environ.get(ENV_VAR, "").strip()
    if not requested:
        return _backends.available()
    names = [_backends.canonical_name(n.strip()) for n in requested.split(",") if n.strip()]
    for name in names:
        _backends.load(name)  # raises BackendUnavailableError naming the extra
    return names


to_numpy = _backends.to_numpy


@dataclasses.dataclass(frozen=True)
class Case:
    """Keyword arguments for :meth:`BiasSpec.bias` (NumPy inputs) and a label."""

    label: str
    kwargs: dict[str, Any]


def default_cases(num_heads: int, seed: int = 0, *, position_dims: int = 1) -> list[Case]:
    """The parity cases for one head count (deterministic for a given seed).

    ``position_dims=2`` (image-grid biases) replaces the batched 1-D positions
    with batched ``(row, col)`` points.
    """
    rng = np.random.default_rng(seed + num_heads)
    last = num_heads - 1
    if position_dims == 2:
        batched = Case(
            "batched points",
            dict(
                q_pos=rng.integers(0, 6, size=(2, 5, 2)), k_pos=rng.integers(0, 6, size=(2, 8, 2))
            ),
        )
    else:
        batched = Case(
            "batched positions",
            dict(
                q_pos=np.sort(rng.integers(-1, 40, size=(2, 5)), axis=-1),
                k_pos=np.sort(rng.integers(-1, 40, size=(2, 8)), axis=-1),
            ),
        )
    return [
        Case("1x1", dict(q_len=1, k_len=1)),
        Case("square", dict(q_len=7, k_len=7)),
        Case("q<k bottom-right", dict(q_len=3, k_len=11)),
        Case("q>k bottom-right", dict(q_len=9, k_len=4)),
        Case("offsets", dict(q_len=4, k_len=6, q_offset=37, k_offset=30)),
        batched,
        Case("batched offsets", dict(q_len=2, k_len=6, q_offset=np.array([4, 9]), k_offset=3)),
        Case("head subset", dict(q_len=5, k_len=5, heads=range(num_heads // 2, num_heads))),
        Case("heads reordered", dict(q_len=3, k_len=4, heads=[last, 0] if last else [0])),
    ]


def tolerance(spec: BiasSpec, dtype: str) -> tuple[float, float]:
    """``(rtol, atol)`` for ``spec`` in ``dtype``: the spec's own, else :data:`TOLERANCES`."""
    return spec.tolerances.get(dtype, TOLERANCES[dtype])


def _agree(
    x: np.ndarray, ref: np.ndarray, dtype: str, rtol: float, atol: float
) -> tuple[float, float, bool]:
    """(max abs error, max relative error, within tolerance) of ``x`` vs ``ref``."""
    if dtype == "float16":
        ref = np.clip(ref, -65504.0, 65504.0)
    x64 = np.asarray(x, dtype=np.float64)
    if x64.shape != ref.shape:
        return float("inf"), float("inf"), False
    if x64.size == 0:
        return 0.0, 0.0, True
    err = np.abs(x64 - ref)
    scale = np.abs(ref)
    rel = np.where(scale > 0, err / np.where(scale > 0, scale, 1.0), np.where(err > 0, np.inf, 0))
    ok = bool(np.all(np.isfinite(x64)) and np.all(err <= atol + rtol * scale))
    return float(err.max()), float(rel.max()), ok


def _bits(array: Any) -> np.ndarray:
    """The raw bytes of an array (any memory layout), for bitwise comparisons."""
    return np.ascontiguousarray(array).view(np.uint8)


def tile_mismatch(
    spec: BiasSpec,
    backend: str,
    *,
    q_len: int,
    k_len: int,
    q_split: int,
    k_split: int,
    h_split: int,
    q_offset: int = 0,
    k_offset: int = 0,
    dtype: str = "float32",
) -> float:
    """Largest difference between the full bias and its 2×2×2 tiles concatenated.

    Queries are split at ``q_split``, keys at ``k_split``, heads at ``h_split``;
    every tile is computed on its own from its global offsets and head indices.
    0.0 means bit-exact (the expectation for closed-form specs).
    """
    full = to_numpy(
        spec.bias(
            q_len=q_len,
            k_len=k_len,
            q_offset=q_offset,
            k_offset=k_offset,
            backend=backend,
            dtype=dtype,
        )
    )
    q_parts = [(0, q_split), (q_split, q_len)]
    k_parts = [(0, k_split), (k_split, k_len)]
    h_parts = [(0, h_split), (h_split, spec.num_heads)]
    head_blocks = []
    for h0, h1 in h_parts:
        if h0 == h1:
            continue
        rows = []
        for q0, q1 in q_parts:
            if q0 == q1:
                continue
            cols = [
                to_numpy(
                    spec.bias(
                        q_len=q1 - q0,
                        k_len=k1 - k0,
                        q_offset=q_offset + q0,
                        k_offset=k_offset + k0,
                        heads=range(h0, h1),
                        backend=backend,
                        dtype=dtype,
                    )
                )
                for k0, k1 in k_parts
                if k0 != k1
            ]
            rows.append(np.concatenate(cols, axis=-1))
        head_blocks.append(np.concatenate(rows, axis=-2))
    tiled = np.concatenate(head_blocks, axis=-3)
    if tiled.shape != full.shape:
        return float("inf")
    if np.array_equal(_bits(tiled), _bits(full)):
        return 0.0
    return float(np.max(np.abs(tiled.astype(np.float64) - full.astype(np.float64))))


@dataclasses.dataclass
class CellResult:
    """One cell of the parity matrix: a spec on one backend in one dtype."""

    variant: str
    backend: str
    dtype: str
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    bitwise: bool | None = None  # None: not required (spec not bit_identical, or numpy itself)
    tiles_exact: bool | None = None
    checks: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        return data


def check_cell(
    specs: Sequence[BiasSpec],
    backend: str,
    dtype: str,
    *,
    variant: str | None = None,
    cases: Callable[..., list[Case]] = default_cases,
) -> CellResult:
    """Run every case for every spec on one backend and dtype against the reference."""
    start = time.perf_counter()
    result = CellResult(variant or (specs[0].name or type(specs[0]).__name__), backend, dtype)
    numpy_backend = _backends.load("numpy")()
    if not _backends.load(backend)().supports(dtype):
        result.failures.append(f"{backend} cannot hold {dtype} in this configuration")
        return result
    for spec in specs:
        rtol, atol = tolerance(spec, dtype)
        for case in cases(spec.num_heads, position_dims=spec.position_dims):
            where = f"{spec!r} [{case.label}]"
            try:
                ref = spec.bias(**case.kwargs, backend="numpy", dtype="float64")
                out = spec.bias(**case.kwargs, backend=backend, dtype=dtype)
            except PosBiasError as exc:
                result.failures.append(f"{where}: {type(exc).__name__}: {exc}")
                continue
            x = to_numpy(out)
            result.checks += 1
            if x.dtype != numpy_backend.native_dtype(dtype):
                result.failures.append(f"{where}: dtype {x.dtype}, expected {dtype}")
            abs_err, rel_err, ok = _agree(x, ref, dtype, rtol, atol)
            result.max_abs_error = max(result.max_abs_error, abs_err)
            result.max_rel_error = max(result.max_rel_error, rel_err)
            if not ok:
                result.failures.append(
                    f"{where}: max abs error {abs_err:.3g} (rel {rel_err:.3g}) exceeds "
                    f"rtol/atol {(rtol, atol)} (shapes {x.shape} vs {ref.shape})"
                )
            if spec.bit_identical and backend != "numpy":
                same = spec.bias(**case.kwargs, backend="numpy", dtype=dtype)
                equal = x.shape == same.shape and np.array_equal(_bits(x), _bits(same))
                result.bitwise = equal if result.bitwise is None else result.bitwise and equal
                if not equal:
                    result.failures.append(f"{where}: not bit-identical to the NumPy backend")
        scale = float(
            np.abs(
                to_numpy(spec.bias(q_len=9, k_len=13, q_offset=3, k_offset=1, dtype="float64"))
            ).max()
        )
        mismatch = tile_mismatch(
            spec,
            backend,
            q_len=9,
            k_len=13,
            q_split=4,
            k_split=6,
            h_split=spec.num_heads // 2,
            q_offset=3,
            k_offset=1,
            dtype=dtype,
        )
        exact_tiles = mismatch == 0.0
        tile_rtol, tile_atol = tolerance(spec, "float32")
        tolerated = exact_tiles or (
            not spec.bit_identical and mismatch <= tile_atol + tile_rtol * scale
        )
        result.tiles_exact = (
            exact_tiles if result.tiles_exact is None else (result.tiles_exact and exact_tiles)
        )
        if not tolerated:
            result.failures.append(f"{spec!r}: tiles differ from the full bias by {mismatch:.3g}")
    result.seconds = time.perf_counter() - start
    return result


def _examples(name: str, head_counts: Iterable[int]) -> list[BiasSpec]:
    cls = _lookup(name)  # the class itself: variants may have required hyper-parameters
    return [spec for h in head_counts for spec in cls.parity_examples(h)]


def run_parity(
    variants: Iterable[str] | None = None,
    backends: Iterable[str] | None = None,
    dtypes: Iterable[str] = DEFAULT_DTYPES,
    *,
    head_counts: Iterable[int] = HEAD_COUNTS,
    progress: Callable[[int, int, CellResult], None] | None = None,
) -> list[CellResult]:
    """The parity matrix: registered variants × backends × dtypes.

    Args:
        variants: registered names (default: all, ``list_biases()``).
        backends: default :func:`backends_under_test`.
        dtypes: output dtypes to check.
        head_counts: head counts to instantiate each variant with.
        progress: called after each cell with ``(done, total, cell)``.
    """
    names = list(variants) if variants is not None else list_biases()
    backend_names = list(backends) if backends is not None else backends_under_test()
    for name in backend_names:
        _backends.load(name)
    dtype_names = list(dtypes)
    head_counts = list(head_counts)
    total = len(names) * len(backend_names) * len(dtype_names)
    results = []
    for name in names:
        specs = _examples(name, head_counts)
        for backend in backend_names:
            for dtype in dtype_names:
                cell = check_cell(specs, backend, dtype, variant=name)
                results.append(cell)
                if progress is not None:
                    progress(len(results), total, cell)
    return results


def assert_parity(
    spec: BiasSpec | str,
    backends: Iterable[str] | None = None,
    dtypes: Iterable[str] = DEFAULT_DTYPES,
) -> list[CellResult]:
    """Check one spec (or every example of a registered name) on every backend.

    Raises:
        AssertionError: listing every failed check.
        BackendUnavailableError: a requested backend is not installed.
    """
    if isinstance(spec, str):
        specs = _examples(spec, HEAD_COUNTS)
    else:
        specs = [spec]
    backend_names = list(backends) if backends is not None else backends_under_test()
    if not backend_names:
        raise BackendUnavailableError("no backend to test; install numpy at least.")
    cells = [check_cell(specs, b, d) for b in backend_names for d in dtypes]
    failures = [f"[{c.backend}/{c.dtype}] {f}" for c in cells for f in c.failures]
    if failures:
        raise AssertionError("parity failed:\n" + "\n".join(failures[:50]))
    return cells
