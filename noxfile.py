"""nox sessions; the same ids run locally and in CI (.ci/run).

    nox -s lint docs tests # the whole test suite and the strict docs build (what CI runs)
    nox -s parity          # the cross-framework parity report, all frameworks together
    nox -s "tests(backend='all')" -- -k alibi   # arguments go to pytest
    nox -s "keras(backend='jax')"                # posbias.keras on one Keras backend

``tests(backend='all')`` installs all four frameworks in one environment and
runs the whole suite (on every CPU with pytest-xdist). Each other
``tests(backend=...)`` session installs only that framework's extra and runs
tests/test_extras.py and that framework module's docstring examples: proof
that the extra installs and works alone, without running the suite again.

Environments are kept between runs (``.nox/``); a session reinstalls only when
pyproject.toml, ci/constraints.txt or its package list changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nox

nox.options.sessions = ["lint", "docs", "tests", "keras"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "ci/constraints.txt")
FRAMEWORKS = ("torch", "jax", "tensorflow")
BACKENDS = ("numpy", *FRAMEWORKS, "all")
MODULES = {"numpy": "posbias/numpy.py", "torch": "posbias/torch", "jax": "posbias/jax"}
MODULES["tensorflow"] = "posbias/tensorflow.py"
ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def _install(session: nox.Session, *packages: str) -> None:
    """pip install with its progress shown, skipped when nothing it depends on changed."""
    key = hashlib.sha256(
        "\n".join(
            [*packages, Path("pyproject.toml").read_text(), Path("ci/constraints.txt").read_text()]
        ).encode()
    ).hexdigest()
    stamp = Path(session.virtualenv.location) / ".posbias-installed"
    if stamp.exists() and stamp.read_text() == key:
        session.log("environment up to date (pyproject.toml and constraints unchanged)")
        return
    session.install(*CONSTRAINTS, *packages, silent=False)
    stamp.write_text(key)


def _extras(backend: str) -> str:
    if backend == "numpy":
        return "test"
    if backend == "all":
        return "all,test,compat"  # also the libraries the equivalence tests compare with
    return f"{backend},test"


def _under_test(backend: str) -> str:
    if backend == "all":
        return ",".join(("numpy", *FRAMEWORKS))
    return "numpy" if backend == "numpy" else f"numpy,{backend}"


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """pytest: the whole suite with every framework, or one extra alone."""
    packages = ["-e", f".[{_extras(backend)}]"]
    if backend == "all":  # the example plugin package, tested through its entry point
        packages.append("./examples/posbias-plugin-example")
    _install(session, *packages)
    if backend == "all":
        args = ["-n", "auto", "--durations=15"]  # pytest-xdist: one worker per CPU
    else:
        args = ["tests/test_extras.py", MODULES[backend]]
    session.run(
        "pytest",
        *args,
        *session.posargs,
        env={**ENV, "POSBIAS_TEST_BACKENDS": _under_test(backend)},
    )


@nox.session
def parity(session: nox.Session) -> None:
    """The main job: ``posbias parity`` with all four frameworks installed."""
    _install(session, "-e", ".[all]")
    cache = Path(".nox", "compile-cache").resolve()
    session.run("posbias", "parity", "--compile-cache", str(cache), *session.posargs, env=ENV)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the MkDocs site strictly (broken links, references or includes fail)."""
    _install(session, "-e", ".[all,docs]")  # the API reference inspects the framework modules
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        "site",
        *session.posargs,
        env={**ENV, "NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check; import-linter keeps the package's layers (pyproject.toml)."""
    _install(session, "ruff>=0.6", "import-linter>=2.1")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")


@nox.session
def bench(session: nox.Session) -> None:
    """The attention benchmarks (docs/benchmarks.md); ``-- --smoke`` for a quick check."""
    _install(session, "-e", ".[all,plot]")
    session.run("posbias", "bench", *session.posargs, env=ENV)


KERAS_BACKENDS = ("tensorflow", "jax", "torch")


@nox.session
@nox.parametrize("backend", KERAS_BACKENDS)
def keras(session: nox.Session, backend: str) -> None:
    """posbias.keras on one Keras backend: tests/test_keras.py and its docstring examples.

    Keras reads ``KERAS_BACKEND`` at import, so each backend runs in its own session
    (``tests(backend='all')`` runs the same tests on the TensorFlow backend and loads
    a ``.keras`` file saved there under JAX and PyTorch).
    """
    extras = "tensorflow,test" if backend == "tensorflow" else f"{backend},keras,test"
    _install(session, "-e", f".[{extras}]")
    session.run(
        "pytest",
        "tests/test_keras.py",
        "posbias/keras",
        *session.posargs,
        env={**ENV, "KERAS_BACKEND": backend, "POSBIAS_TEST_BACKENDS": f"numpy,{backend}"},
    )
