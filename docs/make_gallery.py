"""Regenerate docs/gallery/NAME.png for every registered bias.

    python docs/make_gallery.py

Uses posbias.plot (matplotlib); 4 heads, length 32 (2-D biases: a 6x6 grid).
"""

from pathlib import Path

import posbias
from posbias.plot import plot_bias

OPTIONS = {"swin": {"window": (6, 6)}, "swin_v2_cpb": {"window": (6, 6)}}


def main() -> None:
    out = Path(__file__).parent / "gallery"
    out.mkdir(exist_ok=True)
    for name in posbias.list_biases():
        spec = posbias.get(name, num_heads=4, **OPTIONS.get(name, {}))
        length = 36 if spec.position_dims == 2 else 32
        plot_bias(spec, length=length, path=out / f"{name.replace('/', '_')}.png")
        print("wrote", out / f"{name}.png")


if __name__ == "__main__":
    main()
