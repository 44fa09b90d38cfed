"""XLA temp memory of the sharded-attention backward pass, tiles checkpointed or kept.

Run: python benchmarks/ring_backward_memory.py   (compiles only; nothing is timed)
Prints, per L, the temp bytes of jit(grad(sum(out²))) for
posbias.jax.sharded_attention on 4 (virtual CPU) devices, causal ALiBi, zigzag.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from posbias.jax import sharded_attention

H, D = 8, 64
mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
print("| L | checkpointed | kept | ratio |\n|---|---|---|---|")
for length in (1024, 2048, 4096):
    shape = jax.ShapeDtypeStruct((1, length, H, D), jnp.float32)
    temp = {}
    for checkpoint_tiles in (True, False):

        def loss(q, k, v, checkpoint_tiles=checkpoint_tiles):
            out = sharded_attention(q, k, v, "alibi", mesh=mesh, seq_axis="seq", causal=True,
                                    order="zigzag", checkpoint_tiles=checkpoint_tiles)  # fmt: skip
            return jnp.sum(out**2)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
        temp[checkpoint_tiles] = compiled.memory_analysis().temp_size_in_bytes
    print(
        f"| {length} | {temp[True] / 2**20:.0f} MiB | {temp[False] / 2**20:.0f} MiB "
        f"| {temp[False] / temp[True]:.1f}× |"
    )
