"""The bias registry: names → :class:`~posbias.spec.BiasSpec` subclasses.

* :func:`register` takes an explicit name (``"alibi"``, or ``"ns/name"`` for
  third-party namespaces); a taken name is an error unless ``overwrite=True``.
* :func:`get` builds a spec by name; unknown names raise an error listing the
  closest registered names.
* Third-party packages publish variants through the entry-point group
  ``posbias.biases`` (entry-point name = bias name, value =
  ``"package.module:ClassName"``). They are loaded lazily, on the first lookup
  that needs them, never at ``import posbias``.
* :func:`from_config` only resolves registered names: no dotted import paths,
  no pickle, no eval.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from types import MappingProxyType
from typing import Any, TypeVar

from .errors import ConfigError, InvalidTypeError, RegistryError, UnknownBiasError
from .spec import BiasSpec

__all__ = ["ENTRY_POINT_GROUP", "from_config", "get", "list_biases", "register", "registered"]

ENTRY_POINT_GROUP = "posbias.biases"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*(/[a-z0-9][a-z0-9_.\-]*)?$")

_registry: dict[str, type[BiasSpec]] = {}
_plugin_errors: dict[str, str] = {}
_plugins_loaded = False

S = TypeVar("S", bound=type[BiasSpec])


def register(name: str, *, overwrite: bool = False) -> Callable[[S], S]:
    """Class decorator registering a :class:`BiasSpec` subclass under ``name``.

    Names are lower case: letters, digits, ``_ . -``, with at most one ``/``
    separating a namespace (``"myorg/linear_window"``).

    Example:
        >>> import posbias
        >>> @posbias.register("doc/per_head_linear")
        ... class PerHeadLinear(posbias.BiasSpec):
        ...     toeplitz = True
        ...     def compute(self, xp, q_pos, k_pos, heads, params):
        ...         slope = xp.constant(heads + 1.0)[:, None, None]  # 1, 2, ...
        ...         return slope * xp.float(-xp.abs(k_pos - q_pos))[..., None, :, :]
        >>> posbias.get("doc/per_head_linear", num_heads=2).bias(q_len=1, k_len=3).tolist()
        [[[-2.0, -1.0, 0.0]], [[-4.0, -2.0, 0.0]]]
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(
            f"invalid bias name {name!r}: use lower-case letters, digits, '_', '.', '-', "
            "optionally one 'namespace/' prefix, e.g. 'myorg/linear_window'."
        )

    def decorator(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, BiasSpec)):
            raise RegistryError(f"@register({name!r}) decorates BiasSpec subclasses, got {cls!r}.")
        if cls.compute is BiasSpec.compute:
            raise RegistryError(
                f"{cls.__qualname__} does not implement compute(xp, q_pos, k_pos, heads, params), "
                "the one method a bias variant defines (docs/extending.md)."
            )
        if name in _registry and not overwrite and _registry[name] is not cls:
            raise RegistryError(
                f"bias name {name!r} is already registered to "
                f"{_registry[name].__module__}.{_registry[name].__qualname__}; pick another "
                "name or pass overwrite=True."
            )
        if cls.__dict__.get("name") not in (None, name):
            raise RegistryError(
                f"{cls.__qualname__} is already registered as {cls.__dict__['name']!r}; "
                "subclass it to register a second name."
            )
        cls.name = name
        _registry[name] = cls
        return cls

    return decorator


#: first lookups from several threads load the plugins once; the others wait for it
_plugin_lock = threading.RLock()
_loading = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    global _loading
    with _plugin_lock:
        if _plugins_loaded or _loading:  # loaded meanwhile, or a plugin looks a name up
            return
        _loading = True
        try:
            _load_entry_points()
        finally:
            _loading = False
        _plugins_loaded = True  # only once every plugin is registered


