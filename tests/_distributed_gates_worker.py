"""One rank of the ``log_gates=`` distributed checks (spawned by
tests/test_distributed_gates_torch.py).

Every rank builds the same full-sequence tensors and log-gates, takes its
shard, runs ring_attention / head_parallel_attention and compares outputs and
gradients (q, k, v, gates) with single-device posbias attention. Results go to
``<out>/rank<r>.json``.
"""

from __future__ import annotations

B, H, L, D = 2, 4, 32, 8


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    from _distributed_worker import run

    run(rank, world, port, out_dir, _checks)


def _checks(rank: int, world: int, results: dict) -> None:
    import torch
    import torch.distributed as dist

    import posbias
    import posbias.torch as pt
    from posbias.torch.distributed import head_parallel_attention, ring_attention, shard

    def data(seed=0):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
        k, v = torch.randn(2, B, 2, L, D, generator=g, dtype=torch.float64)
        gates = -0.3 * torch.rand(2, B, H, L, generator=g, dtype=torch.float64)
        return [t.float() for t in (q, k, v, *gates)]

    def err(a, b):
        return float((a.detach().double() - b.detach().double()).abs().max())

    def gate_kwargs(causal, g, g_after):
        return {"log_gates": g} if causal else {"log_gates": g, "log_gates_after": g_after}

    fns = {"ring": ring_attention, "heads": head_parallel_attention}

    # forward and gradients (q, k, v, gates): causal and bidirectional, both layouts
    for causal in (True, False):
        for order in ("contiguous", "zigzag"):
            q, k, v, g, g_after = data(seed=1)
            names = list(gate_kwargs(causal, g, g_after))
            full = [t.clone().requires_grad_() for t in (q, k, v, g, g_after)[: 3 + len(names)]]
            kw = dict(zip(names, full[3:], strict=True))
            ref = pt.attention(*full[:3], "alibi", causal=causal, **kw)
            (ref * ref.cos()).sum().backward()
            plain = pt.attention(q, k, v, "alibi", causal=causal)
            results[f"gates_matter/causal={causal}"] = err(ref, plain)
            for fname, fn in fns.items():
                local = [shard(t.detach(), rank, world, order).requires_grad_() for t in full]
                kw = dict(zip(names, local[3:], strict=True))
                out = fn(*local[:3], "alibi", causal=causal, order=order, **kw)
                (out * out.cos()).sum().backward()
                key = f"{fname}/causal={causal}/{order}"
                results[f"forward/{key}"] = err(out, shard(ref, rank, world, order))
                results[f"grad/{key}"] = max(
                    err(a.grad, shard(b.grad, rank, world, order))
                    / max(1.0, float(b.grad.abs().max()))
                    for a, b in zip(local, full, strict=True)
                )

    # padding and packing (the masked ring; head-parallel gathers the masks)
    q, k, v, g, g_after = data(seed=2)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, -7:] = False
    mask[1, :3] = False
    segments = torch.tensor([[0] * 10 + [1] * 15 + [2] * 7] * B)
    for name, causal, extra in (
        ("padding/causal", True, {"key_mask": mask}),
        ("padding/bidirectional", False, {"key_mask": mask}),
        ("packed", True, {"segment_ids": segments}),
    ):
        kw = gate_kwargs(causal, g, g_after)
        ref = pt.attention(q, k, v, "alibi", causal=causal, **kw, **extra)
        for order in ("contiguous", "zigzag"):
            local = [shard(t, rank, world, order) for t in (q, k, v)]
            mine = {n: shard(t, rank, world, order) for n, t in kw.items()}
            mine.update({n: shard(t, rank, world, order, dim=1) for n, t in extra.items()})
            for fname, fn in fns.items():
                out = fn(*local, "alibi", causal=causal, order=order, **mine)
                results[f"{name}/{fname}/{order}"] = err(out, shard(ref, rank, world, order))

    # the handshake covers the gates: given on one rank only, requiring grad on one only
    q, k, v, g, g_after = data()
    local = [shard(t, rank, world) for t in (q, k, v)]
    mine = shard(g, rank, world)
    for fname, fn in fns.items():
        for what, kw in (
            ("given", {"log_gates": mine if rank == 0 else None}),
            ("grad", {"log_gates": mine.clone().requires_grad_(rank == 1)}),
        ):
            try:
                fn(*local, causal=True, **kw)
                results[f"disagree/{what}/{fname}"] = "no error"
            except posbias.PosBiasError as e:
                results[f"disagree/{what}/{fname}"] = f"{type(e).__name__}: {e}"
        # a positive gate on rank 1: its own error there, a DistributedError on rank 0
        bad = mine if rank == 0 else -mine
        try:
            fn(*local, causal=True, log_gates=bad)
            results[f"bad_gates/{fname}"] = "no error"
        except posbias.PosBiasError as e:
            results[f"bad_gates/{fname}"] = f"{type(e).__name__}: {e}"
    try:
        ring_attention(q[:, :, -1:], *local[1:], causal=True, log_gates=mine)
        results["decode"] = "no error"
    except posbias.PosBiasError as e:
        results["decode"] = f"{type(e).__name__}: {e}"
    dist.barrier()
