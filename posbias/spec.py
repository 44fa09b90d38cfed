"""``BiasSpec``: the backend-agnostic definition of one additive attention bias.

A spec is a frozen dataclass of hyper-parameters (``num_heads`` plus whatever
the variant needs). It computes

    bias[..., h, i, j] = f_h(q_pos[..., i], k_pos[..., j])

once, in :meth:`BiasSpec.compute`, written against the backend op vocabulary
(:mod:`posbias.backends._base`), and :meth:`BiasSpec.bias` turns it into a
native tensor for NumPy, PyTorch, JAX or TensorFlow. The bias is meant to be
added after the ``1/sqrt(d)`` scaling: ``softmax(q·kᵀ·scale + bias + mask)``.

Subclasses are turned into frozen, keyword-only dataclasses automatically:
declare hyper-parameters as annotated class attributes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from . import _evaluate
from . import backends as _backends
from ._core.checks import check_int, check_num_heads, real_array
from .errors import ConfigError, InvalidArgumentError, InvalidTypeError, RegistryError

__all__ = ["BiasSpec"]

_RESERVED = {"name"}
#: class flags that were renamed or removed: old name -> what to do instead
_RETIRED_FLAGS = {
    "exact": "rename it to bit_identical",
    "linear": "drop it; override symmetric_slopes() to return the slopes",
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _checked_seed(init_params: Any) -> Any:
    """Wrap a variant's ``init_params`` so that ``seed`` is read strictly (an int >= 0)."""

    @functools.wraps(init_params)
    def init(self: Any, seed: int = 0) -> dict[str, np.ndarray]:
        return init_params(self, check_int("seed", seed, minimum=0, maximum=2**63 - 1))

    return init


