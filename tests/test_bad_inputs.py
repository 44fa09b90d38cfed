"""Property-based bad-input suite: every public argument, generated wrong in every way.

For each public function and layer, one valid call is built; hypothesis then
replaces one argument at a time by a wrong value of each family — wrong type,
dtype, rank, shape or length, NaN/inf, out of range, another framework's
tensor — and the call must raise a :class:`posbias.PosBiasError` subclass whose
message names that argument. Never a framework stack trace, never NaN, never a
coerced guess.

``derandomize=True`` keeps CI deterministic; ``POSBIAS_BAD_INPUT_EXAMPLES``
(default 25) bounds the examples per argument so that the suite stays well
inside its CI budget. With ``POSBIAS_BAD_INPUT_REPORT=path.json`` the number of
generated cases per family is written at the end of the session.
"""

from __future__ import annotations

import collections
import json
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import posbias
from conftest import BACKENDS, FRAMEWORKS, native
from posbias.testing import _layers as lp

EXAMPLES = int(os.environ.get("POSBIAS_BAD_INPUT_EXAMPLES", "25"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
B, H, L, D = 2, 4, 6, 8
#: generated cases per family: {family: [cases, failures]}
COUNTS: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("POSBIAS_BAD_INPUT_REPORT")
    if path:
        old = json.loads(open(path).read()) if os.path.exists(path) else {}
        for family, (cases, failures) in COUNTS.items():
            done = old.setdefault(family, [0, 0])
            done[0] += cases
            done[1] += failures
        with open(path, "w") as f:
            json.dump(old, f, indent=1, sort_keys=True)


def _expect_error(family: str, argument: str | tuple[str, ...], call) -> None:
    """``call()`` raises a PosBiasError naming ``argument`` (one of them, for a tuple)."""
    COUNTS[family][0] += 1
    names = (argument,) if isinstance(argument, str) else argument
    try:
        call()
    except posbias.PosBiasError as exc:
        message = str(exc)
        if not any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in names):
            COUNTS[family][1] += 1
            raise AssertionError(f"the error does not name {names}: {message!r}") from exc
        return
    except Exception as exc:  # a framework error, or a wrong kind of error
        COUNTS[family][1] += 1
        raise AssertionError(f"{type(exc).__name__} instead of a posbias error: {exc}") from exc
    COUNTS[family][1] += 1
    raise AssertionError(f"no error for a bad {names}")


# ----------------------------------------------------------------- value families
NOT_BOOL = st.one_of(
    st.sampled_from(["false", "true", "no", "", "0", None, 0, 1, 1.0, 0.0, [True]]),
    st.integers(-3, 3),
    st.floats(allow_nan=True),
    st.text(max_size=4),
)
NOT_INT = st.one_of(
    st.sampled_from([1.5, 2.0, "3", True, False, [1], float("nan"), float("inf"), b"1"]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
)
NOT_POSITIVE_REAL = st.one_of(
    st.sampled_from(["0.5", True, False, [0.5], float("nan"), float("inf"), -float("inf")]),
    st.floats(max_value=0.0),
    st.integers(max_value=0),
    st.text(max_size=3),
)
NOT_NAME = st.one_of(st.text(max_size=8).filter(lambda s: s not in ("auto",)), st.integers())


def _other_framework(backend: str) -> str | None:
    others = [f for f in FRAMEWORKS if f != backend]
    return others[0] if others else None


def _bad_tensors(
    backend: str, shape: tuple[int, ...], *, integer: bool, axis: int = -1, foreign: bool = True
) -> st.SearchStrategy:
    """Arrays that are wrong for an argument of ``shape``: dtype, rank, shape, framework.

    ``axis`` is the one whose length must match the other arguments.
    """
    grown = list(shape)
    grown[axis] += 3
    good_dtype = np.int64 if integer else np.float32
    bad_dtype = [np.float32, np.float64] if integer else [np.int64, np.int32, np.bool_]
    if not integer and backend != "tensorflow":
        bad_dtype.append(np.complex64)
    choices = [lambda d=d: native(backend, np.zeros(shape, d)) for d in bad_dtype]
    choices += [
        lambda: native(backend, np.zeros(shape[:-1], good_dtype)),  # rank - 1
        lambda: native(backend, np.zeros((*shape, 2), good_dtype)),  # rank + 1
        lambda: native(backend, np.zeros(tuple(grown), good_dtype)),
        lambda: "abc",
        lambda: {"a": 1},
        lambda: [[1.5, "x"]],
    ]
    other = _other_framework(backend) if foreign else None
    if other is not None:
        choices.append(lambda: native(other, np.zeros(shape, good_dtype)))
    return st.sampled_from(choices).map(lambda make: make())


# ---------------------------------------------------------------------- attention
def _qkv(backend: str):
    rng = np.random.default_rng(0)
    return [
        native(backend, lp._to_layout(rng.normal(size=(B, H, L, D)).astype(np.float32), backend))
        for _ in range(3)
    ]


def _attention_bad(backend: str, argument: str) -> st.SearchStrategy:
    layout = (B, H, L, D) if lp.LAYOUT[backend] == "bhld" else (B, L, H, D)
    if argument in ("q", "k", "v"):  # v may have its own head dim, not its own length
        return _bad_tensors(backend, layout, integer=False, axis=-2 if argument == "v" else -1)
    if argument == "bias":
        wrong_heads = posbias.get("alibi", num_heads=H + 1)
        return st.one_of(
            st.sampled_from([3, 2.5, True, [1], wrong_heads, wrong_heads.to_config()]),
            st.text(min_size=1, max_size=6).filter(lambda s: s not in posbias.list_biases()),
            st.just({"num_heads": H}),
        )
    if argument == "causal":
        return NOT_BOOL
    if argument == "scale":
        return NOT_POSITIVE_REAL
    if argument == "q_offset":
        return st.one_of(
            NOT_INT.filter(lambda x: x is not None),
            st.just(2**45),
            st.sampled_from(["float array", "wrong batch", "2-D"]).map(
                lambda kind: {
                    "float array": native(backend, np.zeros((B,), np.float32)),
                    "wrong batch": native(backend, np.zeros((B + 1,), np.int64)),
                    "2-D": native(backend, np.zeros((B, 2), np.int64)),
                }[kind]
            ),
        )
    if argument == "key_mask":
        return st.one_of(
            _bad_tensors(backend, (B, L), integer=True),
            st.just(native(backend, np.ones((B, L), np.int64))),
        )
    if argument == "segment_ids":
        return _bad_tensors(backend, (B, L), integer=True)
    if argument in ("q_pos", "k_pos"):
        return st.one_of(
            _bad_tensors(backend, (L,), integer=True),
            st.just(np.arange(L) + 2**45),
        )
    if argument == "implementation":
        return NOT_NAME.filter(lambda s: s not in ("auto", "reference", "blockwise"))
    if argument == "block_size":
        return st.one_of(NOT_INT, st.integers(max_value=0))
    raise AssertionError(argument)


ATTENTION_ARGUMENTS = [
    "q", "k", "v", "bias", "causal", "q_offset", "key_mask", "segment_ids", "scale",
    "q_pos", "k_pos", "implementation", "block_size",
]  # fmt: skip


@pytest.mark.parametrize("argument", ATTENTION_ARGUMENTS)
def test_attention_rejects_every_bad_argument(backend, argument):
    attention = lp.framework_module(backend).attention

    @SETTINGS
    @given(bad=_attention_bad(backend, argument))
    def check(bad):
        q, k, v = _qkv(backend)
        kwargs = dict(q=q, k=k, v=v, bias="alibi")
        if argument in ("q_pos", "k_pos"):  # positions come in pairs
            kwargs.update(q_pos=np.arange(L), k_pos=np.arange(L))
        kwargs[argument] = bad
        names = (argument,)
        if argument in ("q", "k", "v"):
            names = ("q", "k", "v")  # shape disagreements name the tensors that disagree
        _expect_error(f"attention:{_family(argument)}", names, lambda: attention(**kwargs))

    check()


def _family(argument: str) -> str:
    if argument in ("q", "k", "v", "key_mask", "segment_ids", "q_pos", "k_pos", "x"):
        return "tensors"
    if argument in ("q_offset", "k_offset", "q_len", "k_len", "heads"):
        return "ranges"
    return "types/values"


def test_attention_rejects_non_finite_scales_and_queries_without_nan(backend):
    """NaN/inf in the scale is an error; NaN in q propagates only to its own rows."""
    attention = lp.framework_module(backend).attention
    q, k, v = _qkv(backend)
    for scale in (float("nan"), float("inf"), -1.0, 0.0):
        _expect_error("values/NaN", "scale", lambda s=scale: attention(q, k, v, "alibi", scale=s))


# ------------------------------------------------------------------------ spec.bias
def _bias_bad(backend: str, argument: str) -> st.SearchStrategy:
    if argument in ("q_len", "k_len"):
        return st.one_of(NOT_INT, st.integers(max_value=-1), st.just(2**45))
    if argument in ("q_offset", "k_offset"):  # a list is a (B,) array of per-sequence offsets
        return st.one_of(
            NOT_INT.filter(lambda x: not isinstance(x, list)),
            st.integers(max_value=-1),
            st.just(2**45),
        )
    if argument in ("q_pos", "k_pos"):  # spec.bias takes any lengths and (B, L) batches
        return st.one_of(
            _bad_tensors(backend, (L,), integer=True).filter(
                lambda x: (
                    len(getattr(x, "shape", (1,))) != 2
                    and getattr(x, "shape", (0,))[-1:] != (L + 3,)
                )
            ),
            st.just(np.arange(L) + 2**45),
        )

    if argument == "heads":
        return st.one_of(
            st.sampled_from([[H], [-1], [0, 0], [], [1.5], "0", 2.0, {"h": 1}]),
            st.integers(min_value=H),
            st.integers(max_value=-1),
        )
    if argument == "dtype":
        return st.one_of(
            st.sampled_from([None, 3, "int32", "float8", "bool", "float", True, np.int64]),
            st.text(max_size=6).filter(lambda s: s not in ("float32", "float16", "bfloat16")),
        )
    if argument == "backend":
        return st.one_of(
            st.text(max_size=6).filter(
                lambda s: (
                    s.lower()
                    not in ("numpy", "np", "torch", "pytorch", "jax", "jnp", "tensorflow", "tf")
                )
            ),
            st.integers(),
            st.just(None).map(lambda _: ["torch"]),
        )
    if argument == "params":
        return st.sampled_from(
            [
                {"table": np.zeros((3, 3))},
                {"table": np.full((32, H), np.nan)},
                {"table": np.full((32, H), np.inf)},
                {"tabel": np.zeros((32, H))},
                {},
                [1, 2],
                {"table": "abc"},
            ]
        )
    raise AssertionError(argument)


BIAS_ARGUMENTS = [
    "q_len", "k_len", "q_offset", "k_offset", "q_pos", "k_pos", "heads", "dtype", "backend",
    "params",
]  # fmt: skip


@pytest.mark.parametrize("argument", BIAS_ARGUMENTS)
def test_spec_bias_rejects_every_bad_argument(backend, argument):
    spec = posbias.get("t5", num_heads=H)

    @SETTINGS
    @given(bad=_bias_bad(backend, argument))
    def check(bad):
        if argument in ("q_pos", "k_pos"):
            kwargs = dict(q_pos=np.arange(L), k_pos=np.arange(L))
        else:
            kwargs = dict(q_len=L, k_len=L)
        kwargs["backend"] = backend
        kwargs[argument] = bad
        if argument in ("q_offset", "k_offset") and "q_pos" in kwargs:
            del kwargs["q_pos"]
        names = (argument, "params", "table", "tabel") if argument == "params" else (argument,)
        _expect_error(f"spec.bias:{_family(argument)}", names, lambda: spec.bias(**kwargs))

    check()


# -------------------------------------------------------- hyper-parameters of get()
def _field_kinds() -> list[tuple[str, str, str]]:
    """(variant, field, kind) for every registered variant's hyper-parameters."""
    import dataclasses
    import typing

    out = []
    for name, cls in sorted(posbias.registered().items()):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            hint = str(hints.get(field.name, ""))
            kind = (
                "bool" if "bool" in hint
                else "int" if hint.startswith("int") or "<class 'int'>" in hint
                else "float" if "float" in hint and "tuple" not in hint
                else "other"
            )  # fmt: skip
            if kind != "other":
                out.append((name, field.name, kind))
    return out


def _required(name: str) -> dict:
    cls = posbias.registered()[name]
    example = cls.parity_examples(H)[0]
    return {k: getattr(example, k) for k in cls.required_parameters()}


@pytest.mark.parametrize(("variant", "field", "kind"), _field_kinds())
def test_hyper_parameters_are_read_strictly(variant, field, kind):
    bad = {
        "bool": NOT_BOOL,
        "int": st.one_of(NOT_INT, st.just(2**70)),
        "float": st.one_of(
            st.sampled_from(["0.5", True, [0.5], float("nan"), float("inf"), -float("inf")]),
            st.text(max_size=3),
        ),
    }[kind]

    @SETTINGS
    @given(value=bad)
    def check(value):
        kwargs = {"num_heads": H, **_required(variant), field: value}
        _expect_error("get:types/values", field, lambda: posbias.get(variant, **kwargs))
        config = {"name": variant, **kwargs}
        _expect_error("from_config:types/values", field, lambda: posbias.from_config(config))

    check()


# ----------------------------------------------------------------------- layers
def _layer_bad(backend: str, argument: str) -> st.SearchStrategy:
    if argument in ("embed_dim", "num_heads", "num_kv_heads", "head_dim"):
        return st.one_of(NOT_INT, st.integers(max_value=0))
    if argument in ("causal", "use_bias"):
        return NOT_BOOL
    if argument == "implementation":
        return NOT_NAME.filter(lambda s: s not in ("auto", "reference", "blockwise"))
    if argument == "block_size":
        return st.one_of(NOT_INT.filter(lambda x: x is not None), st.integers(max_value=0))
    if argument == "bias":
        return st.one_of(
            st.sampled_from([3, 2.5, [1], posbias.get("alibi", num_heads=H + 1)]),
            st.text(min_size=1, max_size=6).filter(lambda s: s not in posbias.list_biases()),
        )
    # Keras layers convert any array-like input to the backend's tensors, by design
    foreign = backend != "tensorflow"
    if argument == "x":
        return _bad_tensors(backend, (B, L, 16), integer=False, foreign=foreign)
    if argument in ("key_mask", "segment_ids"):
        return _bad_tensors(backend, (B, L), integer=True, foreign=foreign)
    if argument == "cache":
        return st.sampled_from([(1, 2, 3, 4), "cache", 3, {"k": 1}])
    raise AssertionError(argument)


LAYER_INIT = ["embed_dim", "num_heads", "num_kv_heads", "head_dim", "causal", "use_bias",
              "implementation", "block_size", "bias"]  # fmt: skip
LAYER_CALL = ["x", "key_mask", "segment_ids", "cache"]


@pytest.mark.parametrize("argument", LAYER_INIT + LAYER_CALL)
def test_multi_head_attention_rejects_every_bad_argument(backend, argument):
    cls = lp.framework_module(backend).MultiHeadAttention

    @SETTINGS
    @given(bad=_layer_bad(backend, argument))
    def check(bad):
        if argument in LAYER_INIT:
            kwargs = dict(embed_dim=16, num_heads=H, causal=True)
            kwargs[argument] = bad
            names = (argument, "bias") if argument == "bias" else (argument,)
            _expect_error(f"layers:{_family(argument)}", names, lambda: cls(**kwargs))
            return
        layer = cls(16, H, causal=True)
        x = native(backend, np.ones((B, L, 16), np.float32))
        kwargs = {"key_mask": None, "segment_ids": None, "cache": None, argument: bad}
        if argument == "x":
            x = kwargs.pop("x")
        names = ("input", "x") if argument == "x" else (argument,)
        _expect_error(f"layers:{_family(argument)}", names, lambda: layer(x, **kwargs))

    check()


# ---------------------------------------------------------------------- slopes
@SETTINGS
@given(
    num_heads=st.one_of(NOT_INT, st.integers(max_value=0)),
    max_bias=st.one_of(NOT_POSITIVE_REAL, st.just(1e300)),
)
def test_slope_schedules_read_their_arguments_strictly(num_heads, max_bias):
    for schedule in (posbias.alibi_slopes, posbias.geometric_slopes):
        _expect_error("slopes:types/values", "num_heads", lambda f=schedule: f(num_heads))
        _expect_error("slopes:types/values", "max_bias", lambda f=schedule: f(4, max_bias))


# ----------------------------------------------------------------- JAX sharding
def _sharded_bad(argument: str) -> st.SearchStrategy:
    if argument in ("causal", "checkpoint_tiles"):
        return NOT_BOOL
    if argument == "scale":
        return NOT_POSITIVE_REAL
    if argument == "order":
        return NOT_NAME.filter(lambda s: s not in ("contiguous", "zigzag"))
    if argument in ("seq_axis", "head_axis"):
        return st.text(min_size=1, max_size=5).filter(lambda s: s != "seq")
    if argument == "mesh":
        return st.sampled_from(["seq", None, 4, ("seq",)])
    if argument == "key_mask":
        return _bad_tensors("jax", (B, L * 2), integer=True)
    raise AssertionError(argument)


@pytest.mark.parametrize(
    "argument",
    [
        "mesh",
        "seq_axis",
        "head_axis",
        "causal",
        "order",
        "scale",
        "checkpoint_tiles",
        "key_mask",
    ],
)
def test_sharded_attention_rejects_every_bad_argument(argument):
    if "jax" not in BACKENDS:
        pytest.skip("JAX is not under test")
    import jax
    from jax.sharding import Mesh

    from posbias.jax import sharded_attention

    mesh = Mesh(np.array(jax.devices()[:2]), ("seq",))
    q = native("jax", np.ones((B, L * 2, H, D), np.float32))

    @SETTINGS
    @given(bad=_sharded_bad(argument))
    def check(bad):
        kwargs = dict(mesh=mesh, seq_axis="seq", causal=True)
        kwargs[argument] = bad
        _expect_error(f"distributed:{_family(argument)}", argument,
                      lambda: sharded_attention(q, q, q, "alibi", **kwargs))  # fmt: skip

    check()


# ----------------------------------------------------------------------- files
@SETTINGS
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".npz", ".safetensors"]))
def test_load_params_rejects_any_bytes_that_are_not_a_parameter_file(
    tmp_path_factory, content, suffix
):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    from posbias.params_io import load_params

    path = tmp_path_factory.mktemp("files") / f"p{suffix}"
    path.write_bytes(content)
    _expect_error("files", ("parameter file", "parameters"), lambda: load_params(path))


