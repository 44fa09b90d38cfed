"""Root pytest configuration.

Doctests are collected from the package; modules of frameworks that are not
installed are skipped (each nox session installs one framework only).

JAX runs on 4 virtual CPU devices (``--xla_force_host_platform_device_count``)
so that the sharded-attention tests have a mesh; XLA reads the flag when JAX
starts, so it is set here, before anything imports JAX.
"""

import importlib.util
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import pytest
from _pytest.doctest import DoctestItem

_MODULES = {
    "torch": ["posbias/backends/torch.py", "posbias/torch"],
    "jax": ["posbias/backends/jax.py", "posbias/jax"],
    "tensorflow": ["posbias/backends/tensorflow.py", "posbias/tensorflow.py"],
}

collect_ignore = ["posbias/__main__.py", "noxfile.py"]
for _framework, _paths in _MODULES.items():
    if importlib.util.find_spec(_framework) is None:
        collect_ignore += _paths
# posbias.keras needs Keras and the framework of its backend (KERAS_BACKEND, default TensorFlow)
_KERAS_BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
if importlib.util.find_spec("keras") is None or importlib.util.find_spec(_KERAS_BACKEND) is None:
    collect_ignore.append("posbias/keras")
if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
    collect_ignore.append("posbias/transformers")


@pytest.fixture(autouse=True)
def _doctests_leave_the_registry_alone(request):
    """Docstring examples that register a bias must not leak it into other tests."""
    if isinstance(request.node, DoctestItem):
        from posbias.testing import isolated_registry

        with isolated_registry():
            yield
    else:
        yield