@dataclasses.dataclass(frozen=True, kw_only=True)
class BiasSpec:
    """Base class of every bias variant.

    Attributes:
        num_heads: number of attention heads ``H`` (global, over all devices).

    Class attributes a variant sets:
        name: the registered name (set by :func:`posbias.register`).
        toeplitz: the bias depends on ``j - i`` only.
        learnable: the variant has trainable parameters (it then declares
            :meth:`param_shapes` and implements :meth:`init_params`).
        bit_identical: float32 results bit-identical across backends and
            tiles (closed forms; False for variants using ``exp``, ``log``,
            ``cos`` or an MLP, which are compared within :attr:`tolerances`).

    Whether a bias is ALiBi-shaped (``-m_h·|i - j|``) is not a class flag:
    :meth:`symmetric_slopes` says it per instance (``alibi_scaled`` is, until
    ``train_length`` is set).

    Example:
        >>> import posbias
        >>> spec = posbias.get("alibi", num_heads=4)
        >>> spec.bias(q_len=2, k_len=3)[0, 1].tolist()   # head 0, query row 1
        [-0.5, -0.25, 0.0]
    """

    name: ClassVar[str | None] = None
    toeplitz: ClassVar[bool] = False
    learnable: ClassVar[bool] = False
    bit_identical: ClassVar[bool] = True
    #: 1 for sequences (integer positions), 2 for image grids ((row, col) points)
    position_dims: ClassVar[int] = 1
    #: per-dtype ``(rtol, atol)`` overriding :data:`posbias.testing.TOLERANCES`
    tolerances: ClassVar[dict[str, tuple[float, float]]] = {}

    num_heads: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        annotations = inspect.get_annotations(cls)
        clash = _RESERVED & set(annotations)
        if clash:
            raise TypeError(f"{cls.__name__}: field names {sorted(clash)} are reserved.")
        retired = sorted(  # class attributes, not hyper-parameters that share the name
            flag
            for flag in set(_RETIRED_FLAGS) & set(cls.__dict__)
            if "ClassVar" in str(annotations.get(flag, "ClassVar"))
        )
        if retired:  # a silently ignored flag would mislead the parity harness or kernels
            raise RegistryError(
                f"{cls.__name__} sets the retired class flag(s) {retired}: "
                + "; ".join(f"{flag}: {_RETIRED_FLAGS[flag]}" for flag in retired)
                + "."
            )
        if "init_params" in cls.__dict__:  # the seed is read strictly for every variant
            cls.init_params = _checked_seed(cls.__dict__["init_params"])
        dataclasses.dataclass(frozen=True, kw_only=True)(cls)

    def __post_init__(self) -> None:
        self._set("num_heads", check_num_heads(self.num_heads))

    # ------------------------------------------------------------- helpers
    def _set(self, field: str, value: Any) -> None:
        """Normalise a field inside ``__post_init__`` (the dataclass is frozen)."""
        object.__setattr__(self, field, value)

    def replace(self, **changes: Any) -> BiasSpec:
        """A copy with some hyper-parameters changed (validated again).

        Raises:
            InvalidTypeError: a name that is not a hyper-parameter of this variant.

        Example:
            >>> import posbias
            >>> posbias.get("alibi", num_heads=4).replace(max_bias=4.0).max_bias
            4.0
        """
        unknown = sorted(set(changes) - set(self.parameter_names()))
        if unknown:
            raise InvalidTypeError(
                f"{self.name or type(self).__name__} has no hyper-parameters {unknown}; its "
                f"hyper-parameters are {list(self.parameter_names())}."
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """Names of the hyper-parameters (constructor keywords)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def required_parameters(cls) -> tuple[str, ...]:
        return tuple(
            f.name
            for f in dataclasses.fields(cls)
            if f.init
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )

    # -------------------------------------------------------------- config
    def to_config(self) -> dict[str, Any]:
        """A JSON-safe dict ``{"name": ..., <hyper-parameters>}``.

        Example:
            >>> import json, posbias
            >>> spec = posbias.get("alibi", num_heads=8)
            >>> posbias.from_config(json.loads(json.dumps(spec.to_config()))) == spec
            True
        """
        name = type(self).__dict__.get("name")  # an unregistered subclass has none
        if name is None:
            raise ConfigError(
                f"{type(self).__name__} is not registered, so it has no config name; "
                "decorate it with @posbias.register('your/name')."
            )
        config: dict[str, Any] = {"name": name}
        for key in self.parameter_names():
            config[key] = _jsonable(getattr(self, key))
        return config

    # ---------------------------------------------------- variant interface
    def compute(self, xp: Any, q_pos: Any, k_pos: Any, heads: np.ndarray, params: Any) -> Any:
        """The bias values; the one function a variant implements.

        Args:
            xp: a :class:`~posbias.backends.Backend` bound to the framework,
                device and compute dtype (float32, or float64 when asked).
            q_pos: integer query positions, shape ``(..., Lq, 1)``.
            k_pos: integer key positions, shape ``(..., 1, Lk)``.
            heads: global head indices, int64 NumPy array of shape ``(h,)``.
            params: learnable parameters as native tensors (None otherwise).

        Returns:
            Tensor of shape ``(..., h, Lq, Lk)`` in the compute dtype.
        """
        raise InvalidTypeError(
            f"{type(self).__name__} does not implement compute(xp, q_pos, k_pos, heads, params); "
            "every BiasSpec subclass must (docs/extending.md)."
        )

    @classmethod
    def parity_examples(cls, num_heads: int) -> list[BiasSpec]:
        """Specs with ``num_heads`` heads that ``posbias parity`` checks.

        The default is the spec with default hyper-parameters; variants override
        it to cover their options.
        """
        return [cls(num_heads=num_heads)]

    def temporaries_per_entry(self) -> int:
        """Floats of temporaries ``compute`` holds per bias entry ``(h, q, k)`` (default 4).

        :meth:`bias` computes blocks of query rows small enough that the
        temporaries, ``4 bytes · batch · Lk · (max(1, temporaries_per_entry()) ·
        heads + temporaries_per_pair())`` per row, stay within a fixed budget
        (256 MiB).
        """
        return 4

    def temporaries_per_pair(self) -> int:
        """Floats of temporaries ``compute`` holds per ``(query, key)`` pair, whatever
        the number of heads (default 0): an inner axis of a relative position shared
        by the heads, e.g. an MLP's hidden layer (FIRE, Swin V2's CPB) or Sandwich's
        angles, declares its width here (see :meth:`temporaries_per_entry`).
        """
        return 0

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Initial learnable parameters, seeded NumPy (empty for parameter-free variants).

        Every framework's ``PositionalBias`` starts from these values (cast to
        float32), so equal seeds give equal modules everywhere. Called when a
        module is built (and once per spec when a learnable bias is given by
        name or spec to ``bias()``/``attention()`` without parameters: those use
        these initial, seed-0 values); never on every forward call. The arrays
        must have the shapes of :meth:`param_shapes`. ``seed`` is an int >= 0.

        Returns:
            ``dict[str, numpy.ndarray]`` (float64).

        Example:
            >>> import posbias
            >>> posbias.get("t5", num_heads=2).init_params(seed=0)["table"].shape
            (32, 2)
        """
        return {}

    def score_mod(
        self,
        q_len: int | None = None,
        k_len: int | None = None,
        *,
        q_offset: int | None = None,
        k_offset: int = 0,
        key_mask: Any = None,
        params: Mapping[str, Any] | None = None,
        device: Any = None,
    ) -> Any:
        """This bias as a PyTorch FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)``.

        ``score + bias(q_offset + q_idx, k_offset + kv_idx)`` for head ``h``
        (global heads ``0..H-1``); ``q_offset`` defaults to ``k_len - q_len``
        (bottom-right). With ``key_mask`` ``(B, Lk)`` (True for a real key) the
        positions are ``cumsum(key_mask) - 1`` per sequence, as in
        :func:`posbias.torch.attention`. Symmetric ALiBi is closed-form; other
        Toeplitz biases read an ``(H, Lq + Lk - 1)`` table built for these
        lengths: called on a longer problem, its out-of-table entries are NaN
        (never a number read from outside the table). Pair it with
        :func:`posbias.torch.mask_mod` for causal, padding and segment masks
        (example: :mod:`posbias.torch._flex`, docs/performance.md).
        """
        _backends.load("torch")  # a clear error when PyTorch is missing
        from .torch import _flex

        return _flex.score_mod(
            self,
            q_len,
            k_len,
            q_offset=q_offset,
            k_offset=k_offset,
            key_mask=key_mask,
            params=params,
            device=device,
        )

    def symmetric_slopes(self) -> np.ndarray | None:
        """Slopes ``m`` (float64, ``(H,)``) when the bias is exactly ``-m_h·|i - j|``.

        Kernels with built-in ALiBi (FlashAttention's ``alibi_slopes``) use
        them; None (the default) for every other bias.
        """
        return None

    # ------------------------------------------------------------- the bias
    def bias(
        self,
        q_len: int | None = None,
        k_len: int | None = None,
        *,
        q_pos: Any = None,
        k_pos: Any = None,
        q_offset: Any = None,
        k_offset: Any = None,
        heads: Any = None,
        dtype: Any = "float32",
        backend: str | None = None,
        device: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        """The bias as a native tensor of shape ``(h, Lq, Lk)`` or ``(B, h, Lq, Lk)``.

        Positions: give ``q_len``/``k_len`` (keys at ``k_offset + [0, k_len)``,
        queries aligned bottom-right unless ``q_offset`` is given) or integer
        position arrays ``q_pos``/``k_pos`` of shape ``(L,)`` or ``(B, L)``.
        Batched positions or offsets of shape ``(B,)`` add a leading batch axis.

        Args:
            heads: global head indices (e.g. ``range(4, 8)``); default all.
            dtype: output dtype, as a string (``"float32"``, ``"bfloat16"``, ...)
                or the framework's dtype object. Values are computed in float32
                (float64 when float64 is asked) and cast last.
            backend: ``"numpy"``, ``"torch"``, ``"jax"`` or ``"tensorflow"``;
                default: the framework of the position arrays, else NumPy.
            device: where to create tensors when no position array says so.
            params: learnable parameters for learnable variants.

        Example:
            >>> import posbias
            >>> spec = posbias.get("alibi", num_heads=2)
            >>> spec.bias(q_len=1, k_len=3).tolist()
            [[[-0.125, -0.0625, 0.0]], [[-0.0078125, -0.00390625, 0.0]]]
        """
        return _evaluate.evaluate(
            self,
            q_len,
            k_len,
            q_pos=q_pos,
            k_pos=k_pos,
            q_offset=q_offset,
            k_offset=k_offset,
            heads=heads,
            dtype=dtype,
            backend=backend,
            device=device,
            params=params,
        )

    # ------------------------------------------------------- learnable API
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the learnable parameters (empty if none).

        Declared from the hyper-parameters alone (no random numbers, no
        arrays): layers read it on every forward call, also under
        ``torch.compile`` / ``jax.jit``. A learnable variant must override it.

        Returns:
            ``dict[str, tuple[int, ...]]``, in the order of :meth:`init_params`.

        Raises:
            NotImplementedError: a learnable variant that does not declare its shapes.

        Example:
            >>> import posbias
            >>> posbias.get("kerple_log", num_heads=4).param_shapes()
            {'r1': (4,), 'r2': (4,)}
        """
        if self.learnable:
            raise NotImplementedError(
                f"{type(self).__name__} is learnable and must declare param_shapes() "
                "from its hyper-parameters, e.g. {'table': (self.num_buckets, self.num_heads)}."
            )
        return {}

    def check_params(self, params: Mapping[str, Any], *, shapes_of: Any = None) -> None:
        """Check a parameter dict against :meth:`param_shapes`; NumPy values also by value.

        Names and shapes of every entry are checked (``shapes_of(tensor)`` gives
        a native tensor's shape; default ``tensor.shape``). Values given as
        NumPy arrays, lists or numbers must be finite real numbers and pass
        :meth:`validate_param_values`; native tensors (possibly traced) are not
        read.

        Raises:
            InvalidTypeError: ``params`` is not a mapping, or a value is not numeric.
            InvalidArgumentError: one error listing missing, unexpected and
                mis-shaped entries; or non-finite values.

        Example:
            >>> import numpy as np, posbias
            >>> spec = posbias.get("alibi_learned", num_heads=2)
            >>> spec.check_params({"log_slopes": np.zeros(3), "extra": 1.0})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            posbias.errors.InvalidArgumentError: alibi_learned parameters: unexpected ['extra']; ...
        """
        label = self.name or type(self).__name__
        if not isinstance(params, Mapping):
            raise InvalidTypeError(
                f"{label} params must be a dict of arrays, got {type(params).__name__}."
            )
        expected = self.param_shapes()
        problems = []
        missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        if missing:
            problems.append(f"missing {missing}")
        if extra:
            problems.append(f"unexpected {extra}")
        values = {}  # NumPy-side values, checked by value below
        for key in sorted(set(expected) & set(params)):
            value = params[key]
            if _backends.detect(value) in (None, "numpy"):
                values[key] = value = real_array(f"{label} parameter {key!r}", value)
                shape = value.shape
            else:
                shape = tuple(shapes_of(value)) if shapes_of else tuple(value.shape)
            if shape != expected[key]:
                problems.append(f"{key!r} has shape {shape}, expected {expected[key]}")
        if problems:
            raise InvalidArgumentError(
                f"{label} parameters: "
                + "; ".join(problems)
                + f". Expected {expected} (see spec.param_shapes())."
            )
        bad = []
        if values:  # NumPy values (native tensors are the frameworks' own, checked on load)
            with np.errstate(over="ignore"):  # frameworks hold parameters in float32
                bad = sorted(
                    k for k, v in values.items() if not np.isfinite(np.asarray(v, np.float32)).all()
                )
        if bad:
            raise InvalidArgumentError(
                f"{label} parameters {bad} hold NaN, infinite or beyond-float32 values; "
                "parameters must be finite in float32."
            )
        self.validate_param_values(values)

    def validate_param_values(self, params: Mapping[str, np.ndarray]) -> None:
        """Reject parameter values a variant cannot use (a hook; finiteness is checked already).

        ``params`` holds the entries given as NumPy arrays (float64). A variant
        overrides it only for states that no training can reach: any state an
        optimiser can produce must load (constrain values in ``compute``).
        """

    def grid_width(self) -> int:
        """Grid width used to map token indices to (row, col) (2-D variants)."""
        raise InvalidArgumentError(
            f"{type(self).__name__} needs 2-D positions: pass q_pos/k_pos as (L, 2) "
            "(row, col) arrays, or set grid= to map token indices to a grid."
        )
