import json
import subprocess
import sys
import textwrap
from importlib import metadata

import numpy as np
import pytest

import posbias
from posbias import registry


class _Linear(posbias.BiasSpec):
    toeplitz = True

    def compute(self, xp, q_pos, k_pos, heads, params):
        m = xp.constant(np.full(len(heads), 0.5))[:, None, None]
        return m * xp.float(-xp.abs(k_pos - q_pos))[..., None, :, :]


def test_builtins_listed():
    names = posbias.list_biases()
    assert "alibi" in names and "alibi_asymmetric" in names
    assert names == sorted(names)
    assert posbias.list_biases("alibi_*") == [
        "alibi_2d",
        "alibi_asymmetric",
        "alibi_learned",
        "alibi_scaled",
    ]
    assert posbias.list_biases("kerple_*") == ["kerple_log", "kerple_power"]
    assert posbias.list_biases("nothing*") == []


def test_registered_view_is_read_only():
    view = posbias.registered()
    assert view["alibi"] is posbias.Alibi
    with pytest.raises(TypeError):
        view["x"] = _Linear


def test_register_namespaced_and_get(isolated_registry):
    cls = posbias.register("myorg/linear_window")(type("LW", (_Linear,), {}))
    spec = posbias.get("myorg/linear_window", num_heads=2)
    assert isinstance(spec, cls) and spec.name == "myorg/linear_window"
    assert "myorg/linear_window" in posbias.list_biases("myorg/*")
    assert spec.to_config() == {"name": "myorg/linear_window", "num_heads": 2}


def test_registry_is_restored(isolated_registry):
    assert "myorg/linear_window" not in posbias.list_biases()


def test_collision_is_an_error_unless_overwrite(isolated_registry):
    first = posbias.register("test/a")(type("A", (_Linear,), {}))
    second = type("B", (_Linear,), {})
    with pytest.raises(posbias.RegistryError, match="already registered"):
        posbias.register("test/a")(second)
    posbias.register("test/a", overwrite=True)(second)
    assert posbias.registered()["test/a"] is second
    assert first is not second
    with pytest.raises(posbias.RegistryError, match="already registered"):
        posbias.register("alibi")(type("C", (_Linear,), {}))


@pytest.mark.parametrize("name", ["", "Alibi", "a b", "a/b/c", "/x", "x/", "über", 3])
def test_invalid_names(name, isolated_registry):
    with pytest.raises(posbias.RegistryError, match="invalid bias name"):
        posbias.register(name)


def test_register_rejects_non_specs(isolated_registry):
    with pytest.raises(posbias.RegistryError, match="BiasSpec subclasses"):
        posbias.register("test/f")(lambda: None)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(posbias.UnknownBiasError, match="Did you mean 'alibi'") as info:
        posbias.get("alibii", num_heads=2)
    assert isinstance(info.value, KeyError)
    assert "Registered:" in str(info.value)


def test_get_rejects_unknown_and_missing_parameters():
    with pytest.raises(posbias.InvalidTypeError, match=r"unexpected parameters \['foo'\]"):
        posbias.get("alibi", num_heads=2, foo=1)
    with pytest.raises(posbias.InvalidTypeError, match=r"missing parameters \['num_heads'\]"):
        posbias.get("alibi")


