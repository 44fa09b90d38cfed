"""Ring and head-parallel (Ulysses) attention with ALiBi over torch.distributed.

Run: torchrun --standalone --nproc-per-node 2 examples/distributed/torch_distributed.py
(gloo on CPU; on GPUs use "nccl" and move the tensors to cuda:LOCAL_RANK).
"""

import torch
import torch.distributed as dist

import posbias.torch
from posbias.torch.distributed import head_parallel_attention, ring_attention, shard

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)  # every rank builds the same full tensors, for the comparison
q, k, v = torch.randn(3, 1, 8, 1024, 64)  # (B, H, L, D) each
ref = posbias.torch.attention(q, k, v, "alibi", causal=True)  # one device

# sequence parallel, load-balanced: rank r holds chunks r and 2·world-1-r
local = [shard(t, rank, world, "zigzag") for t in (q, k, v)]
out = ring_attention(*local, "alibi", causal=True, order="zigzag")
ring_error = (out - shard(ref, rank, world, "zigzag")).abs().max().item()

# head parallel: sequence shards in, all-to-all to H/world heads, all-to-all back
local = [shard(t, rank, world) for t in (q, k, v)]
out = head_parallel_attention(*local, "alibi", causal=True)
heads_error = (out - shard(ref, rank, world)).abs().max().item()

print(f"rank {rank}/{world}: ring {ring_error:.1e}, head-parallel {heads_error:.1e}")
assert max(ring_error, heads_error) < 1e-5
dist.barrier()  # no rank tears gloo down while another still talks to it
dist.destroy_process_group()
