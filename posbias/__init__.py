"""posbias: additive attention positional biases, defined once, native everywhere.

    >>> import posbias
    >>> spec = posbias.get("alibi", num_heads=12)
    >>> spec.slopes.shape
    (12,)

Importing posbias imports no framework; ``spec.bias(..., backend="torch")`` (or
positions given as framework tensors) imports that framework on first use.
"""

from __future__ import annotations

from . import variants as _variants  # noqa: F401  (registers the built-in biases)
from .backends import available as available_backends
from .errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    DistributedError,
    InvalidArgumentError,
    InvalidTypeError,
    PosBiasError,
    RegistryError,
    ResourceError,
    UnknownBiasError,
)
from .registry import from_config, get, list_biases, register, registered
from .slopes import alibi_slopes, geometric_slopes
from .spec import BiasSpec
from .variants.alibi import Alibi, AlibiAsymmetric

__version__ = "0.1.0"

__all__ = [
    "Alibi",
    "AlibiAsymmetric",
    "BackendError",
    "BackendUnavailableError",
    "BiasSpec",
    "ConfigError",
    "DistributedError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "PosBiasError",
    "RegistryError",
    "ResourceError",
    "UnknownBiasError",
    "__version__",
    "alibi_slopes",
    "available_backends",
    "from_config",
    "geometric_slopes",
    "get",
    "list_biases",
    "register",
    "registered",
]
