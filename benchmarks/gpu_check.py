# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
"""GPU checks of the fast attention paths (run on a machine with CUDA).

    PYTHONPATH=. python benchmarks/gpu_check.py

For each available framework on the GPU: every implementation against the
float32 reference (relative error), and time ratios against the framework's own
unbiased attention measured in the same run; PyTorch training steps (forward +
backward, learnable biases included) against SDPA causal training. TensorFlow
is skipped when absent. Not part of CI (no GPU there).
"""

from __future__ import annotations

import numpy as np

import posbias
from posbias.bench import best_time


def best(fn, repeats=10):
    return best_time(fn, repeats)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def torch_checks():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import posbias.torch as pt
    from posbias.torch import _sdpa

    if not torch.cuda.is_available():
        print("torch: no CUDA")
        return
    dev = "cuda"
    print("torch", torch.__version__, torch.cuda.get_device_name())
    sync = torch.cuda.synchronize
    for length in (2048, 8192):
        q, k, v = (torch.randn(1, 16, length, 64, device=dev) for _ in range(3))
        for bias in ("alibi", "t5"):
            spec = posbias.get(bias, num_heads=16)
            for causal in (True, False):
                out = pt.attention(q, k, v, spec, causal=causal)
                rows = slice(0, 256)
                ref = pt.attention(
                    q[:, :, rows], k, v, spec, causal=causal, q_offset=0, implementation="reference"
                )
                err = rel(out[:, :, rows].cpu(), ref.cpu())

                def ours():
                    pt.attention(q, k, v, spec, causal=causal)
                    sync()

                def base():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    sync()

                def full_mask():
                    F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
                    sync()

                dense = spec.bias(length, length, backend="torch", device=dev)
                if causal:
                    future = torch.ones(length, length, dtype=torch.bool, device=dev).triu(1)
                    dense = dense.masked_fill(future, float("-inf"))
                t_base = best(base)
                t_ours = best(ours)
                _sdpa.CONTIGUOUS_MASK_ON_CUDA = False
                t_view = best(ours)
                _sdpa.CONTIGUOUS_MASK_ON_CUDA = True
                t_dense = best(full_mask)
                print(
                    f"  L={length} {bias:5s} causal={causal!s:5s} err={err:.1e} "
                    f"ratio vs SDPA without bias: posbias {t_ours / t_base:.2f}, "
                    f"posbias strided-view mask {t_view / t_base:.2f}, "
                    f"SDPA+materialised mask {t_dense / t_base:.2f}"
                )
        # FlexAttention compiled with posbias score_mod/mask_mod
        spec = posbias.get("alibi", num_heads=16)
        mask = create_block_mask(
            pt.mask_mod(causal=True, q_len=length, k_len=length),
            1,
            None,
            length,
            length,
            device=dev,
        )
        flex = torch.compile(flex_attention)
        out = flex(q, k, v, score_mod=spec.score_mod(length, length, device=dev), block_mask=mask)
        ref = pt.attention(q, k, v, spec, causal=True)
        flex_t = best(
            lambda: (
                flex(
                    q, k, v, score_mod=spec.score_mod(length, length, device=dev), block_mask=mask
                ),
                sync(),
            )
        )
        base_t = best(lambda: (F.scaled_dot_product_attention(q, k, v, is_causal=True), sync()))
        print(
            f"  L={length} flex(score_mod) err={rel(out.cpu(), ref.cpu()):.1e} "
            f"ratio vs SDPA causal={flex_t / base_t:.2f}"
        )
    try:
        import flash_attn  # noqa: F401

        print("  flash_attn installed")
    except ImportError:
        print("  flash_attn not installed: the flash_attn path was not exercised")


