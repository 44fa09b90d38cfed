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
import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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


def tolerance_used(x: np.ndarray, ref: np.ndarray, dtype: str, rtol: float, atol: float) -> float:
    """The metric that decides a cell: ``max |x - ref| / (atol + rtol·|ref|)`` (≤ 1 passes).

    A float16 value that underflows to 0 has relative error 1 yet passes on
    ``atol``: this number says how close to failing the cell really was.
    """
    if dtype == "float16":
        ref = np.clip(ref, -65504.0, 65504.0)
    x64 = np.asarray(x, dtype=np.float64)
    if x64.shape != ref.shape or not np.all(np.isfinite(x64)):
        return float("inf")
    if x64.size == 0:
        return 0.0
    return float((np.abs(x64 - ref) / (atol + rtol * np.abs(ref))).max())


def negative_zeros(x: np.ndarray) -> int:
    """How many entries are ``-0.0`` (equal to 0, but a different bit pattern and sign)."""
    x = np.asarray(x)
    return int(np.sum((x == 0) & np.signbit(x))) if x.dtype.kind == "f" else 0


def _bits(array: Any) -> np.ndarray:
    """The raw bytes of an array (any memory layout), for bitwise comparisons."""
    return np.ascontiguousarray(array).view(np.uint8)


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """A 2×2×2 split of one bias over queries, keys and heads (see :func:`tile_mismatch`)."""

    q_len: int
    k_len: int
    q_split: int
    k_split: int
    h_split: int
    q_offset: int = 0
    k_offset: int = 0

    def full(self) -> dict[str, Any]:
        return dict(
            q_len=self.q_len, k_len=self.k_len, q_offset=self.q_offset, k_offset=self.k_offset
        )

    def pieces(self, num_heads: int) -> list[tuple[int, int, dict[str, Any]]]:
        """``(head block, query block, kwargs)`` of every non-empty tile, in concatenation order."""
        q_parts = [(0, self.q_split), (self.q_split, self.q_len)]
        k_parts = [(0, self.k_split), (self.k_split, self.k_len)]
        h_parts = [(0, self.h_split), (self.h_split, num_heads)]
        tiles = []
        for hb, (h0, h1) in enumerate(p for p in h_parts if p[0] != p[1]):
            for qb, (q0, q1) in enumerate(p for p in q_parts if p[0] != p[1]):
                for k0, k1 in (p for p in k_parts if p[0] != p[1]):
                    kwargs = dict(
                        q_len=q1 - q0,
                        k_len=k1 - k0,
                        q_offset=self.q_offset + q0,
                        k_offset=self.k_offset + k0,
                        heads=range(h0, h1),
                    )
                    tiles.append((hb, qb, kwargs))
        return tiles

    def mismatch(self, num_heads: int, full: np.ndarray, tiles: Sequence[np.ndarray]) -> float:
        """0.0 when the tiles concatenate bit-exactly to ``full``, else the largest difference."""
        blocks: dict[int, dict[int, list[np.ndarray]]] = {}
        for (hb, qb, _), tile in zip(self.pieces(num_heads), tiles, strict=True):
            blocks.setdefault(hb, {}).setdefault(qb, []).append(tile)
        tiled = np.concatenate(
            [
                np.concatenate([np.concatenate(cols, axis=-1) for cols in rows.values()], axis=-2)
                for rows in blocks.values()
            ],
            axis=-3,
        )
        if tiled.shape != full.shape:
            return float("inf")
        if np.array_equal(_bits(tiled), _bits(full)):
            return 0.0
        return float(np.max(np.abs(tiled.astype(np.float64) - full.astype(np.float64))))


#: the tile split every parity cell checks
PARITY_TILES = dict(q_len=9, k_len=13, q_split=4, k_split=6, q_offset=3, k_offset=1)


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
    tiles = _Tiles(q_len, k_len, q_split, k_split, h_split, q_offset, k_offset)
    requests = [tiles.full(), *(kw for _, _, kw in tiles.pieces(spec.num_heads))]
    full, *pieces = (
        to_numpy(spec.bias(**kwargs, backend=backend, dtype=dtype)) for kwargs in requests
    )
    return tiles.mismatch(spec.num_heads, full, pieces)


