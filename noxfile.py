"""nox sessions; the same ids run locally and in CI (.ci/run).

    nox -s lint docs tests # the whole test suite and the strict docs build (what CI runs)
    nox -s parity          # the cross-framework parity report, all frameworks together
    nox -s "tests(backend='torch')" -- -k alibi   # one backend alone; args go to pytest

Each ``tests(backend=...)`` session installs only that framework's extra, which
proves the extra works alone; ``tests(backend='all')`` installs all four in one
environment for the cross-framework checks.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "docs", "tests"]
nox.options.reuse_existing_virtualenvs = False

CONSTRAINTS = ("-c", "ci/constraints.txt")
FRAMEWORKS = ("torch", "jax", "tensorflow")
BACKENDS = ("numpy", *FRAMEWORKS, "all")


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
    """pytest with one backend's extra installed (or all of them)."""
    packages = [f".[{_extras(backend)}]"]
    if backend == "all":  # the example plugin package, tested through its entry point
        packages.append("./examples/posbias-plugin-example")
    session.install(*CONSTRAINTS, *packages)
    session.run(
        "pytest",
        *session.posargs,
        env={"POSBIAS_TEST_BACKENDS": _under_test(backend), "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


@nox.session
def parity(session: nox.Session) -> None:
    """The main job: ``posbias parity`` with all four frameworks installed."""
    session.install(*CONSTRAINTS, ".[all]")
    session.run("posbias", "parity", *session.posargs, env={"TF_CPP_MIN_LOG_LEVEL": "2"})


@nox.session
def docs(session: nox.Session) -> None:
    """Build the MkDocs site strictly (broken links or references fail); gallery included."""
    session.install(*CONSTRAINTS, ".[docs]")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        "site",
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check; import-linter keeps the package's layers (pyproject.toml)."""
    session.install("ruff>=0.6", "import-linter>=2.1")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")


@nox.session
def bench(session: nox.Session) -> None:
    """The attention benchmarks (docs/benchmarks.md); ``-- --smoke`` for a quick check."""
    session.install(*CONSTRAINTS, ".[all,plot]")
    session.run("posbias", "bench", *session.posargs, env={"TF_CPP_MIN_LOG_LEVEL": "2"})
