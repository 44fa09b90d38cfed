"""Parity of the attention functions and layers across frameworks.

Same portable weights and inputs must give the same outputs in PyTorch, JAX
and TensorFlow as the NumPy float64 reference (:mod:`posbias.numpy`), for
causal and bidirectional, padded, packed, offset and decoding cases, with head
counts 1, 3, 8, 12 and grouped-query 12→4. Errors are normwise:
``max|x - ref| / max|ref|``, compared with :data:`ATTENTION_TOLERANCES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import backends as _backends
from .. import numpy as _np_layers

#: normwise relative tolerance per input dtype
ATTENTION_TOLERANCES = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}
LAYOUT = {"numpy": "bhld", "torch": "bhld", "jax": "blhd", "tensorflow": "blhd"}
#: (query heads, key/value heads)
HEAD_CONFIGS = ((1, 1), (3, 3), (8, 8), (12, 12), (12, 4))
HEAD_DIM = 8


def framework_module(backend: str) -> Any:
    """``posbias.torch`` / ``posbias.jax`` / ``posbias.tensorflow`` / ``posbias.numpy``."""
    _backends.load(backend)  # BackendUnavailableError naming the extra
    return importlib.import_module(f"posbias.{backend}")


@dataclasses.dataclass
class LayerCell:
    backend: str
    dtype: str
    checks: int = 0
    max_error: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures


def _normwise(x: np.ndarray, ref: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.shape != ref.shape or not np.isfinite(x).all():
        return float("inf")
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def _inputs(batch: int, length: int, heads: int, kv_heads: int, seed: int):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, heads, length, HEAD_DIM))
    k = rng.normal(size=(batch, kv_heads, length + 3, HEAD_DIM))
    v = rng.normal(size=(batch, kv_heads, length + 3, HEAD_DIM))
    return q, k, v


def _masks(batch: int, length: int) -> dict[str, np.ndarray]:
    left = np.ones((batch, length), bool)
    left[0, :3] = False
    right = np.ones((batch, length), bool)
    right[-1, length - 2 :] = False
    segments = np.zeros((batch, length), np.int64)
    segments[:, length // 2 :] = 1
    segments[-1, length - 2 :] = 2
    return {"left": left, "right": right, "segments": segments}


def functional_cases() -> list[tuple[str, int, int, dict[str, Any]]]:
    """(label, heads, kv_heads, attention kwargs) for the functional attention."""
    cases = []
    for heads, kv in HEAD_CONFIGS:
        tag = f"H={heads}" + (f"/kv={kv}" if kv != heads else "")
        m = _masks(2, 9)
        rng = np.random.default_rng(heads)
        pairs = rng.random((2, 1, 9, 9)) > 0.3  # (B, 1, Lq, Lk): True = takes part
        scores = np.where(rng.random((heads, 9, 9)) > 0.2, rng.normal(size=(heads, 9, 9)), -np.inf)
        cases += [
            (f"{tag} bidirectional", heads, kv, dict(causal=False)),
            (f"{tag} causal", heads, kv, dict(causal=True)),
            (f"{tag} causal offset", heads, kv, dict(causal=True, q_offset=1)),
            (f"{tag} batched offset", heads, kv, dict(causal=True, q_offset=np.array([0, 2]))),
            (f"{tag} left-padded", heads, kv, dict(causal=True, key_mask=m["left"])),
            (f"{tag} right-padded", heads, kv, dict(causal=False, key_mask=m["right"])),
            (f"{tag} packed", heads, kv, dict(causal=True, segment_ids=m["segments"])),
            (f"{tag} bool attn_mask", heads, kv, dict(causal=True, attn_mask=pairs)),
            (f"{tag} additive attn_mask", heads, kv, dict(causal=False, attn_mask=scores)),
        ]
    return cases


def _to_layout(array: np.ndarray, backend: str) -> np.ndarray:
    return array if LAYOUT[backend] == "bhld" else np.swapaxes(array, 1, 2)


def _cast(xp, array: np.ndarray, dtype: str) -> Any:
    return xp.cast(xp.from_numpy(np.asarray(array, dtype=np.float32)), dtype)


def _native_kwargs(xp, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: xp.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}


def check_functional(backend: str, dtype: str) -> LayerCell:
    """The framework's ``attention`` against ``posbias.numpy.attention`` (float64)."""
    start = time.perf_counter()
    cell = LayerCell(backend, dtype)
    module = framework_module(backend)
    xp = _backends.load(backend)()
    tol = ATTENTION_TOLERANCES[dtype]
    for index, (label, heads, kv, kwargs) in enumerate(functional_cases()):
        length = 9
        q, k, v = _inputs(2, length, heads, kv, seed=index)
        k, v = k[:, :, :length], v[:, :, :length]
        # the reference sees the same rounded inputs the framework sees
        rounded = [xp.to_numpy(_cast(xp, t, dtype)).astype(np.float64) for t in (q, k, v)]
        ref = _np_layers.attention(*rounded, "alibi", **kwargs)
        args = [_cast(xp, _to_layout(t, backend), dtype) for t in (q, k, v)]
        for block_size in (None, 4):  # one block, and several (blockwise kernels)
            out = module.attention(
                *args, "alibi", block_size=block_size, **_native_kwargs(xp, kwargs)
            )
            x = _to_layout(xp.to_numpy(out), backend)
            cell.checks += 1
            where = f"{label} (block_size={block_size})"
            if xp.dtype_name(out.dtype) != dtype:
                cell.failures.append(f"{where}: output dtype {out.dtype}, expected {dtype}")
            err = _normwise(x, ref)
            cell.max_error = max(cell.max_error, err)
            if not err <= tol:
                cell.failures.append(f"{where}: normwise error {err:.3g} > {tol}")
    cell.seconds = time.perf_counter() - start
    return cell


