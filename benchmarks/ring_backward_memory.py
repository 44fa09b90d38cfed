"""XLA temp memory of the sharded-attention backward pass, tiles checkpointed or kept.

Run: python benchmarks/ring_backward_memory.py   (compiles only; nothing is timed)
Prints, per L, the temp bytes of jit(grad(sum(out²))) for
posbias.jax.sharded_attention on 4 (virtual CPU) devices, causal ALiBi, zigzag.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax
import numpy as np
from jax.sharding import Mesh

from posbias.comm import backward_temp_bytes

mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
print("| L | checkpointed | kept | ratio |\n|---|---|---|---|")
for length in (1024, 2048, 4096):
    temp = {
        flag: backward_temp_bytes(mesh, length, heads=8, dim=64, checkpoint_tiles=flag)
        for flag in (True, False)
    }
    print(
        f"| {length} | {temp[True] / 2**20:.0f} MiB | {temp[False] / 2**20:.0f} MiB "
        f"| {temp[False] / temp[True]:.1f}× |"
    )