def torch_training_checks():
    """Training steps (forward + backward) on CUDA: posbias's blockwise backward for
    learnable biases, FlashAttention's alibi_slopes for fixed ALiBi in bf16 (when
    installed), against SDPA causal training; gradients against the reference."""
    import torch
    import torch.nn.functional as F

    import posbias.torch as pt

    if not torch.cuda.is_available():
        print("torch training: no CUDA")
        return
    dev, sync = "cuda", torch.cuda.synchronize
    for dtype in (torch.float32, torch.bfloat16):
        for length in (2048, 8192):
            leaves = [
                torch.randn(1, 16, length, 64, device=dev, dtype=dtype).requires_grad_()
                for _ in range(3)
            ]
            for bias, learnable in (
                ("alibi", False),
                ("t5", True),
                ("alibi_learned", True),
                ("kerple_log", True),
                ("fire", True),
            ):
                spec = posbias.get(bias, num_heads=16)
                module = pt.PositionalBias(spec).to(dev) if learnable else spec
                params = list(module.parameters()) if learnable else []

                def step(impl, module=module, params=params):
                    for t in leaves + params:
                        t.grad = None
                    out = pt.attention(*leaves, module, causal=True, implementation=impl)
                    out.float().square().sum().backward()
                    sync()
                    return [t.grad.float().clone() for t in leaves + params]

                def base():
                    for t in leaves:
                        t.grad = None
                    F.scaled_dot_product_attention(
                        *leaves, is_causal=True
                    ).float().square().sum().backward()
                    sync()

                grads = step("auto")
                note = ""
                if length == 2048:
                    ref = step("reference")
                    err = max(rel(a.cpu(), b.cpu()) for a, b in zip(grads, ref, strict=True))
                    note = f"grad err vs reference={err:.1e} "
                ratio = best(lambda: step("auto"), 5) / best(base, 5)
                print(
                    f"  train {str(dtype)[6:]} L={length} {'learnable' if learnable else 'fixed'} "
                    f"{bias}: {note}ratio vs SDPA causal train={ratio:.2f}"
                )


def jax_checks():
    import jax
    import jax.numpy as jnp

    import posbias.jax as pj

    if jax.default_backend() != "gpu":
        print("jax: no GPU")
        return
    print("jax", jax.__version__, jax.devices()[0].device_kind)
    for length in (2048, 8192):
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q, k, v = (jax.random.normal(key, (1, length, 16, 64)) for key in keys)
        spec = posbias.get("alibi", num_heads=16)
        ours = jax.jit(lambda q, k, v: pj.attention(q, k, v, spec, causal=True))
        base = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
        ref = pj.attention(
            q[:, :256], k[:, :256], v[:, :256], spec, causal=True, implementation="reference"
        )
        err = rel(ours(q, k, v)[:, :256], ref)
        ratio = best(lambda: ours(q, k, v).block_until_ready()) / best(
            lambda: base(q, k, v).block_until_ready()
        )
        print(
            f"  L={length} blockwise fp32 err={err:.1e} ratio vs dot_product_attention={ratio:.2f}"
        )
        qb, kb, vb = (t.astype(jnp.bfloat16) for t in (q, k, v))
        cud = jax.jit(
            lambda q, k, v: pj.attention(q, k, v, spec, causal=True, implementation="cudnn")
        )
        try:
            out = cud(qb, kb, vb)
        except Exception as exc:  # report, do not hide
            print(f"  L={length} cudnn FAILED: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        refb = pj.attention(qb, kb, vb, spec, causal=True, implementation="blockwise")
        err = rel(out.astype(jnp.float32), refb.astype(jnp.float32))
        base_b = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"
            )
        )
        ratio = best(lambda: cud(qb, kb, vb).block_until_ready()) / best(
            lambda: base_b(qb, kb, vb).block_until_ready()
        )
        print(
            f"  L={length} cudnn bf16 err vs blockwise={err:.1e} "
            f"ratio vs cudnn without bias={ratio:.2f}"
        )


if __name__ == "__main__":
    for check in (torch_checks, torch_training_checks, jax_checks):
        try:
            check()
        except ImportError as exc:
            print(f"{check.__name__}: skipped ({exc})")
