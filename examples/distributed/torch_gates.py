"""Forget-gate attention (log_gates) with ring and head-parallel attention over torch.distributed.

Run: torchrun --standalone --nproc-per-node 2 examples/distributed/torch_gates.py
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import posbias.torch
from posbias.torch.distributed import head_parallel_attention, ring_attention, shard

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)  # every rank builds the same full tensors, for the comparison
q, k, v = torch.randn(3, 1, 8, 1024, 64)  # (B, H, L, D) each
g = F.logsigmoid(torch.randn(1, 8, 1024) + 3.0)  # (B, H, L) log-gates <= 0
ref = posbias.torch.attention(q, k, v, "alibi", causal=True, log_gates=g)  # one device

# the gates are sharded like the tokens: each rank passes the gates of its own slots
local = [shard(t, rank, world, "zigzag") for t in (q, k, v, g)]
out = ring_attention(*local[:3], "alibi", causal=True, order="zigzag", log_gates=local[3])
ring_error = (out - shard(ref, rank, world, "zigzag")).abs().max().item()

local = [shard(t, rank, world) for t in (q, k, v, g)]
out = head_parallel_attention(*local[:3], "alibi", causal=True, log_gates=local[3])
heads_error = (out - shard(ref, rank, world)).abs().max().item()

print(f"rank {rank}/{world}: gates ring {ring_error:.1e}, head-parallel {heads_error:.1e}")
assert max(ring_error, heads_error) < 1e-5
dist.barrier()  # no rank tears gloo down while another still talks to it
dist.destroy_process_group()
