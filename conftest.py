"""Root pytest configuration: skip doctest collection of adapters whose framework is absent."""

import importlib.util

collect_ignore = ["posbias/__main__.py", "noxfile.py"]
collect_ignore += [
    f"posbias/backends/{name}.py"
    for name in ("torch", "jax", "tensorflow")
    if importlib.util.find_spec(name) is None
]


import pytest  # noqa: E402
from _pytest.doctest import DoctestItem  # noqa: E402


@pytest.fixture(autouse=True)
def _doctests_leave_the_registry_alone(request):
    """Docstring examples that register a bias must not leak it into other tests."""
    if isinstance(request.node, DoctestItem):
        from posbias.testing import isolated_registry

        with isolated_registry():
            yield
    else:
        yield
