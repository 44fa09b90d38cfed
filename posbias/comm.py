"""Costs of distributed attention with a bias in bytes, not seconds: communication and memory.

``posbias comm`` compares, per device and per attention call (forward), the
bytes each layout sends with the naive approach of all-gathering the full
``(H, L, L)`` bias (plus the keys and values) on every device:

* **ring** (``posbias.jax.sharded_attention`` / ``posbias.torch.distributed.ring_attention``):
  ``n - 1`` steps, each passing one K/V block, ``2·B·H_kv·(L/n)·D`` elements.
  The JAX row is *measured*: the sizes of the ``collective-permute`` ops in
  the compiled XLA program (no run needed). The bias is never sent.
* **head-parallel** (Ulysses, ``head_parallel_attention``): two all-to-alls
  move ``(n-1)/n`` of q, k, v and the output.
* **naive**: every device receives the ``(n-1)/n`` of the float32 bias and of
  K/V it does not hold.

:func:`backward_temp_bytes` reads XLA's temp memory for the backward pass
(``benchmarks/ring_backward_memory.py``). The PyTorch functions count the bytes they send
(:func:`posbias.torch.distributed.traffic`); tests/test_distributed_torch.py
checks those counts against the same closed forms.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class Volume:
    """Bytes one device sends (ring, head-parallel) or receives (naive) in one forward call."""

    length: int
    devices: int
    ring: int
    ring_per_step: int
    ring_measured: int | None
    head_parallel: int
    naive_bias: int
    naive_total: int

    @property
    def ratio(self) -> float:
        """How many times more the naive all-gather moves than the ring."""
        return self.naive_total / self.ring


def closed_forms(
    length: int, devices: int, *, batch: int, heads: int, kv_heads: int, dim: int, dtype: str
) -> Volume:
    """The per-device byte counts of :class:`Volume` from the shapes."""
    item = ITEMSIZE[dtype]
    local = length // devices
    step = 2 * batch * kv_heads * local * dim * item
    qo = 2 * batch * heads * local * dim * item
    kv = 2 * batch * kv_heads * local * dim * item
    head_parallel = (qo + kv) * (devices - 1) // devices
    bias = heads * length * length * 4 * (devices - 1) // devices
    kv_gather = 2 * batch * kv_heads * length * dim * item * (devices - 1) // devices
    return Volume(
        length=length,
        devices=devices,
        ring=(devices - 1) * step,
        ring_per_step=step,
        ring_measured=None,
        head_parallel=head_parallel,
        naive_bias=bias,
        naive_total=bias + kv_gather,
    )


_BYTES = {"f64": 8, "s64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "u16": 2, "s16": 2}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def hlo_permute_bytes(hlo: str) -> int:
    """Bytes sent per device by the ``collective-permute`` ops of compiled HLO text."""
    total = 0
    for line in hlo.splitlines():
        if "collective-permute" not in line or "=" not in line:
            continue
        if "collective-permute-done" in line:
            continue  # the matching -start already counted
        result = line.split("=", 1)[1].split("collective-permute", 1)[0]
        shapes = _SHAPE.findall(result)
        if "collective-permute-start" in line:
            shapes = shapes[: len(shapes) // 2]  # (operand, result, ...) tuple: count once
        for kind, dims in shapes:
            count = 1
            for d in filter(None, dims.split(",")):
                count *= int(d)
            total += count * _BYTES[kind]
    return total


def measure_jax_ring(
    length: int, devices: int, *, batch: int, heads: int, kv_heads: int, dim: int, dtype: str
) -> int:
    """Compile ``sharded_attention`` (causal ALiBi, zigzag) and count its permuted bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from .jax import sharded_attention

    if len(jax.devices()) < devices:
        raise RuntimeError(
            f"{devices} JAX devices needed, {len(jax.devices())} present; run posbias comm "
            "in a fresh process (it sets XLA_FLAGS before JAX starts)."
        )
    mesh = Mesh(np.array(jax.devices()[:devices]), ("seq",))
    q = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, dim), jnp.dtype(dtype))

    def fn(q, k, v):
        return sharded_attention(
            q, k, v, "alibi", mesh=mesh, seq_axis="seq", causal=True, order="zigzag"
        )

    hlo = jax.jit(fn).lower(q, kv, kv).compile().as_text()
    return hlo_permute_bytes(hlo)


def backward_temp_bytes(
    mesh: Any, length: int, *, heads: int, dim: int, checkpoint_tiles: bool
) -> int:
    """XLA temp bytes of ``jit(grad(sum(out²)))`` for causal zigzag ALiBi ring attention.

    Compiles only. ``mesh`` is a one-axis mesh named ``"seq"``.
    """
    import jax
    import jax.numpy as jnp

    from .jax import sharded_attention

    shape = jax.ShapeDtypeStruct((1, length, heads, dim), jnp.float32)

    def loss(q, k, v):
        out = sharded_attention(
            q, k, v, "alibi", mesh=mesh, seq_axis="seq", causal=True, order="zigzag",
            checkpoint_tiles=checkpoint_tiles,
        )  # fmt: skip
        return jnp.sum(out**2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def report(
    lengths: Sequence[int] = (4096, 16384, 65536),
    devices: int = 4,
    *,
    batch: int = 1,
    heads: int = 32,
    kv_heads: int = 8,
    dim: int = 128,
    dtype: str = "bfloat16",
    measure: bool = True,
) -> list[Volume]:
    """One :class:`Volume` per sequence length (JAX ring measured when ``measure``)."""
    rows = []
    for length in lengths:
        shapes = dict(batch=batch, heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype)
        row = closed_forms(length, devices, **shapes)
        if measure:
            row.ring_measured = measure_jax_ring(length, devices, **shapes)
        rows.append(row)
    return rows


def format_table(rows: Sequence[Volume]) -> str:
    """A Markdown table of the rows (MiB per device per forward call)."""

    def mib(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**20:,.1f}"

    lines = [
        "| L | devices | ring (closed form) | ring (JAX, measured) | per ring step "
        "| head-parallel | naive: bias all-gather | naive total | naive / ring |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.length} | {r.devices} | {mib(r.ring)} | {mib(r.ring_measured)} "
            f"| {mib(r.ring_per_step)} | {mib(r.head_parallel)} | {mib(r.naive_bias)} "
            f"| {mib(r.naive_total)} | {r.ratio:,.0f}× |"
        )
    return "\n".join(lines)


def ensure_devices(devices: int) -> None:
    """Ask XLA for ``devices`` CPU devices; effective only before JAX starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
