"""The one reading of ``bias=``: every attention function, layer and distributed path uses it.

A ``bias=`` argument may be

* ``None`` — no bias;
* a registered name (``"alibi"``) — built with the caller's head count;
* a :class:`~posbias.BiasSpec`;
* a config dict (``spec.to_config()``, e.g. from JSON/YAML);
* a ``PositionalBias`` module of any framework (its learnable parameters are
  read at every call, so gradients reach them);
* a callable ``bias(q_pos=, k_pos=, dtype=) -> (h, Lq, Lk) | (B, h, Lq, Lk)``.

:func:`read_bias` turns each into a :class:`BiasArg` — the spec, where the
learnable parameters come from, and the *global* heads the caller holds — and
checks that the bias has exactly as many heads as the queries (a bias of the
wrong head count is never broadcast over heads). Head-parallel kernels take a
slice of the heads with :meth:`BiasArg.for_heads` and keep the spec, so the
Toeplitz (Hankel table) and FlashAttention fast paths still apply.

    >>> from posbias._core.bias_arg import read_bias
    >>> arg = read_bias("alibi", 8)
    >>> arg.spec.num_heads, arg.width, arg.toeplitz
    (8, 8, True)
    >>> read_bias({"name": "alibi", "num_heads": 4}, 8)
    Traceback (most recent call last):
    ...
    posbias.errors.InvalidArgumentError: the bias has 4 heads but the queries have 8: ...
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import backends
from ..errors import InvalidArgumentError, InvalidTypeError
from ..registry import from_config, get
from ..spec import BiasSpec
from .checks import check_heads

_FORMS = (
    "a registered name such as 'alibi', a BiasSpec, its config dict, a PositionalBias "
    "module, a callable bias(q_pos=, k_pos=, dtype=) or None"
)


@dataclasses.dataclass(frozen=True, eq=False)
class BiasArg:
    """A read ``bias=`` argument (see the module docstring).

    Attributes:
        spec: the bias's spec; None for a plain callable.
        heads: global head indices this caller holds (None: all of the spec's).
        module: a ``PositionalBias`` module whose parameters are read per call.
        params: explicit parameters (native tensors), overriding the module's.
        fn: a plain callable bias (no spec).
        width: the number of heads the bias yields (the caller's query heads).
    """

    spec: BiasSpec | None
    width: int
    heads: tuple[int, ...] | None = None
    module: Any = None
    params: Any = None
    fn: Any = None

    # ------------------------------------------------------------ properties
    @property
    def toeplitz(self) -> bool:
        """The bias depends on ``j - i`` only (1-D positions): per-diagonal fast paths apply."""
        return self.spec is not None and self.spec.toeplitz and self.spec.position_dims == 1

    @property
    def cacheable(self) -> bool:
        """Its values are a pure function of (spec, heads, positions): no parameters that train."""
        return self.spec is not None and self.module is None and self.params is None

    @property
    def key(self) -> tuple[Any, ...]:
        """A hashable identity of the values (for caches): spec and heads."""
        return (self.spec, self.heads)

    @property
    def points(self) -> bool:
        """A 2-D (row, col) bias."""
        return self.spec is not None and self.spec.position_dims == 2

    def symmetric_slopes(self) -> Any:
        """The slopes of this caller's heads when the bias is ``-m_h·|i - j|``, else None."""
        if self.spec is None or not self.cacheable:
            return None
        slopes = self.spec.symmetric_slopes()
        if slopes is None or self.heads is None:
            return slopes
        return slopes[list(self.heads)]

    # --------------------------------------------------------------- derived
    def for_heads(self, heads: Any) -> BiasArg:
        """The bias of the global heads ``heads`` (e.g. ``range(4, 8)``) of this one."""
        if self.spec is None:
            raise InvalidTypeError(
                "head-parallel attention selects heads by global index, which needs a bias "
                "with a spec (a name, a BiasSpec, its config or a PositionalBias module), not "
                "a plain callable."
            )
        index = check_heads(heads, self.spec.num_heads)
        if self.heads is not None:
            index = [self.heads[i] for i in index]
        chosen = tuple(int(h) for h in index)
        return dataclasses.replace(self, heads=chosen, width=len(chosen))

    def with_params(self, params: Any) -> BiasArg:
        """The same bias with explicit parameters (e.g. replicated into ``shard_map``)."""
        return dataclasses.replace(self, params=params or None, module=None)

    def current_params(self) -> Any:
        """The native learnable parameters to use now (None for parameter-free biases)."""
        if self.params is not None:
            return self.params
        if self.module is not None:
            return self.module.native_params()
        return None

    # ---------------------------------------------------------------- values
    def tile(self, xp: Any, q_pos: Any, k_pos: Any, dtype: str, batch: int | None = None) -> Any:
        """The bias of queries at ``q_pos`` and keys at ``k_pos``: ``(h, Lq, Lk)`` or batched.

        Raises:
            InvalidTypeError: a callable that does not take ``(q_pos=, k_pos=, dtype=)`` or
                returns something that is not a floating array of this framework.
            InvalidArgumentError: a callable's output of another shape than
                ``(h, Lq, Lk)`` / ``(B, h, Lq, Lk)`` (it is never broadcast across heads).
        """
        if self.fn is not None:
            return self._call(xp, q_pos, k_pos, dtype, batch)
        return self.spec.bias(
            q_pos=q_pos,
            k_pos=k_pos,
            heads=self.heads,
            dtype=dtype,
            params=self.current_params(),
            backend=xp.name,
        )

    def _call(self, xp: Any, q_pos: Any, k_pos: Any, dtype: str, batch: int | None) -> Any:
        try:
            inspect.signature(self.fn).bind(q_pos=q_pos, k_pos=k_pos, dtype=dtype)
        except (TypeError, ValueError):
            raise InvalidTypeError(
                "a bias callable must accept keyword arguments bias(q_pos=, k_pos=, dtype=) "
                f"and return (h, Lq, Lk) or (B, h, Lq, Lk) values; {self.fn!r} does not."
            ) from None
        values = self.fn(q_pos=q_pos, k_pos=k_pos, dtype=dtype)
        kind = backends.check_framework(xp, "the bias callable's output", values)
        if kind is None:
            raise InvalidTypeError(
                f"the bias callable must return a {xp.name} tensor or a NumPy array, got "
                f"{type(values).__name__}."
            )
        if kind != xp.name:
            values = xp.from_numpy(np.asarray(values))
        shape, kind = xp.shape(values), xp.dtype_name(values.dtype)
        q_len, k_len = xp.shape(q_pos)[-1], xp.shape(k_pos)[-1]
        wanted = [(self.width, q_len, k_len)]
        if batch is not None:
            wanted.append((batch, self.width, q_len, k_len))
        if shape not in wanted or kind not in ("float16", "bfloat16", "float32", "float64"):
            raise InvalidArgumentError(
                f"the bias callable returned shape {shape} and dtype {kind}; expected "
                f"{' or '.join(map(str, wanted))}, floating: one bias per query head "
                f"({self.width} heads), query and key, never broadcast."
            )
        if xp.is_concrete(values):  # while tracing, NaN or +inf give NaN outputs (loud)
            found = xp.to_numpy(values).astype(np.float64)
            if np.isnan(found).any() or np.isposinf(found).any():
                raise InvalidArgumentError(
                    "the bias callable returned NaN or +inf (a bias is added to the scores; "
                    "-inf hides a pair)."
                )
        return xp.cast(values, dtype)

    def diagonals(self, xp: Any, d_min: int, d_max: int, dtype: str) -> Any:
        """``(h, n)``: the values ``F(d)`` of a Toeplitz bias for ``d = d_min .. d_max``."""
        d = xp.arange(d_max - d_min + 1) + d_min
        return self.tile(xp, xp.arange(1) * 0, d, dtype)[:, 0, :]


def read_bias(bias: Any, num_heads: int | None) -> BiasArg | None:
    """Read an attention call's ``bias=`` for queries with ``num_heads`` heads.

    ``num_heads=None`` (only where no queries exist, e.g. a FlexAttention
    ``score_mod`` factory) skips the head-count check; a name then needs one.

    Raises:
        InvalidArgumentError: the bias has another head count than the queries.
        InvalidTypeError: ``bias`` is none of the accepted forms.
        UnknownBiasError, ConfigError: a bad name or config.
    """
    if bias is None:
        return None
    if isinstance(bias, BiasArg):
        check_count(bias.width, num_heads)
        return bias
    if isinstance(bias, str):
        if num_heads is None:
            raise InvalidArgumentError(f"give num_heads= to build the {bias!r} bias by name.")
        return BiasArg(get(bias, num_heads=num_heads), width=num_heads)
    if isinstance(bias, Mapping):
        bias = from_config(bias)
    if isinstance(bias, BiasSpec):
        check_count(bias.num_heads, num_heads)
        return BiasArg(bias, width=bias.num_heads)
    spec = getattr(bias, "spec", None)
    if isinstance(spec, BiasSpec) and callable(getattr(bias, "native_params", None)):
        check_count(spec.num_heads, num_heads)
        return BiasArg(spec, width=spec.num_heads, module=bias)
    if callable(bias) and num_heads is not None:
        return BiasArg(None, width=num_heads, fn=bias)
    raise InvalidTypeError(f"bias must be {_FORMS}; got {type(bias).__name__}.")


def spec_from(bias: Any, num_heads: int | None, hyper: Mapping[str, Any]) -> BiasSpec:
    """The spec a layer builds its ``PositionalBias`` from: a name (+ ``num_heads`` and
    hyper-parameters), a spec or a config dict, checked against ``num_heads``."""
    if isinstance(bias, str):
        if num_heads is None:
            raise InvalidArgumentError(f"give num_heads to build the {bias!r} bias.")
        return get(bias, num_heads=num_heads, **hyper)
    if hyper:
        raise InvalidArgumentError(
            f"hyper-parameters {sorted(hyper)} go with a bias name, not with a "
            f"{type(bias).__name__}; put them in the spec or its config instead."
        )
    if isinstance(bias, Mapping):
        bias = from_config(bias)
    if isinstance(bias, BiasSpec):
        check_count(bias.num_heads, num_heads)
        return bias
    raise InvalidTypeError(
        f"bias must be a registered name, a BiasSpec or its config dict, got {type(bias).__name__}."
    )


def check_count(bias_heads: int, num_heads: int | None) -> None:
    if num_heads is not None and bias_heads != num_heads:
        raise InvalidArgumentError(
            f"the bias has {bias_heads} head{'s' * (bias_heads != 1)} but the queries have "
            f"{num_heads}: build the "
            f"bias with num_heads={num_heads}. A bias is per query head (also under "
            "grouped-query attention) and is never broadcast across heads."
        )
