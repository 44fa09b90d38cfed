"""Reading the ``bias=`` argument of attention functions and layers."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError, InvalidTypeError
from ..registry import get
from ..spec import BiasSpec


def resolve_bias(bias: Any, num_heads: int) -> Any:
    """A callable ``(q_pos=, k_pos=, dtype=) -> tensor`` or None."""
    if bias is None:
        return None
    if isinstance(bias, str):
        bias = get(bias, num_heads=num_heads)
    if isinstance(bias, BiasSpec):
        if bias.num_heads != num_heads:
            raise InvalidArgumentError(
                f"the bias has num_heads={bias.num_heads} but the queries have {num_heads} "
                "heads; the bias is per query head (also under grouped-query attention)."
            )
        return bias.bias
    if callable(bias):
        return bias
    raise InvalidTypeError(
        f"bias must be a registered name, a BiasSpec, a PositionalBias module or None, "
        f"got {type(bias).__name__}."
    )


def spec_of(bias: Any, num_heads: int) -> BiasSpec | None:
    """The ``BiasSpec`` behind a bias argument (name, spec or module), if any."""
    if isinstance(bias, str):
        return get(bias, num_heads=num_heads)
    if isinstance(bias, BiasSpec):
        return bias
    spec = getattr(bias, "spec", None)
    return spec if isinstance(spec, BiasSpec) else None


def module_params(bias: Any) -> dict | None:
    """The native learnable parameters of a ``PositionalBias`` module, or None otherwise."""
    native = getattr(bias, "native_params", None)
    return native() if callable(native) else None


def head_bias(bias: Any, num_heads: int, heads: Any, backend: str, params: Any = None) -> Any:
    """``bias_fn(q_pos=, k_pos=, dtype=)`` for the *global* heads ``heads``, or None.

    ``bias`` is a registered name, a ``BiasSpec`` or a ``PositionalBias`` module
    of any framework (its learnable parameters are read when called, so
    gradients reach them; ``params`` overrides them). Head-parallel kernels hold
    a slice of the heads and need that slice's slopes and table columns, not
    heads ``0..h-1``.
    """
    if bias is None:
        return None
    spec = spec_of(bias, num_heads)
    if spec is None:
        raise InvalidTypeError(
            "distributed attention needs a registered name, a BiasSpec or a PositionalBias "
            f"module as bias (its heads are selected by global index), got {type(bias).__name__}."
        )
    resolve_bias(spec, num_heads)  # the head-count check
    if spec.position_dims != 1:
        raise InvalidArgumentError(
            f"{spec.name} is a 2-D bias; distributed attention shards 1-D token positions. "
            "Use posbias attention on one device for 2-D biases."
        )
    module = None if isinstance(bias, (str, BiasSpec)) or params is not None else bias

    def bias_fn(q_pos: Any, k_pos: Any, dtype: Any) -> Any:
        values = module.native_params() if module is not None else params
        return spec.bias(
            q_pos=q_pos, k_pos=k_pos, heads=heads, dtype=dtype, params=values, backend=backend
        )

    return bias_fn
