"""Shared fixtures: the backends under test and native-array helpers.

``POSBIAS_TEST_BACKENDS=numpy,torch`` restricts the run; a listed backend that
cannot be imported fails the run instead of being skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import posbias
from posbias import testing as pt
from posbias.backends import load

BACKENDS = pt.backends_under_test()
FRAMEWORKS = [b for b in BACKENDS if b != "numpy"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(params=FRAMEWORKS or [pytest.param(None, marks=pytest.mark.skip("numpy only"))])
def framework(request) -> str:
    return request.param


@pytest.fixture
def isolated_registry():
    with pt.isolated_registry():
        yield


def native(backend: str, array) -> object:
    """A NumPy array as a native tensor of ``backend`` (default device)."""
    return load(backend)().from_numpy(np.asarray(array))


def to_np(x) -> np.ndarray:
    return pt.to_numpy(x)


@pytest.fixture
def alibi12():
    return posbias.get("alibi", num_heads=12)