@dataclasses.dataclass
class CellResult:
    """One cell of the parity matrix: a spec on one backend in one dtype."""

    variant: str
    backend: str
    dtype: str
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    #: max |x - ref| / (atol + rtol·|ref|): the metric that decides (≤ 1 passes)
    tolerance_used: float = 0.0
    #: entries that are -0.0 (flagged in the report; 0 for every registered variant)
    negative_zeros: int = 0
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


# ------------------------------------------------------- batched evaluation
@dataclasses.dataclass(frozen=True)
class _Request:
    """One ``spec.bias(**kwargs, backend=..., dtype=dtype)`` evaluation."""

    spec: BiasSpec
    kwargs: dict[str, Any]
    dtype: str


def _evaluate_eager(backend: str, requests: Sequence[_Request]) -> list[Any]:
    """Each request on its own, op by op; a ``PosBiasError`` is returned in its slot."""
    outputs: list[Any] = []
    for r in requests:
        try:
            outputs.append(to_numpy(r.spec.bias(**r.kwargs, backend=backend, dtype=r.dtype)))
        except PosBiasError as exc:
            outputs.append(exc)
    return outputs


def _evaluate_jax(requests: Sequence[_Request]) -> list[Any]:
    """Every request in one ``jax.jit`` program: one XLA compilation per batch.

    Position and offset arrays are the program's arguments (traced, as in a
    user's jitted model), so XLA computes the bias at run time rather than
    folding it at compile time. XLA compiles identical kernels once, so the
    examples of a variant that differ only in constants share their code.
    A batch that raises while tracing is evaluated request by request instead,
    which records each error where it belongs.
    """
    import jax

    xp = _backends.load("jax")()
    arrays: list[Any] = []
    templates = []
    for r in requests:
        template = {}
        for key, value in r.kwargs.items():
            if isinstance(value, np.ndarray):
                template[key] = len(arrays)
                arrays.append(xp.from_numpy(value.astype(np.int64, copy=False)))
            else:
                template[key] = None
        templates.append(template)

    def program(args):
        return [
            r.spec.bias(
                **{k: (v if t[k] is None else args[t[k]]) for k, v in r.kwargs.items()},
                backend="jax",
                dtype=r.dtype,
            )
            for r, t in zip(requests, templates, strict=True)
        ]

    try:
        outputs = jax.jit(program)(arrays)
    except PosBiasError:
        return _evaluate_eager("jax", requests)
    return [np.asarray(o) for o in outputs]


def _evaluate(backend: str, requests: Sequence[_Request], *, compiled: bool) -> list[Any]:
    """NumPy arrays (or errors) for ``requests`` on ``backend``.

    ``compiled``: JAX evaluates the batch as one jitted program (else op by
    op, eagerly, sharing compiled ops with every other batch); the other
    backends run eagerly either way (PyTorch's and TensorFlow's eager kernels
    are what their users run, and cost no compilation; a ``tf.function`` over
    one variant's requests takes ~40× longer to build than to run them eagerly).
    """
    if compiled and backend == "jax":
        return _evaluate_jax(requests)
    return _evaluate_eager(backend, requests)


class _References:
    """NumPy results shared by every backend's cells of one variant (computed once)."""

    def __init__(self) -> None:
        self._values: dict[tuple[Any, ...], Any] = {}

    def get(self, spec: BiasSpec, label: str, kwargs: dict[str, Any], dtype: str) -> Any:
        try:
            key = (spec, label, dtype)
            hash(key)
        except TypeError:  # a spec with an unhashable field: no sharing
            key = (id(spec), label, dtype)
        if key not in self._values:
            try:
                self._values[key] = to_numpy(spec.bias(**kwargs, backend="numpy", dtype=dtype))
            except PosBiasError as exc:
                self._values[key] = exc
        return self._values[key]