# ------------------------------------------------------------------------- CLI
def _testing_dtypes() -> tuple[str, ...]:
    from posbias import testing

    return tuple(testing.TOLERANCES)


@SETTINGS
@given(
    argv=st.one_of(
        st.tuples(
            st.just("show"),
            st.just("alibi"),
            st.just("--length"),
            st.integers(max_value=0).map(str),
        ),
        st.tuples(
            st.just("show"),
            st.just("alibi"),
            st.just("--heads"),
            st.sampled_from(["-1", "x", "1.5", "0"]),
        ),
        st.tuples(st.just("comm"), st.just("--devices"), st.sampled_from(["0", "-2", "two"])),
        st.tuples(
            st.just("parity"),
            st.just("--dtypes"),
            st.text(min_size=1, max_size=6).filter(
                lambda s: (
                    s not in ("float32", "float16", "bfloat16", "float64")
                    and "," not in s
                    and not s.startswith("-")
                )
            ),
        ),
        st.tuples(st.just("bench"), st.just("--only"), st.sampled_from(["99", "0", "x", "10z"])),
    )
)
def test_the_command_line_exits_2_with_one_line(argv, capsys):
    from posbias.cli import main

    COUNTS["cli"][0] += 1
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    _, err = capsys.readouterr()
    if code != 2 or "Traceback" in err or "error" not in err:
        COUNTS["cli"][1] += 1
        raise AssertionError(f"{argv}: exit {code}, stderr {err!r}")


