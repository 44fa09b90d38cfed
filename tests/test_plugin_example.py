"""The example plugin package (examples/posbias-plugin-example) end to end:
found through its entry point, passing the parity harness, running attention.
Skipped when the example package is not installed (``tests(all)`` installs it).
"""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest

import posbias
import posbias.numpy
import posbias.testing as pt
from conftest import BACKENDS

pytestmark = pytest.mark.skipif(
    not any(
        e.name == "example/linear_window" for e in metadata.entry_points(group="posbias.biases")
    ),
    reason="examples/posbias-plugin-example is not installed",
)


def test_found_through_the_entry_point_without_import():
    assert "example/linear_window" in posbias.list_biases()
    spec = posbias.get("example/linear_window", num_heads=2, window=1)
    assert type(spec).__module__ == "posbias_plugin_example"
    np.testing.assert_array_equal(
        spec.bias(3, 3)[0], [[0.0, -0.5, -10.0], [-0.5, 0.0, -0.5], [-10.0, -0.5, 0.0]]
    )


def test_passes_the_parity_harness():
    cells = pt.assert_parity(posbias.get("example/linear_window", num_heads=4))
    assert {c.backend for c in cells} == set(BACKENDS)


def test_runs_in_attention_and_round_trips_its_config():
    spec = posbias.get("example/linear_window", num_heads=4, window=2)
    assert posbias.from_config(spec.to_config()) == spec
    q = np.random.default_rng(0).standard_normal((1, 4, 6, 8))
    out = posbias.numpy.attention(q, q, q, spec, causal=True)
    assert out.shape == q.shape and np.isfinite(out).all()
