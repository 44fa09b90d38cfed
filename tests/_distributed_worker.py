"""One rank of the torch.distributed checks (spawned by tests/test_distributed_torch.py).

Every rank builds the same full-sequence tensors, takes its shard, runs the
distributed function and compares with single-device posbias attention on the
full sequence. Results (max abs errors, caught error messages) go to
``<out>/rank<r>.json``; the test process asserts on them.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

B, H, L, D = 2, 4, 16, 8
TOL = 5e-6


def spawn(worker_main, out, deadline_s: int, world: int = 2) -> list[dict]:
    """Run ``worker_main(rank, world, port, out)`` in ``world`` spawned processes (killed
    after ``deadline_s``) and return each rank's JSON results (a crash fails the test)."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker_main, args=(r, world, port, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(deadline_s)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, f"the ranks did not finish within {deadline_s} s (a collective hung?)"
    results = []
    for r in range(world):
        path = os.path.join(str(out), f"rank{r}.json")
        assert os.path.exists(path), f"rank {r} exited with code {procs[r].exitcode}, no results"
        with open(path) as f:
            results.append(json.load(f))
        assert "crash" not in results[-1], results[-1]["crash"]
    return results


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    run(rank, world, port, out_dir, _checks)


def run(rank: int, world: int, port: int, out_dir: str, checks) -> None:
    """One rank: a gloo process group on loopback, ``checks(rank, world, results)``, the
    results (or the crash) written to ``<out_dir>/rank<rank>.json``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    results: dict[str, object] = {}
    try:
        checks(rank, world, results)
    except Exception:  # report, do not hang the other rank's test
        results["crash"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _checks(rank: int, world: int, results: dict) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    import posbias
    import posbias.torch as pt
    from posbias.torch.distributed import (
        head_parallel_attention,
        layout_positions,
        ring_attention,
        shard,
        traffic,
    )

    def data(kv_heads=2, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
        k, v = torch.randn(2, B, kv_heads, L, D, generator=g, dtype=torch.float64)
        return [t.to(dtype) for t in (q, k, v)]

    def err(a, b):
        return float((a.detach().double() - b.detach().double()).abs().max())

    learnable = pt.PositionalBias("t5", num_heads=H, seed=3)
    biases = {"alibi": "alibi", "t5": "t5", "kerple_log": "kerple_log", "learnable_t5": learnable}
    fns = {"ring": ring_attention, "heads": head_parallel_attention}

    # forward: every bias x causal x layout, grouped-query attention, float32
    q, k, v = data()
    for bname, bias in biases.items():
        for causal in (True, False):
            ref = pt.attention(q, k, v, bias, causal=causal)
            for order in ("contiguous", "zigzag"):
                local = [shard(t, rank, world, order) for t in (q, k, v)]
                for fname, fn in fns.items():
                    with torch.no_grad():
                        out = fn(*local, bias, causal=causal, order=order)
                    key = f"forward/{fname}/{bname}/causal={causal}/{order}"
                    results[key] = err(out, shard(ref, rank, world, order))

    # float64 is exact to rounding; no bias
    q64, k64, v64 = data(dtype=torch.float64)
    ref = pt.attention(q64, k64, v64, None, causal=True)
    local = [shard(t, rank, world) for t in (q64, k64, v64)]
    results["float64/ring"] = err(ring_attention(*local, causal=True), shard(ref, rank, world))

    # explicit positions: the zigzag layout given as positions (masked tiles path)
    pos = layout_positions(L, world, "zigzag")[rank * (L // world) : (rank + 1) * (L // world)]
    ref = pt.attention(q, k, v, "alibi", causal=True)
    local = [shard(t, rank, world, "zigzag") for t in (q, k, v)]
    out = ring_attention(*local, "alibi", causal=True, order="zigzag", q_pos=pos, k_pos=pos)
    results["positions/ring/zigzag"] = err(out, shard(ref, rank, world, "zigzag"))
    # explicit positions are bias positions only, as on one device: shuffled positions
    # (and restarting ones) with causal masking by sequence order give the same answer
    for name, positions in (
        ("shuffled", np.random.default_rng(3).permutation(L)),
        ("restarting", np.concatenate([np.arange(L // 2)] * 2)),
    ):
        ref = pt.attention(q, k, v, "t5", causal=True, q_pos=positions, k_pos=positions)
        local = [shard(t, rank, world) for t in (q, k, v)]
        mine = shard(torch.as_tensor(positions), rank, world, dim=0)
        for fname, fn in fns.items():
            out = fn(*local, "t5", causal=True, q_pos=mine, k_pos=mine)
            results[f"positions/{fname}/{name}"] = err(out, shard(ref, rank, world))

    # explicit bias positions in head-parallel (positions shifted by 100: Toeplitz-invariant
    # for alibi, so compare with FIRE, which depends on the absolute query position)
    shifted = np.arange(L) + 100
    ref = pt.attention(q, k, v, "fire", q_pos=shifted, k_pos=shifted)
    local = [shard(t, rank, world) for t in (q, k, v)]
    mine = shard(torch.as_tensor(shifted), rank, world, dim=0)
    out = head_parallel_attention(*local, "fire", q_pos=mine, k_pos=mine)
    results["positions/heads/fire"] = err(out, shard(ref, rank, world))

    # packed documents: segment ids + per-document positions
    seg = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4] * B)
    doc_pos = torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)])
    ref = pt.attention(q, k, v, "alibi", causal=True, segment_ids=seg, q_pos=doc_pos,
                       k_pos=doc_pos)  # fmt: skip
    local = [shard(t, rank, world) for t in (q, k, v)]
    mine = shard(doc_pos, rank, world, dim=0)
    out = ring_attention(*local, "alibi", causal=True, segment_ids=shard(seg, rank, world, dim=1),
                         q_pos=mine, k_pos=mine)  # fmt: skip
    results["packed/ring"] = err(out, shard(ref, rank, world))

    # decoding: the same new tokens on every rank, the KV cache sharded by sequence
    q, k, v = data()
    for q_len in (1, 3):
        for bname in ("alibi", "t5"):
            for order in ("contiguous", "zigzag"):
                ref = pt.attention(q[:, :, -q_len:], k, v, bname, causal=True)
                cache = [shard(t, rank, world, order) for t in (k, v)]
                out = ring_attention(q[:, :, -q_len:], *cache, bname, causal=True, order=order)
                results[f"decode/{q_len}/{bname}/{order}"] = err(out, ref)

    # key padding: a right-padded batch (bidirectional) and a KV cache with empty slots
    q, k, v = data()
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, -5:] = False
    pos = torch.arange(L)
    for order in ("contiguous", "zigzag"):
        ref = pt.attention(q, k, v, "alibi", key_mask=mask, q_pos=pos, k_pos=pos)
        local = [shard(t, rank, world, order) for t in (q, k, v)]
        out = ring_attention(*local, "alibi", order=order,
                             key_mask=shard(mask, rank, world, order, dim=1))  # fmt: skip
        results[f"padding/ring/{order}"] = err(out, shard(ref, rank, world, order))
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[:, 11:] = False  # 11 cached tokens; the new one sits at position 11
    ref = pt.attention(q[:, :, :1], k, v, "t5", causal=True, key_mask=valid,
                       q_pos=torch.tensor([11]), k_pos=pos, q_offset=11)  # fmt: skip
    cache = [shard(t, rank, world) for t in (k, v)]
    mine = dict(key_mask=shard(valid, rank, world, dim=1), k_pos=shard(pos, rank, world, dim=0))
    out = ring_attention(q[:, :, :1], *cache, "t5", causal=True, q_pos=torch.tensor([11]), **mine)
    results["padding/decode"] = err(out, ref)

    # one meaning of key_mask: left padding, a bias that is not shift-invariant, causal
    q, k, v = data()
    left = torch.ones(B, L, dtype=torch.bool)
    left[0, :5] = False
    left[1, :2] = False
    scaled = posbias.get("alibi_scaled", num_heads=H, train_length=4)
    for order in ("contiguous", "zigzag"):
        ref = pt.attention(q, k, v, scaled, causal=True, key_mask=left)
        local = [shard(t, rank, world, order) for t in (q, k, v)]
        mine = shard(left, rank, world, order, dim=1)
        for fname, fn in fns.items():
            out = fn(*local, scaled, causal=True, order=order, key_mask=mine)
            results[f"key_mask/{fname}/{order}"] = err(out, shard(ref, rank, world, order))
    # decoding against a sharded cache with holes (empty slots): positions from the mask
    hole = torch.ones(B, L, dtype=torch.bool)
    hole[0, 3:6] = False
    hole[1, 9] = False
    for order in ("contiguous", "zigzag"):
        ref = pt.attention(q[:, :, -2:], k, v, scaled, causal=True, key_mask=hole)
        cache = [shard(t, rank, world, order) for t in (k, v)]
        out = ring_attention(q[:, :, -2:], *cache, scaled, causal=True, order=order,
                             key_mask=shard(hole, rank, world, order, dim=1))  # fmt: skip
        results[f"key_mask/decode/{order}"] = err(out, ref)
    try:
        ring_attention(*local, "alibi", key_padding_mask=mine)
        results["key_padding_mask"] = "no error"
    except posbias.PosBiasError as e:
        results["key_padding_mask"] = f"{type(e).__name__}: {e}"

    # the handshake covers everything that changes the answer: bias, scale, implementation
    q, k, v = data()
    local = [shard(t, rank, world) for t in (q, k, v)]
    disagreements = {
        "alibi_vs_none": ("alibi" if rank == 0 else None, {}),
        "alibi_vs_t5": ("alibi" if rank == 0 else "t5", {}),
        "max_bias": (posbias.get("alibi", num_heads=H, max_bias=8.0 if rank == 0 else 4.0), {}),
        "scale": ("alibi", {"scale": 0.5 if rank == 0 else 0.25}),
        "causal": ("alibi", {"causal": rank == 0}),
        # learnable parameters that drifted apart (e.g. no DDP gradient sync)
        "parameter_values": (pt.PositionalBias("t5", num_heads=H, seed=rank), {}),
    }
    for name, (bias, kwargs) in disagreements.items():
        for fname, fn in fns.items():
            try:
                fn(*local, bias, **kwargs)
                results[f"disagree/{name}/{fname}"] = "no error"
            except posbias.PosBiasError as e:
                results[f"disagree/{name}/{fname}"] = f"{type(e).__name__}: {e}"
    try:
        head_parallel_attention(*local, "alibi", implementation="reference" if rank else "auto")
        results["disagree/implementation/heads"] = "no error"
    except posbias.PosBiasError as e:
        results["disagree/implementation/heads"] = f"{type(e).__name__}: {e}"
    # a bias that is invalid on one rank: that rank raises its own error, the other a
    # DistributedError; nobody waits in the ring
    for fname, fn in fns.items():
        wrong = posbias.get("alibi", num_heads=H if rank == 0 else 2 * H)
        try:
            fn(*local, wrong, causal=True)
            results[f"bad_bias/{fname}"] = "no error"
        except posbias.PosBiasError as e:
            results[f"bad_bias/{fname}"] = f"{type(e).__name__}: {e}"

    # gradients of q, k, v and of the learnable bias (all-reduced over ranks)
    for fname, fn in fns.items():
        for order in ("contiguous", "zigzag"):
            q, k, v = data(seed=1)
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            learnable.zero_grad()
            (pt.attention(*full, learnable, causal=True) ** 2).sum().backward()
            expected = [p.grad.clone() for p in learnable.parameters()]
            learnable.zero_grad()
            local = [shard(t, rank, world, order).requires_grad_() for t in (q, k, v)]
            (fn(*local, learnable, causal=True, order=order) ** 2).sum().backward()
            got = [p.grad.clone() for p in learnable.parameters()]
            for g in got:
                dist.all_reduce(g)
            key = f"grad/{fname}/{order}"
            results[key + "/qkv"] = max(
                err(a.grad, shard(b.grad, rank, world, order))
                for a, b in zip(local, full, strict=True)
            )
            results[key + "/bias_params"] = max(
                err(a, b) / max(1.0, float(b.abs().max()))
                for a, b in zip(got, expected, strict=True)
            )

    # communication volume per call, bytes this rank sent (the benchmark reads the same)
    q, k, v = data(kv_heads=H)
    local = [shard(t, rank, world) for t in (q, k, v)]
    traffic(reset=True)
    ring_attention(*local, "alibi", causal=True)
    results["traffic/ring"] = traffic(reset=True)
    head_parallel_attention(*local, "alibi", causal=True)
    results["traffic/heads"] = traffic(reset=True)

    # bad input: detected on every rank, no hang
    q, k, v = data()
    local = [shard(t, rank, world) for t in (q, k, v)]
    if rank == 1:
        local = [torch.cat([t, t[:, :, :2]], dim=2) for t in local]  # a longer shard
    for fname, fn in fns.items():
        try:
            fn(*local, "alibi", causal=True)
            results[f"mismatch/{fname}"] = "no error"
        except posbias.DistributedError as e:
            results[f"mismatch/{fname}"] = str(e)
    local = [shard(t, rank, world) for t in (q, k, v)]
    local[0].requires_grad_(rank == 1)  # only rank 1 would run a backward pass
    try:
        ring_attention(*local, "alibi")
        results["grad_mismatch"] = "no error"
    except posbias.DistributedError as e:
        results["grad_mismatch"] = str(e)
    local = [shard(t, rank, world) for t in (q, k, v)]
    bad = torch.arange(L // world + (rank == 1))  # rank 1's q_pos has one entry too many
    try:
        ring_attention(*local, "alibi", causal=True, q_pos=bad, k_pos=bad)
        results["bad_local_input"] = "no error"
    except posbias.PosBiasError as e:
        results["bad_local_input"] = f"{type(e).__name__}: {e}"
    q3 = torch.randn(B, 3, L // world, D)
    try:
        head_parallel_attention(q3, q3, q3, "alibi")
        results["heads_not_divisible"] = "no error"
    except posbias.InvalidArgumentError as e:
        results["heads_not_divisible"] = str(e)
    dist.barrier()