# ---------------------------------------------------------------------- caches
@pytest.mark.parametrize("field", ["k", "v", "valid", "length", "overflow"])
def test_a_corrupted_kv_cache_is_a_posbias_error(backend, field):
    layer = lp.framework_module(backend).MultiHeadAttention(16, H, causal=True)
    cache = layer.init_cache(batch_size=B, capacity=6)
    x = native(backend, np.ones((B, 1, 16), np.float32))
    shapes = {
        "k": (B, H, 6, 4),
        "v": (B, H, 6, 4),
        "valid": (B, 6),
        "length": (B,),
        "overflow": (B,),
    }

    kinds = ["rank", "length", "dtype"] + (["python"] if backend != "tensorflow" else [])

    @SETTINGS  # (Keras validates nested call arguments itself: a list in a cache of tensors)
    @given(kind=st.sampled_from(kinds))
    def check(kind):
        shape = shapes[field]
        dtype = {"valid": bool, "overflow": bool, "length": np.int32}.get(field, np.float32)
        bad = {
            "rank": lambda: native(backend, np.zeros((*shape, 1), dtype)),
            "length": lambda: native(backend, np.zeros((*shape[:-1], shape[-1] + 1), dtype)),
            "dtype": lambda: native(
                backend, np.zeros(shape, np.float32 if dtype is not np.float32 else np.int32)
            ),
            "python": lambda: [0] * shape[0],
        }[kind]()
        _expect_error(
            "cache",
            ("cache", f"cache.{field}"),
            lambda: layer(x, cache=cache._replace(**{field: bad})),
        )

    check()
