"""Gradient parity: the same bias parameters and inputs give the same gradients everywhere.

Each framework's ``attention`` with a ``PositionalBias`` module (parameters
from the same seeded NumPy initialisation) computes the gradients of
``sum((out · w)²)`` with respect to q, k, v and every bias parameter; the
cells compare each framework with the first one (normwise, the bias
parameters as one vector: some of their gradients are exactly zero, e.g.
FIRE's output bias under softmax). :func:`gradients` is also what
``tests/test_backward.py`` compares with a float64 reference.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from ..registry import get, list_biases
from ._layers import framework_module

#: normwise tolerance of float32 gradients between frameworks
GRADIENT_TOLERANCE = 1e-5
#: the loss: sum((out · WEIGHTS)²) over every output (WEIGHTS along the head dim)
WEIGHTS = np.linspace(-1.0, 1.0, 16)
HEADS, KV_HEADS, LENGTH = 4, 2, 13


def spec_for(name: str, heads: int = HEADS) -> Any:
    """``name`` with the hyper-parameters of its first parity example (2-D grids, windows)."""
    return type(get(name, num_heads=heads)).parity_examples(heads)[0]


def gradients(
    backend: str,
    spec: Any,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    kwargs: dict[str, Any],
    dtype: str,
    implementation: str,
    block_size: int | None = 4,
) -> tuple[list[np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """``([dq, dk, dv], {param: grad}, out)`` as float64 NumPy, layout ``(B, H, L, D)``.

    ``q``, ``k``, ``v`` are ``(B, H, L, D)`` NumPy arrays; ``kwargs`` the
    attention keywords (NumPy arrays become native tensors).
    """
    run = {"torch": _torch, "jax": _jax, "tensorflow": _tensorflow}[backend]
    return run(spec, q, k, v, kwargs, dtype, implementation, block_size)


def _torch(spec, q, k, v, kwargs, dtype, implementation, block_size):
    import torch

    m = framework_module("torch")
    module = m.PositionalBias(spec)
    leaves = [torch.tensor(t, dtype=getattr(torch, dtype), requires_grad=True) for t in (q, k, v)]
    kw = {n: torch.as_tensor(x) if isinstance(x, np.ndarray) else x for n, x in kwargs.items()}
    out = m.attention(*leaves, module, implementation=implementation, block_size=block_size, **kw)
    weights = torch.as_tensor(WEIGHTS, dtype=torch.float64)
    (out.double() * weights).square().sum().backward()
    grads = [t.grad.double().numpy() for t in leaves]
    params = {n: p.grad.double().numpy() for n, p in module.params.items() if p.grad is not None}
    return grads, params, out.detach().double().numpy()


def _jax(spec, q, k, v, kwargs, dtype, implementation, block_size):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    m = framework_module("jax")
    module = m.PositionalBias(spec)
    with jax.enable_x64(dtype == "float64"):
        args = [jnp.asarray(np.swapaxes(t, 1, 2), dtype=dtype) for t in (q, k, v)]
        kw = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in kwargs.items()}
        weights = jnp.asarray(WEIGHTS)

        def loss(module, q, k, v):
            out = m.attention(
                q, k, v, module, implementation=implementation, block_size=block_size, **kw
            )
            return jnp.sum((out.astype(weights.dtype) * weights) ** 2), out

        grad = nnx.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        (_, out), grads = grad(module, *args)
    params = {
        name.removeprefix("param_"): np.asarray(g, np.float64)
        for name, g in nnx.to_pure_dict(grads[0]).items()
    }
    qkv = [np.swapaxes(np.asarray(g, np.float64), 1, 2) for g in grads[1:]]
    return qkv, params, np.swapaxes(np.asarray(out, np.float64), 1, 2)


def _tensorflow(spec, q, k, v, kwargs, dtype, implementation, block_size):
    import tensorflow as tf

    m = framework_module("tensorflow")
    module = m.PositionalBias(spec)
    args = [tf.constant(np.swapaxes(t, 1, 2), dtype=dtype) for t in (q, k, v)]
    kw = {n: tf.constant(x) if isinstance(x, np.ndarray) else x for n, x in kwargs.items()}
    with tf.GradientTape() as tape:
        tape.watch(args)
        out = m.attention(*args, module, implementation=implementation, block_size=block_size, **kw)
        loss = tf.reduce_sum((tf.cast(out, tf.float64) * WEIGHTS) ** 2)
    names = list(module.bias_params)
    weights = [module.bias_params[n] for n in names]
    grads = tape.gradient(loss, args + weights)
    qkv = [np.swapaxes(tf.convert_to_tensor(g).numpy().astype(np.float64), 1, 2) for g in grads[:3]]
    params = {
        n: tf.convert_to_tensor(g).numpy().astype(np.float64)
        for n, g in zip(names, grads[3:], strict=True)
        if g is not None
    }
    return qkv, params, np.swapaxes(out.numpy().astype(np.float64), 1, 2)


def normwise(x: np.ndarray, ref: np.ndarray) -> float:
    """``max|x - ref| / max|ref|``."""
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def params_error(params: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    """:func:`normwise` of all parameter gradients as one vector (0 for none)."""
    if sorted(params) != sorted(ref):
        return float("inf")
    if not ref:
        return 0.0
    flat = [np.concatenate([g[n].ravel() for n in sorted(ref)]) for g in (params, ref)]
    return normwise(*flat)


# ------------------------------------------------------------------ parity cells
@dataclasses.dataclass
class GradientCell:
    variant: str
    backend: str
    reference: str
    dtype: str = "float32 gradients"
    checks: int = 0
    max_error: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures


def cases() -> dict[str, dict[str, Any]]:
    """Causal, padded and packed inputs (grouped-query attention throughout)."""
    mask = np.ones((2, LENGTH), bool)
    mask[0, :3] = False
    segments = np.zeros((2, LENGTH), np.int64)
    segments[:, LENGTH // 3 :] = 1
    return {
        "causal": dict(causal=True),
        "bidirectional": dict(causal=False),
        "left padded": dict(causal=True, key_mask=mask),
        "packed": dict(causal=True, segment_ids=segments),
    }


def gradient_variants(variants: list[str] | None = None) -> list[str]:
    """The variants :func:`check_gradients` checks: ``variants``, else every learnable one."""
    return variants or [n for n in list_biases() if get(n, num_heads=HEADS).learnable]


def gradient_results(backend: str, name: str) -> tuple[dict[str, Any], float]:
    """``({case: gradients(...)}, seconds)`` of one variant on one framework, every case."""
    spec = spec_for(name)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, HEADS, LENGTH, 16)).astype(np.float32)
    k, v = rng.normal(size=(2, 2, KV_HEADS, LENGTH, 16)).astype(np.float32)
    results, seconds = {}, 0.0
    for label, kwargs in cases().items():
        start = time.perf_counter()
        results[label] = gradients(
            backend, spec, q, k, v, kwargs, "float32", "auto", block_size=None
        )
        seconds += time.perf_counter() - start
    return results, seconds


def compare_gradients(
    name: str, frameworks: list[str], results: dict[str, tuple[dict[str, Any], float]]
) -> list[GradientCell]:
    """One cell per framework after the first: its :func:`gradient_results` vs the first's."""
    cells = []
    first = frameworks[0] if frameworks else None
    for backend in frameworks[1:]:
        mine_all, seconds = results[backend]
        cell = GradientCell(name, backend, first, seconds=seconds)
        for label in cases():
            (mine, mine_p, _), (ref, ref_p, _) = mine_all[label], results[first][0][label]
            errors = [normwise(a, b) for a, b in zip(mine, ref, strict=True)]
            errors.append(params_error(mine_p, ref_p))
            cell.checks += 1
            cell.max_error = max(cell.max_error, *errors)
            if max(errors) > GRADIENT_TOLERANCE:
                cell.failures.append(
                    f"{label}: normwise gradient error {max(errors):.3g} > "
                    f"{GRADIENT_TOLERANCE} (q, k, v, parameters: "
                    + ", ".join(f"{e:.2g}" for e in errors)
                    + ")"
                )
        cells.append(cell)
    return cells


def check_gradients(backends: list[str], variants: list[str] | None = None) -> list[GradientCell]:
    """One cell per learnable variant and framework: gradients vs the first framework's."""
    frameworks = [b for b in backends if b != "numpy"]
    cells = []
    for name in gradient_variants(variants):
        results = {b: gradient_results(b, name) for b in frameworks}
        cells += compare_gradients(name, frameworks, results)
    return cells
