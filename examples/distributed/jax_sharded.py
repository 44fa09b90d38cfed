"""Ring + head-parallel attention with ALiBi on a 2 x 2 JAX mesh.

Run: python examples/distributed/jax_sharded.py
On CPU it asks XLA for 4 virtual devices; on GPUs/TPUs the real ones are used.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # CPU only

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from posbias.jax import attention, sharded_attention, unzigzag, zigzag

mesh = jax.make_mesh((2, 2), ("seq", "head"))  # 2 sequence shards x 2 head shards
B, L, H, D = 1, 1024, 8, 64
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (B, L, H, D))
k = jax.random.normal(kk, (B, L, H, D))
v = jax.random.normal(kv, (B, L, H, D))

# load-balanced causal layout: reorder the sequence once (the data pipeline can
# do it), shard it, and keep it in that order through the model
sharding = NamedSharding(mesh, P(None, "seq", "head", None))
q_z, k_z, v_z = (jax.device_put(zigzag(t, 2), sharding) for t in (q, k, v))


@jax.jit
def layer(q, k, v):
    return sharded_attention(
        q, k, v, "alibi", mesh=mesh, seq_axis="seq", head_axis="head", causal=True,
        order="zigzag",
    )  # fmt: skip


out = unzigzag(layer(q_z, k_z, v_z), 2)
ref = attention(q, k, v, "alibi", causal=True)  # the same on one device
error = float(jnp.abs(out - ref).max())
print(f"devices: {len(jax.devices())}, max |sharded - single device| = {error:.1e}")
assert error < 1e-5
