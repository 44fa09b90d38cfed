"""MkDocs hooks: generate the gallery (one figure per registered bias) and the
concept pictures at build time, so no figure is checked in by hand.

Runs in ``on_pre_build``; writes ``docs/gallery/*.png`` and ``docs/gallery.md``
(both ignored by git). Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def _load_make_gallery():
    spec = importlib.util.spec_from_file_location("make_gallery", DOCS / "make_gallery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_pre_build(config, **kwargs) -> None:
    make_gallery = _load_make_gallery()
    names = make_gallery.main(quiet=True)
    make_gallery.concept_figures()
    make_gallery.gates_figure()
    lines = [
        "# Gallery",
        "",
        "Every registered bias, 4 heads, drawn by `posbias plot NAME` at docs build",
        "time (rows: queries, columns: keys; 2-D biases: a 6×6 grid of tokens).",
        "",
    ]
    for name in names:
        lines += [f"## `{name}`", "", f"![{name}](gallery/{make_gallery.file_name(name)})", ""]
    (DOCS / "gallery.md").write_text("\n".join(lines))