def _load_entry_points() -> None:
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = entry.load()
        except Exception as exc:  # a broken plugin must not break posbias
            _plugin_errors[entry.name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"posbias plugin {entry.name!r} ({entry.value}) failed to load: {exc}",
                stacklevel=3,
            )
            continue
        if entry.name in _registry:
            if _registry[entry.name] is not obj:
                warnings.warn(
                    f"posbias plugin {entry.name!r} ({entry.value}) is ignored: the name "
                    "is already registered.",
                    stacklevel=3,
                )
            continue
        try:
            register(entry.name)(obj)
        except RegistryError as exc:
            _plugin_errors[entry.name] = str(exc)


def _lookup(name: str) -> type[BiasSpec]:
    if not isinstance(name, str):
        raise InvalidTypeError(f"bias name must be a string, got {type(name).__name__}.")
    if name not in _registry:
        _load_plugins()
    if name in _registry:
        return _registry[name]
    if name in _plugin_errors:
        raise UnknownBiasError(
            f"bias {name!r} comes from a plugin that failed to load: {_plugin_errors[name]}"
        )
    lower = {n.lower(): n for n in _registry}
    close = [
        lower[n] for n in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.5)
    ]
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownBiasError(
        f"unknown bias {name!r}.{hint} Registered: {', '.join(sorted(_registry))}."
    )


def _check_keywords(cls: type[BiasSpec], name: str, params: Mapping[str, Any], what: str):
    allowed = cls.parameter_names()
    extra = sorted(set(params) - set(allowed))
    missing = sorted(set(cls.required_parameters()) - set(params))
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"unexpected {what} {extra}")
        if missing:
            parts.append(f"missing {what} {missing}")
        error = ConfigError if what == "keys" else InvalidTypeError
        raise error(f"bias {name!r}: {' and '.join(parts)}; its parameters are {list(allowed)}.")


def get(name: str, **params: Any) -> BiasSpec:
    """Build the spec registered as ``name`` with hyper-parameters ``params``.

    Example:
        >>> import posbias
        >>> posbias.get("alibi", num_heads=12).slopes.shape
        (12,)
    """
    cls = _lookup(name)
    _check_keywords(cls, name, params, "parameters")
    return cls(**params)


def list_biases(pattern: str = "*") -> list[str]:
    """Sorted registered names matching a glob ``pattern`` (e.g. ``"alibi*"``).

    Example:
        >>> import posbias
        >>> posbias.list_biases("alibi")
        ['alibi']
    """
    _load_plugins()
    return sorted(n for n in _registry if fnmatch.fnmatchcase(n, pattern))


def registered() -> Mapping[str, type[BiasSpec]]:
    """A read-only view ``{name: class}`` of everything registered."""
    _load_plugins()
    return MappingProxyType(_registry)


def from_config(config: Mapping[str, Any]) -> BiasSpec:
    """Rebuild a spec from :meth:`BiasSpec.to_config` output (e.g. loaded from JSON).

    Only registered names resolve; unknown names, unknown or missing keys and
    invalid values raise :class:`~posbias.errors.PosBiasError` subclasses.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"a bias config is a mapping, got {type(config).__name__}.")
    if "name" not in config:
        raise ConfigError(
            f"a bias config needs a 'name' key, got keys {sorted(config)}; "
            "create configs with spec.to_config()."
        )
    params = {k: v for k, v in config.items() if k != "name"}
    cls = _lookup(config["name"])
    _check_keywords(cls, config["name"], params, "keys")
    return cls(**params)


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Context manager restoring the registry on exit (for tests)."""
    global _plugins_loaded
    saved = dict(_registry), dict(_plugin_errors), _plugins_loaded
    names = {cls: cls.__dict__.get("name") for cls in _registry.values()}
    try:
        yield
    finally:
        _registry.clear()
        _registry.update(saved[0])
        _plugin_errors.clear()
        _plugin_errors.update(saved[1])
        _plugins_loaded = saved[2]
        for cls, old in names.items():
            cls.name = old
