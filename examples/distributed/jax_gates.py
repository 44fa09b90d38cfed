"""Forget-gate attention (FoX-style log_gates) sequence-sharded over 4 JAX devices.

Run: python examples/distributed/jax_gates.py
On CPU it asks XLA for 4 virtual devices; on GPUs/TPUs the real ones are used.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # CPU only

import jax
import jax.numpy as jnp

from posbias.jax import attention, sharded_attention, unzigzag, zigzag

mesh = jax.make_mesh((4,), ("seq",))
B, L, H, D = 1, 1024, 8, 64
kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
q, k, v = (jax.random.normal(key, (B, L, H, D)) for key in (kq, kk, kv))
log_gates = jax.nn.log_sigmoid(jax.random.normal(kg, (B, L, H)) + 3.0)  # FoX: logsigmoid(x·W + b)


@jax.jit
def layer(q, k, v, g):
    # the gates are sharded like the keys and reordered with them (zigzag)
    return sharded_attention(q, k, v, "alibi", mesh=mesh, seq_axis="seq", causal=True,
                             order="zigzag", log_gates=g)  # fmt: skip


out = unzigzag(layer(*(zigzag(t, 4) for t in (q, k, v, log_gates))), 4)
ref = attention(q, k, v, "alibi", causal=True, log_gates=log_gates)  # one device
error = float(jnp.abs(out - ref).max())
print(f"devices: {len(jax.devices())}, gates: max |sharded - single device| = {error:.1e}")
assert error < 1e-5
