"""Regenerate docs/gallery/NAME.png for every registered bias.

    python docs/make_gallery.py

Uses posbias.plot (matplotlib); 4 heads, length 32 (2-D biases: a 6x6 grid).
The docs build runs it (docs/hooks.py); the figures are not checked in.
"""

from pathlib import Path

import posbias
from posbias.plot import plot_bias

OPTIONS = {"swin": {"window": (6, 6)}, "swin_v2_cpb": {"window": (6, 6)}}


OUT = Path(__file__).parent / "gallery"


def file_name(name: str) -> str:
    return f"{name.replace('/', '_')}.png"


def main(quiet: bool = False) -> list[str]:
    """Draw every registered bias; returns the names drawn."""
    OUT.mkdir(exist_ok=True)
    names = posbias.list_biases()
    for name in names:
        spec = posbias.get(name, num_heads=4, **OPTIONS.get(name, {}))
        length = 36 if spec.position_dims == 2 else 32
        plot_bias(spec, length=length, path=OUT / file_name(name))
        if not quiet:
            print("wrote", OUT / file_name(name))
    return names


def concept_figures() -> None:
    """The pictures of docs/contract.md: bottom-right alignment and the slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = posbias.get("alibi", num_heads=8)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    panels = ((10, "Lq = Lk = 10"), (4, "Lq = 4, Lk = 10 (decoding)"))
    for ax, (q_len, title) in zip(axes, panels, strict=True):
        values = spec.bias(q_len, 10, heads=[2])[0]
        image = ax.imshow(values, cmap="viridis", aspect="equal")
        ax.set_title(title)
        ax.set_xlabel("key j")
        ax.set_ylabel("query row")
        ax.set_yticks(range(q_len), [f"i={10 - q_len + r}" for r in range(q_len)])
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle("ALiBi head 2: bottom-right alignment, the last query sits on the last key")
    fig.tight_layout()
    fig.savefig(OUT / "concept_alignment.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    for heads in (8, 12, 16):
        ax.plot(
            range(heads),
            posbias.get("alibi", num_heads=heads).slopes,
            "o-",
            label=f"H = {heads} (paper rule)",
        )
    geo = posbias.get("alibi", num_heads=12, schedule="geometric").slopes
    ax.plot(range(12), geo, "x--", label="H = 12 (naive geometric rule)")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("global head index h")
    ax.set_ylabel("slope m_h")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "concept_slopes.png", dpi=100)
    plt.close(fig)


def gates_figure() -> None:
    """docs/gates.md: log-gates of one sequence, the bias they make, ALiBi beside it."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    length = 32
    g = np.full(length, -0.05)
    g[12] = -3.0  # a token that closes the gate: what came before it fades
    g[24] = -1.0
    # the bias posbias adds, read from one attention problem's tile (rows: queries)
    from posbias._core import problem
    from posbias.backends.numpy import NumpyBackend

    xp = NumpyBackend(compute_dtype="float64")
    z = np.zeros((1, 1, length, 1))
    p = problem.prepare(xp, z, z, z, causal=True, log_gates=g[None, None])
    gate = np.where(
        np.tril(np.ones((length, length), bool)), p.bias_tile(0, length, length)[0, 0], np.nan
    )
    alibi = posbias.get("alibi", num_heads=8).bias(length, length, heads=[0])[0]
    alibi = np.where(np.tril(np.ones((length, length), bool)), alibi, np.nan)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].bar(range(length), g, color="tab:blue")
    axes[0].set_title("log-gates g[s] of one head")
    axes[0].set_xlabel("slot s")
    for ax, values, title in (
        (axes[1], gate, "log_gates bias: Σ g[j+1..i]"),
        (axes[2], alibi, "ALiBi head 0 (fixed slope)"),
    ):
        image = ax.imshow(values, cmap="viridis", interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Forget gates: each token chooses its slope (slot 12 closes the gate)")
    fig.tight_layout()
    fig.savefig(OUT / "concept_gates.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
    concept_figures()
    gates_figure()
