"""posbias's exception hierarchy.

Every error posbias raises on bad input derives from :class:`PosBiasError`, so
``except posbias.PosBiasError`` catches all of them. Subclasses also derive from
the matching built-in (``ValueError``, ``TypeError``, ``KeyError``,
``ImportError``) so generic handlers keep working.

Messages say what was wrong, what was expected and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "ConfigError",
    "DistributedError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "PosBiasError",
    "RegistryError",
    "ResourceError",
    "UnknownBiasError",
]


class PosBiasError(Exception):
    """Base class of every error raised by posbias."""

    # Exception's own constructor (not ValueError's, TypeError's, ...): frameworks that
    # re-raise an error with more context keep its type then (TensorFlow's AutoGraph
    # does so only for this constructor; otherwise it wraps posbias errors in StagingError)
    __init__ = Exception.__init__


class InvalidArgumentError(PosBiasError, ValueError):
    """An argument has the right type but an unusable value (negative, NaN, ...)."""


class InvalidTypeError(PosBiasError, TypeError):
    """An argument has the wrong type (a float where an int is needed, ...)."""


class UnknownBiasError(PosBiasError, KeyError):
    """A bias name is not registered. The message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RegistryError(PosBiasError, ValueError):
    """Registering a bias failed (bad name, name taken, not a BiasSpec)."""


class ConfigError(PosBiasError, ValueError):
    """A bias configuration cannot be turned back into a spec."""


class BackendError(PosBiasError, ValueError):
    """Arrays of different frameworks mixed, an unknown backend or dtype."""


class BackendUnavailableError(PosBiasError, ImportError):
    """A framework is not installed; the message names the pip extra."""


class ResourceError(PosBiasError, MemoryError):
    """A request would need more memory than the machine has."""


class DistributedError(PosBiasError, RuntimeError):
    """Ranks of a process group disagree (shapes, options) or no group is set up.

    Raised on every rank alike, so no rank is left waiting in a collective.
    """
