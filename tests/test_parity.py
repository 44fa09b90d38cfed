"""The parity harness (posbias.testing) and the parity matrix for every registered bias."""

import numpy as np
import pytest

import posbias
from conftest import BACKENDS
from posbias import testing as pt


@pytest.mark.parametrize("name", posbias.list_biases())
def test_registered_variant_parity(name, backend):
    cells = pt.assert_parity(name, backends=[backend])
    assert all(c.checks > 0 for c in cells)
    assert all(c.negative_zeros == 0 and c.tolerance_used <= 1 for c in cells)
    if posbias.registered()[name].bit_identical:  # closed form: bit-identical everywhere
        assert all(c.tiles_exact for c in cells)
        if backend != "numpy":
            assert all(c.bitwise for c in cells)


def test_jitted_and_eager_jax_cells_agree():
    """The jitted program checks exactly what the op-by-op evaluation checks."""
    if "jax" not in BACKENDS:
        pytest.skip("needs JAX")
    specs = [posbias.get("alibi", num_heads=2), posbias.get("t5", num_heads=2)]
    for spec in specs:
        jitted = pt.check_cell([spec], "jax", "bfloat16", compiled=True)
        eager = pt.check_cell([spec], "jax", "bfloat16")
        assert jitted.passed and eager.passed
        assert (jitted.checks, jitted.max_abs_error, jitted.bitwise, jitted.tiles_exact) == (
            eager.checks,
            eager.max_abs_error,
            eager.bitwise,
            eager.tiles_exact,
        )


def test_parallel_run_keeps_the_order(isolated_registry):
    posbias.register("myorg/linear_window")(LinearWindow)
    names = ["alibi", "myorg/linear_window"]
    serial = pt.run_parity(names, head_counts=[3], dtypes=["float32"])
    threaded = pt.run_parity(names, head_counts=[3], dtypes=["float32"], jobs=2)
    key = [(c.variant, c.backend, c.dtype, c.checks, c.max_abs_error) for c in serial]
    assert key == [(c.variant, c.backend, c.dtype, c.checks, c.max_abs_error) for c in threaded]
    assert [(c.variant, c.backend) for c in serial] == [(n, b) for n in names for b in BACKENDS]


def test_cases_cover_the_contract():
    labels = {c.label for c in pt.default_cases(12)}
    assert {
        "1x1",
        "q<k bottom-right",
        "q>k bottom-right",
        "offsets",
        "batched positions",
        "batched offsets",
        "head subset",
        "heads reordered",
    } <= labels


class LinearWindow(posbias.BiasSpec):
    """docs/extending.md's variant (also examples/posbias-plugin-example)."""

    toeplitz = True
    window: int = 4
    penalty: float = -10.0

    def compute(self, xp, q_pos, k_pos, heads, params):
        m = xp.constant(1.0 / (heads + 2.0))[:, None, None]
        distance = xp.abs(k_pos - q_pos)[..., None, :, :]
        inside = m * xp.float(-distance)
        return xp.where(distance <= self.window, inside, xp.constant(np.float64(self.penalty)))


def test_user_variant_runs_on_every_backend(isolated_registry):
    posbias.register("myorg/linear_window")(LinearWindow)
    spec = posbias.get("myorg/linear_window", num_heads=3, window=2)
    cells = pt.assert_parity(spec)
    assert {c.backend for c in cells} == set(BACKENDS)
    assert posbias.from_config(spec.to_config()) == spec
    matrix = pt.run_parity(["myorg/linear_window"], head_counts=[1, 3])
    assert all(c.passed for c in matrix)


class Drifting(posbias.BiasSpec):
    """A deliberately wrong variant: off by a little on every backend but NumPy."""

    def compute(self, xp, q_pos, k_pos, heads, params):
        values = (
            xp.float(-xp.abs(k_pos - q_pos))[..., None, :, :]
            * xp.constant(np.ones(len(heads)))[:, None, None]
        )
        return values if xp.name == "numpy" else values * 1.001


def test_harness_catches_a_wrong_backend(isolated_registry):
    if BACKENDS == ["numpy"]:
        pytest.skip("needs a framework backend")
    posbias.register("test/drifting")(Drifting)
    with pytest.raises(AssertionError, match="exceeds"):
        pt.assert_parity("test/drifting")
    cells = pt.run_parity(["test/drifting"], dtypes=["float32"], head_counts=[2])
    assert [c.passed for c in cells] == [b == "numpy" for b in BACKENDS]


class Untiled(posbias.BiasSpec):
    """Wrong on purpose: depends on the tile's own length, so tiles do not concatenate."""

    def compute(self, xp, q_pos, k_pos, heads, params):
        lk = xp.shape(k_pos)[-1]
        d = xp.float(-xp.abs(k_pos - q_pos))[..., None, :, :]
        return d * xp.constant(np.full(len(heads), 1.0 / lk))[:, None, None]


def test_harness_catches_tiles_that_do_not_concatenate():
    spec = Untiled(num_heads=2)
    assert pt.tile_mismatch(spec, "numpy", q_len=5, k_len=6, q_split=2, k_split=3, h_split=1) > 0
    with pytest.raises(AssertionError, match="tiles differ"):
        pt.assert_parity(spec, backends=["numpy"])


def test_backends_env_var(monkeypatch):
    monkeypatch.setenv(pt.ENV_VAR, "numpy")
    assert pt.backends_under_test() == ["numpy"]
    monkeypatch.setenv(pt.ENV_VAR, "numpy,mxnet")
    with pytest.raises(posbias.BackendError, match="unknown backend"):
        pt.backends_under_test()


class Windowed(posbias.BiasSpec):
    """A variant with a required hyper-parameter: parity uses its own examples."""

    toeplitz = True
    window: int

    @classmethod
    def parity_examples(cls, num_heads):
        return [cls(num_heads=num_heads, window=2)]

    def compute(self, xp, q_pos, k_pos, heads, params):
        d = xp.minimum(xp.abs(k_pos - q_pos), self.window)
        return xp.float(-d)[..., None, :, :] * xp.constant(np.ones(len(heads)))[:, None, None]


def test_parity_of_a_variant_with_required_parameters(isolated_registry):
    posbias.register("test/windowed")(Windowed)
    cells = pt.run_parity(["test/windowed"], backends=["numpy"], head_counts=[2])
    assert all(c.passed for c in cells)


def test_the_report_gives_the_metric_that_decided_and_flags_negative_zero():
    """float16 values that underflow to 0 read "rel err 1" yet pass on atol: the
    tolerance used (max err / (atol + rtol·|ref|)) says how close the cell was."""
    ref = np.array([1e-9, 1.0, 0.0])
    x = np.array([0.0, 1.0005, -0.0], dtype=np.float16)
    _, rel, ok = pt._agree(x, ref, "float16", 1e-3, 1e-7)
    assert ok and rel == 1.0  # the misleading number
    used = pt.tolerance_used(x, ref, "float16", 1e-3, 1e-7)
    assert 0.1 < used < 1.0
    assert pt.tolerance_used(np.array([np.nan]), np.array([0.0]), "float32", 1e-6, 1e-12) == np.inf
    assert pt.negative_zeros(x) == 1 and pt.negative_zeros(np.array([0, -1])) == 0