def _decode(
    layer: Any,
    x: Any,
    steps: list[int],
    mask: Any,
    batch: int,
    capacity: int,
    concat: Callable[[list[Any]], Any],
) -> Any:
    cache = layer.init_cache(batch_size=batch, capacity=capacity)
    outs, start = [], 0
    for size in steps:
        piece_mask = None if mask is None else mask[:, start : start + size]
        y, cache = layer(x[:, start : start + size], key_mask=piece_mask, cache=cache)
        outs.append(y)
        start += size
    return concat(outs)


def check_layers(backend: str) -> LayerCell:
    """``MultiHeadAttention`` (float32) with shared portable weights vs the NumPy reference."""
    start = time.perf_counter()
    cell = LayerCell(backend, "float32")
    module = framework_module(backend)
    xp = _backends.load(backend)()
    tol = ATTENTION_TOLERANCES["float32"]
    batch, length = 2, 9
    for index, (heads, kv) in enumerate(HEAD_CONFIGS):
        embed = heads * HEAD_DIM
        ref_layer = _np_layers.MultiHeadAttention(
            embed, heads, causal=True, num_kv_heads=kv, seed=index
        )
        bi_ref = _np_layers.MultiHeadAttention(
            embed, heads, causal=False, num_kv_heads=kv, seed=index
        )
        layer = module.MultiHeadAttention(embed, heads, causal=True, num_kv_heads=kv, seed=7)
        bi_layer = module.MultiHeadAttention(embed, heads, causal=False, num_kv_heads=kv, seed=7)
        layer.load_portable_weights(ref_layer.portable_weights())  # moved across frameworks
        bi_layer.load_portable_weights(bi_ref.portable_weights())
        rng = np.random.default_rng(index)
        x = rng.normal(size=(batch, length, embed)).astype(np.float32)
        kv = rng.normal(size=(batch, length + 4, embed)).astype(np.float32)
        m = _masks(batch, length)
        keep = rng.random((batch, 1, length, length + 4)) > 0.3
        add = rng.normal(size=(heads, length, length + 4)).astype(np.float32)
        native = xp.from_numpy(x)
        cases = {
            "cross-attention, bool attn_mask": (
                cross_attention(layer, backend, native, xp.from_numpy(kv), xp.from_numpy(keep)),
                ref_layer(x, kv, attn_mask=keep),
            ),
            "cross-attention, additive attn_mask": (
                cross_attention(bi_layer, backend, native, xp.from_numpy(kv), xp.from_numpy(add)),
                bi_ref(x, kv, attn_mask=add),
            ),
            "causal": (layer(native), ref_layer(x)),
            "bidirectional": (bi_layer(native), bi_ref(x)),
            "left-padded": (
                layer(native, key_mask=xp.from_numpy(m["left"])),
                ref_layer(x, key_mask=m["left"]),
            ),
            "packed": (
                layer(native, segment_ids=xp.from_numpy(m["segments"])),
                ref_layer(x, segment_ids=m["segments"]),
            ),
            "decoding": (
                _decode(
                    layer,
                    native,
                    [4, 1, 2, 2],
                    xp.from_numpy(m["left"]),
                    batch,
                    12,
                    lambda ys: np.concatenate([xp.to_numpy(y) for y in ys], 1),
                ),
                ref_layer(x, key_mask=m["left"]),
            ),
        }
        for label, (out, ref) in cases.items():
            cell.checks += 1
            err = _normwise(xp.to_numpy(out) if not isinstance(out, np.ndarray) else out, ref)
            cell.max_error = max(cell.max_error, err)
            if not err <= tol:
                cell.failures.append(f"H={heads}/kv={kv} {label}: normwise error {err:.3g} > {tol}")
    cell.seconds = time.perf_counter() - start
    return cell


def cross_attention(layer: Any, backend: str, x: Any, kv: Any, attn_mask: Any = None) -> Any:
    """``layer`` attending from ``x`` to ``kv`` in its framework's idiom (keys = values = kv).

    ``posbias.tensorflow``'s second positional argument is ``key_mask``: it takes
    ``value=`` by name; the others take ``(x, key/inputs_k)`` positionally.
    """
    if backend == "tensorflow":
        return layer(x, value=kv, attn_mask=attn_mask)
    return layer(x, kv, attn_mask=attn_mask)


def attention_jobs(backend_names: list[str], dtypes: list[str]) -> list[tuple[str, str]]:
    """``(backend, kind)`` of every attention cell: each dtype's ``attention()``, then the layer."""
    frameworks = [b for b in backend_names if b != "numpy"]
    jobs = [(b, d) for b in frameworks for d in dtypes if d in ATTENTION_TOLERANCES]
    return jobs + [(b, "layers") for b in frameworks]


def attention_cell(backend: str, kind: str) -> LayerCell:
    """One attention cell of ``posbias parity``: ``kind`` is a dtype or ``"layers"``."""
    if kind == "layers":
        cell = check_layers(backend)
        cell.dtype = "float32 MultiHeadAttention"
    else:
        cell = check_functional(backend, kind)
        cell.dtype = f"{kind} attention()"
    return cell