@pytest.mark.parametrize(
    "spec",
    [
        posbias.get("alibi", num_heads=12),
        posbias.get("alibi", num_heads=3, schedule="geometric", max_bias=4.0, scale=0.5),
        posbias.get("alibi", num_heads=3, custom_slopes=[0.1, 1 / 3, 0.7]),
        posbias.get("alibi_asymmetric", num_heads=5, future_max_bias=2.5),
        posbias.get("alibi_asymmetric", num_heads=2, future_custom_slopes=(0.2, 0.1)),
    ],
    ids=repr,
)
def test_config_round_trip(spec):
    text = json.dumps(spec.to_config())
    again = posbias.from_config(json.loads(text))
    assert again == spec and hash(again) == hash(spec)
    np.testing.assert_array_equal(again.slopes, spec.slopes)


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"name": "nope", "num_heads": 2}, posbias.UnknownBiasError, "unknown bias"),
        ({"name": "os:system", "num_heads": 2}, posbias.UnknownBiasError, "unknown bias"),
        ({"name": "alibi", "num_heads": 2, "x": 1}, posbias.ConfigError, r"unexpected keys"),
        ({"name": "alibi"}, posbias.ConfigError, r"missing keys \['num_heads'\]"),
        ({"num_heads": 2}, posbias.ConfigError, "needs a 'name'"),
        (["alibi"], posbias.ConfigError, "mapping"),
        ({"name": "alibi", "num_heads": "2"}, posbias.InvalidTypeError, "integer"),
    ],
)
def test_bad_configs(config, error, message):
    with pytest.raises(error, match=message):
        posbias.from_config(config)


@pytest.mark.parametrize(("flag", "advice"), [("exact", "bit_identical"), ("linear", "symmetric")])
def test_retired_class_flags_are_errors_not_ignored(flag, advice):
    with pytest.raises(posbias.RegistryError, match=f"retired class flag.*{flag}.*{advice}"):
        type("Old", (_Linear,), {flag: False})


def test_hyper_parameters_may_share_a_retired_flag_name():
    cls = type("P", (_Linear,), {"__annotations__": {"linear": "bool"}, "linear": True})
    assert cls(num_heads=1, linear=False).linear is False


def test_learnable_variant_must_declare_its_parameter_shapes():
    cls = type("L", (_Linear,), {"learnable": True, "init_params": lambda self, seed=0: {}})
    with pytest.raises(NotImplementedError, match="param_shapes"):
        cls(num_heads=1).param_shapes()


def test_unregistered_spec_has_no_config():
    spec = type("Loose", (_Linear,), {})(num_heads=2)
    with pytest.raises(posbias.ConfigError, match="not registered"):
        spec.to_config()


def test_subclass_of_registered_class_is_not_confused_with_it(isolated_registry):
    sub = type("Sub", (posbias.Alibi,), {})
    with pytest.raises(posbias.ConfigError, match="not registered"):
        sub(num_heads=2).to_config()


def test_entry_point_plugins_load_lazily(isolated_registry, tmp_path, monkeypatch):
    (tmp_path / "posbias_fake_plugin.py").write_text(
        textwrap.dedent("""
        import numpy as np
        import posbias

        LOADED = True

        class Plugin(posbias.BiasSpec):
            toeplitz = True
            def compute(self, xp, q_pos, k_pos, heads, params):
                d = xp.float(-xp.abs(k_pos - q_pos))[..., None, :, :]
                return d * xp.constant(np.ones(len(heads)))[:, None, None]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [
        metadata.EntryPoint(
            "fake/plugin", "posbias_fake_plugin:Plugin", registry.ENTRY_POINT_GROUP
        ),
        metadata.EntryPoint("fake/broken", "posbias_missing_module:X", registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: points)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert "posbias_fake_plugin" not in sys.modules
    posbias.get("alibi", num_heads=1)  # a built-in lookup does not load plugins
    assert "posbias_fake_plugin" not in sys.modules
    with pytest.warns(UserWarning, match="fake/broken"):
        spec = posbias.get("fake/plugin", num_heads=2)
    assert spec.bias(q_len=1, k_len=2).tolist() == [[[-1.0, 0.0]], [[-1.0, 0.0]]]
    with pytest.raises(posbias.UnknownBiasError, match="failed to load"):
        posbias.get("fake/broken", num_heads=2)


def test_import_loads_no_framework_and_no_plugins():
    code = (
        "import sys, posbias, posbias.testing, posbias.cli; "
        "print([m for m in ('torch', 'jax', 'tensorflow', 'keras', 'flax') if m in sys.modules]);"
        "print(posbias.registry._plugins_loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "False"]
