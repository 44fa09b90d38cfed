"""Smoke run of every benchmark path (tiny sizes: correctness, not speed).

``posbias bench`` without ``--smoke`` is the real measurement (docs/benchmarks.md).
"""

from __future__ import annotations

import math

import pytest

from conftest import FRAMEWORKS
from posbias import bench

NEEDS = {
    "1": "torch",
    "2": "torch",
    "3": "torch",
    "4a": "torch",
    "4b": "torch",
    "5": "jax",
    "5m": "jax",
    "6": "tensorflow",
    "7": "torch",
    "8": "torch",
    "9a": "numpy",
    "9b": "torch",
    "10a": "torch",
    "10b": "torch",
    "10c": "torch",
    "10f": "torch",
    "10m": "torch",
    "11": "jax",
    "11m": "jax",
    "12": "tensorflow",
    "13a": "torch",
    "13b": "torch",
    "13m": "torch",
    "13c": "jax",
}


@pytest.mark.parametrize("key", list(NEEDS))
def test_benchmark_path_runs_and_is_correct(key):
    if NEEDS[key] != "numpy" and NEEDS[key] not in FRAMEWORKS:
        pytest.skip(f"{NEEDS[key]} not under test")
    (result,) = [r for k, r in bench.run(smoke=True, only=[key]) if k == key]
    assert math.isfinite(result.ratio) and result.ratio > 0
    if "err" in result.note:  # every timed path is checked against a reference
        err = float(result.note.split("err ")[-1].split()[0])
        assert err < 1e-5, result.note


def test_table_lists_environment():
    ((key, result),) = bench.run(smoke=True, only=["9a"])
    table = bench.format_table([(key, result)], smoke=True)
    assert "| 9a |" in table and "numpy" in table and "cpus" in table