def _check_cells(
    specs: Sequence[BiasSpec],
    backend: str,
    dtypes: Sequence[str],
    *,
    variant: str | None = None,
    cases: Callable[..., list[Case]] = default_cases,
    compiled: bool = False,
    references: _References | None = None,
) -> list[CellResult]:
    """One cell per dtype: every case and the tile split of every spec on ``backend``.

    All the cells' backend evaluations form one batch (one jitted program on
    JAX); the checks on each output are those of :func:`check_cell`.
    """
    start = time.perf_counter()
    refs = references or _References()
    name = variant or (specs[0].name or type(specs[0]).__name__)
    instance = _backends.load(backend)()
    numpy_backend = _backends.load("numpy")()
    results = {d: CellResult(name, backend, d) for d in dtypes}
    plan: list[tuple[str, BiasSpec, Any]] = []  # (dtype, spec, what) per request
    requests: list[_Request] = []
    for dtype in dtypes:
        if not instance.supports(dtype):
            results[dtype].failures.append(f"{backend} cannot hold {dtype} in this configuration")
            continue
        for spec in specs:
            for case in cases(spec.num_heads, position_dims=spec.position_dims):
                plan.append((dtype, spec, case))
                requests.append(_Request(spec, case.kwargs, dtype))
            tiles = _Tiles(**PARITY_TILES, h_split=spec.num_heads // 2)
            for kwargs in [tiles.full(), *(kw for _, _, kw in tiles.pieces(spec.num_heads))]:
                plan.append((dtype, spec, tiles))
                requests.append(_Request(spec, kwargs, dtype))
    outputs = _evaluate(backend, requests, compiled=compiled)
    shared = (time.perf_counter() - start) / max(len(dtypes), 1)

    index = 0
    while index < len(plan):
        dtype, spec, what = plan[index]
        result = results[dtype]
        tick = time.perf_counter()
        if isinstance(what, _Tiles):
            count = 1 + len(what.pieces(spec.num_heads))
            _judge_tiles(result, spec, what, outputs[index : index + count], refs)
            index += count
        else:
            _judge_case(result, spec, what, dtype, outputs[index], refs, numpy_backend, backend)
            index += 1
        result.seconds += time.perf_counter() - tick
    for result in results.values():
        result.seconds += shared
    return [results[d] for d in dtypes]


def _judge_case(result, spec, case, dtype, x, refs, numpy_backend, backend) -> None:
    where = f"{spec!r} [{case.label}]"
    rtol, atol = tolerance(spec, dtype)
    ref = refs.get(spec, case.label, case.kwargs, "float64")
    for value in (ref, x):
        if isinstance(value, PosBiasError):
            result.failures.append(f"{where}: {type(value).__name__}: {value}")
            return
    result.checks += 1
    if x.dtype != numpy_backend.native_dtype(dtype):
        result.failures.append(f"{where}: dtype {x.dtype}, expected {dtype}")
    abs_err, rel_err, ok = _agree(x, ref, dtype, rtol, atol)
    result.max_abs_error = max(result.max_abs_error, abs_err)
    result.max_rel_error = max(result.max_rel_error, rel_err)
    result.tolerance_used = max(result.tolerance_used, tolerance_used(x, ref, dtype, rtol, atol))
    result.negative_zeros += negative_zeros(x)
    if not ok:
        result.failures.append(
            f"{where}: max abs error {abs_err:.3g} (rel {rel_err:.3g}) exceeds "
            f"rtol/atol {(rtol, atol)} (shapes {x.shape} vs {ref.shape})"
        )
    if spec.bit_identical and backend != "numpy":
        same = refs.get(spec, case.label, case.kwargs, dtype)
        equal = (
            not isinstance(same, PosBiasError)
            and x.shape == same.shape
            and np.array_equal(_bits(x), _bits(same))
        )
        result.bitwise = equal if result.bitwise is None else result.bitwise and equal
        if not equal:
            result.failures.append(f"{where}: not bit-identical to the NumPy backend")


def _judge_tiles(result, spec, tiles: _Tiles, outputs, refs) -> None:
    errors = [o for o in outputs if isinstance(o, PosBiasError)]
    if errors:
        result.failures.append(f"{spec!r} [tiles]: {type(errors[0]).__name__}: {errors[0]}")
        return
    full, *pieces = outputs
    mismatch = tiles.mismatch(spec.num_heads, full, pieces)
    exact_tiles = mismatch == 0.0
    tolerated = exact_tiles
    if not exact_tiles and not spec.bit_identical:
        scale = refs.get(spec, "tiles", tiles.full(), "float64")
        tile_rtol, tile_atol = tolerance(spec, "float32")
        tolerated = mismatch <= tile_atol + tile_rtol * float(np.abs(scale).max())
    result.tiles_exact = (
        exact_tiles if result.tiles_exact is None else (result.tiles_exact and exact_tiles)
    )
    if not tolerated:
        result.failures.append(f"{spec!r}: tiles differ from the full bias by {mismatch:.3g}")


def check_cell(
    specs: Sequence[BiasSpec],
    backend: str,
    dtype: str,
    *,
    variant: str | None = None,
    cases: Callable[..., list[Case]] = default_cases,
    compiled: bool = False,
) -> CellResult:
    """Run every case for every spec on one backend and dtype against the reference.

    ``compiled=True`` evaluates the JAX requests as one jitted program instead
    of op by op; the checks are the same.
    """
    return _check_cells(specs, backend, [dtype], variant=variant, cases=cases, compiled=compiled)[0]


def _examples(name: str, head_counts: Iterable[int]) -> list[BiasSpec]:
    cls = _lookup(name)  # the class itself: variants may have required hyper-parameters
    return [spec for h in head_counts for spec in cls.parity_examples(h)]


def default_jobs() -> int:
    """Threads for :func:`run_parity`: the machine's CPU count."""
    return max(1, os.cpu_count() or 1)


def run_parity(
    variants: Iterable[str] | None = None,
    backends: Iterable[str] | None = None,
    dtypes: Iterable[str] = DEFAULT_DTYPES,
    *,
    head_counts: Iterable[int] = HEAD_COUNTS,
    progress: Callable[[int, int, CellResult], None] | None = None,
    compiled: bool = False,
    jobs: int = 1,
) -> list[CellResult]:
    """The parity matrix: registered variants × backends × dtypes.

    Args:
        variants: registered names (default: all, ``list_biases()``).
        backends: default :func:`backends_under_test`.
        dtypes: output dtypes to check.
        head_counts: head counts to instantiate each variant with.
        progress: called after each cell with ``(done, total, cell)``.
        compiled: evaluate each variant's JAX cells as one jitted program (one
            XLA compilation) instead of op by op. Off by default: a case given
            by lengths alone has no run-time input, so XLA folds its bias at
            compile time rather than running its kernels, and on XLA CPU the
            op-by-op compilations, shared by every variant, cost less CPU time
            in total (docs/parity.md).
        jobs: with more than 1, the JAX cells run on that many worker threads
            while the other backends' cells run (XLA compiles without the GIL).

    Returns the cells in the order variant, backend, dtype, whatever the threads did.
    """
    cells, _, _ = _run_matrix(
        variants,
        backends,
        dtypes,
        head_counts=head_counts,
        progress=progress,
        compiled=compiled,
        jobs=jobs,
        attention=False,
    )
    return cells


def _run_matrix(
    variants: Iterable[str] | None,
    backends: Iterable[str] | None,
    dtypes: Iterable[str],
    *,
    head_counts: Iterable[int],
    progress: Callable[[int, int, Any], None] | None,
    compiled: bool,
    jobs: int,
    attention: bool,
    gradients: bool = False,
    gradient_variants: list[str] | None = None,
) -> tuple[list[CellResult], list[Any], list[Any]]:
    """Bias cells, attention cells and gradient cells of :func:`run_parity` / ``posbias parity``.

    Every piece of work is a unit: a variant on one backend (all dtypes), a
    backend's attention functions or layers, a variant's gradients on one
    framework. With ``jobs > 1`` the JAX units (XLA compilations, which run
    without the GIL) go to ``jobs`` worker threads, longest first, while the main
    thread runs the other backends' units, which need no compilation; nothing
    waits for the end of another phase. Returns ``(bias, attention, gradient)``
    cells in the order variant, backend, dtype, whatever the threads did.
    """
    from . import _gradients, _layers

    names = list(variants) if variants is not None else list_biases()
    backend_names = list(backends) if backends is not None else backends_under_test()
    for name in backend_names:
        _backends.load(name)
    dtype_names = list(dtypes)
    head_counts = list(head_counts)
    examples = {name: _examples(name, head_counts) for name in names}
    references = {name: _References() for name in names}

    # (kind, key, backend, rough cost for ordering, work)
    units: list[tuple[str, Any, str, float, Callable[[], Any]]] = []
    for name in names:
        for backend in backend_names:
            work = functools.partial(
                _check_cells,
                examples[name],
                backend,
                dtype_names,
                variant=name,
                compiled=compiled,
                references=references[name],
            )
            units.append(("bias", name, backend, len(examples[name]) * len(dtype_names), work))
    if attention:
        jobs_ = _layers.attention_jobs(backend_names, dtype_names)
        for backend in dict.fromkeys(b for b, _ in jobs_):
            kinds = [k for b, k in jobs_ if b == backend]
            functional = [k for k in kinds if k != "layers"]
            # one unit for a backend's dtypes, in order: float16/bfloat16 compute in
            # float32, so after the float32 cell JAX has compiled most of their ops
            groups = [functional, ["layers"]] if "layers" in kinds else [functional]
            for group in groups:
                work = functools.partial(_attention_cells, backend, group)
                units.append(("attention", tuple(group), backend, 1000.0, work))
    frameworks = [b for b in backend_names if b != "numpy"]
    grad_names = _gradients.gradient_variants(gradient_variants) if gradients else []
    for name in grad_names:
        for backend in frameworks:
            work = functools.partial(_gradients.gradient_results, backend, name)
            units.append(("gradient", name, backend, 4.0, work))

    grad_cells_total = len(grad_names) * max(len(frameworks) - 1, 0)
    total = (
        len(names) * len(backend_names) * len(dtype_names)
        + sum(len(u[1]) for u in units if u[0] == "attention")
        + grad_cells_total
    )
    done = 0
    outputs: dict[int, Any] = {}
    grad_cells: dict[str, list[Any]] = {}

    def report(cells: list[Any]) -> None:
        nonlocal done
        for cell in cells:
            done += 1
            if progress is not None:
                progress(done, total, cell)

    def collect(index: int, value: Any) -> None:
        outputs[index] = value
        kind, key, _, _, _ = units[index]
        if kind != "gradient":
            report(_as_list(value))
            return
        mine = {u[2]: i for i, u in enumerate(units) if u[0] == "gradient" and u[1] == key}
        if all(i in outputs for i in mine.values()):  # every framework of this variant
            results = {b: outputs[i] for b, i in mine.items()}
            grad_cells[key] = _gradients.compare_gradients(key, frameworks, results)
            report(grad_cells[key])

    pooled = {i for i, u in enumerate(units) if jobs > 1 and u[2] == "jax"}
    by_cost = sorted(range(len(units)), key=lambda i: -units[i][3])  # stable: ties keep order
    pool = ThreadPoolExecutor(jobs) if pooled else None
    pending: dict[int, Future] = {}
    try:
        if pool is not None:
            pending = {i: pool.submit(units[i][4]) for i in by_cost if i in pooled}
        for index in by_cost:
            if index in pooled:
                continue
            collect(index, units[index][4]())
            for key in [k for k, f in pending.items() if f.done()]:
                collect(key, pending.pop(key).result())
        while pending:
            finished = next(iter(wait(pending.values(), return_when=FIRST_COMPLETED)[0]))
            key = next(k for k, f in pending.items() if f is finished)
            collect(key, pending.pop(key).result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    bias = [c for i, u in enumerate(units) if u[0] == "bias" for c in _as_list(outputs[i])]
    layers = [c for i, u in enumerate(units) if u[0] == "attention" for c in outputs[i]]
    grads = [c for name in grad_names for c in grad_cells.get(name, [])]
    return bias, layers, grads


def _attention_cells(backend: str, kinds: list[str]) -> list[Any]:
    from . import _layers

    return [_layers.attention_cell(backend, kind) for kind in kinds]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


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
    dtype_names = list(dtypes)
    references = _References()
    cells = [
        cell
        for b in backend_names
        for cell in _check_cells(specs, b, dtype_names, references=references)
    ]
    failures = [f"[{c.backend}/{c.dtype}] {f}" for c in cells for f in c.failures]
    if failures:
        raise AssertionError("parity failed:\n" + "\n".join(failures[:50]))
    return cells
