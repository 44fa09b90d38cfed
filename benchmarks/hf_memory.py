"""Peak memory of one forward pass of Hugging Face models: patched with posbias vs as shipped.

Run: python benchmarks/hf_memory.py [--length 8192] [--models bloom,mpt,falcon,t5]

Each (model, variant) runs in a fresh process: tiny random-config models
(2 layers, 4 heads of 32, nothing downloaded), one sequence of ``--length``
tokens, ``torch.no_grad()``. Peak memory is the peak resident size during the
forward pass minus the resident size just before it (model and inputs exist),
as ``posbias bench`` measures it. The baseline is the model's own attention:
eager for BLOOM, MPT and T5 (the encoder, bidirectional), SDPA for Falcon (its
default; it still adds an (B, H, L, L) ALiBi mask). The ratio is baseline /
posbias, both measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

GB = 2**30
HEADS, HEAD_DIM, LAYERS, VOCAB = 4, 32, 2, 256


def _model(name: str, baseline: bool):
    import torch
    import transformers

    torch.manual_seed(0)
    width = HEADS * HEAD_DIM
    if name == "bloom":
        config = transformers.BloomConfig(
            vocab_size=VOCAB, hidden_size=width, n_layer=LAYERS, n_head=HEADS
        )
        cls, implementation = transformers.BloomForCausalLM, "eager"
    elif name == "mpt":
        config = transformers.MptConfig(
            vocab_size=VOCAB, d_model=width, n_layers=LAYERS, n_heads=HEADS, max_seq_len=1 << 16
        )
        cls, implementation = transformers.MptForCausalLM, "eager"
    elif name == "falcon":
        config = transformers.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=width,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            alibi=True,
        )
        cls, implementation = transformers.FalconForCausalLM, "sdpa"
    else:
        config = transformers.T5Config(
            vocab_size=VOCAB, d_model=width, d_kv=HEAD_DIM, d_ff=2 * width, num_layers=LAYERS,
            num_heads=HEADS, dropout_rate=0.0,
        )  # fmt: skip
        cls, implementation = transformers.T5EncoderModel, "eager"
    model = cls._from_config(config, attn_implementation=implementation).eval()
    if not baseline:
        import posbias.transformers

        posbias.transformers.patch(model)
    return model, implementation


def child(name: str, length: int, baseline: bool) -> dict:
    """In a fresh process: peak RSS growth and time of one forward pass."""
    import torch

    from posbias.bench import _peak_rss, _rss_now

    model, implementation = _model(name, baseline)
    ids = torch.randint(3, VOCAB, (1, length))
    with torch.no_grad():
        model(ids[:, :16])  # warm-up: lazy imports and caches
        before = _rss_now()
        start = time.perf_counter()
        model(ids)
        seconds = time.perf_counter() - start
    peak = max(0, _peak_rss() - before)
    return {"peak": peak, "seconds": seconds, "implementation": implementation}


def run(name: str, length: int, baseline: bool) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import hf_memory as h; "
        f"print(json.dumps(h.child({name!r}, {length}, {baseline})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        which = "baseline" if baseline else "posbias"
        raise RuntimeError(f"{name} ({which}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--models", default="bloom,mpt,falcon,t5")
    args = parser.parse_args()
    shape = f"{LAYERS} layers, {HEADS} heads of {HEAD_DIM}"
    print(f"one forward pass, 1 × {args.length} tokens, {shape}")
    print("| model | baseline | baseline peak | posbias peak | ratio | baseline s | posbias s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        base, ours = run(name, args.length, True), run(name, args.length, False)
        ratio = base["peak"] / max(ours["peak"], 1)
        print(
            f"| {name} | {base['implementation']} | {base['peak'] / GB:.2f} GiB | "
            f"{ours['peak'] / GB:.3f} GiB | {ratio:.0f}× | {base['seconds']:.2f} | "
            f"{ours['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
