"""Framework-free pieces of the layers: configuration, initial weights, the
multi-head attention forward pass and KV-cache updates.

Each framework module (``posbias.torch``, ``posbias.jax``,
``posbias.tensorflow``) keeps only what is idiomatic to it — parameters as
``nn.Linear`` / ``nnx.Linear`` / ``keras.layers.Dense``, state dicts,
serialisation — and calls :func:`mha_forward` with its projections.

Portable weights: ``{"q.kernel": (E, H·D), "q.bias": (H·D,), "k.kernel": (E, H_kv·D),
"k.bias", "v.kernel", "v.bias", "o.kernel": (H·D, E), "o.bias": (E,)}`` as
NumPy arrays (kernels in ``x @ kernel`` orientation); ``*.bias`` entries only
with ``use_bias=True``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import einops
import numpy as np

from .. import backends
from ..errors import InvalidArgumentError, InvalidTypeError
from ..spec import BiasSpec
from . import bias_arg, conventions, dispatch, problem
from .checks import check_int

PROJECTIONS = ("q", "k", "v", "o")


def make_spec(bias: Any, num_heads: int | None, hyper: Mapping[str, Any]) -> BiasSpec:
    """A spec from a name (+ ``num_heads`` and hyper-parameters), a config dict or a spec.

    The layers' reading of ``bias=`` (:func:`posbias._core.bias_arg.spec_from`):
    a spec or config of another head count than ``num_heads`` is an error.
    """
    return bias_arg.spec_from(bias, num_heads, hyper)


@dataclasses.dataclass(frozen=True)
class MHAConfig:
    """Validated hyper-parameters of a multi-head attention layer."""

    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    use_bias: bool
    implementation: str = "auto"
    block_size: int | None = None

    @classmethod
    def create(
        cls,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        causal: bool = False,
        use_bias: bool = True,
        implementation: str = "auto",
        block_size: int | None = None,
    ) -> MHAConfig:
        embed_dim = check_int("embed_dim", embed_dim, minimum=1)
        num_heads = check_int("num_heads", num_heads, minimum=1)
        num_kv_heads = check_int(
            "num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads, minimum=1
        )
        if num_heads % num_kv_heads:
            raise InvalidArgumentError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} "
                "(grouped-query attention shares each K/V head among a group of query heads)."
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise InvalidArgumentError(
                    f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                    "pick divisible sizes or pass head_dim= explicitly."
                )
            head_dim = embed_dim // num_heads
        head_dim = check_int("head_dim", head_dim, minimum=1)
        return cls(
            embed_dim,
            num_heads,
            num_kv_heads,
            head_dim,
            conventions.check_bool("causal", causal),
            conventions.check_bool("use_bias", use_bias),
            dispatch.check_implementation(implementation),
            dispatch.check_block_size(block_size),
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Portable weight names and shapes."""
        e, q, kv = self.embed_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        out = {"q.kernel": (e, q), "k.kernel": (e, kv), "v.kernel": (e, kv), "o.kernel": (q, e)}
        if self.use_bias:
            out.update({"q.bias": (q,), "k.bias": (kv,), "v.bias": (kv,), "o.bias": (e,)})
        return out


def init_weights(cfg: MHAConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded NumPy initial weights (Glorot-uniform kernels, zero biases), float32.

    Every framework initialises from this, so equal seeds give equal layers.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in cfg.shapes().items():
        if name.endswith(".kernel"):
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            weights[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
        else:
            weights[name] = np.zeros(shape, dtype=np.float32)
    return weights


def check_weights(cfg: MHAConfig, weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate a portable weight dict: names and shapes; errors list every problem."""
    expected = cfg.shapes()
    problems = []
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    arrays = {}
    for name in sorted(set(expected) & set(weights)):
        array = np.asarray(weights[name])
        if array.shape != expected[name]:
            problems.append(f"{name} has shape {array.shape}, expected {expected[name]}")
        arrays[name] = array
    if problems:
        raise InvalidArgumentError("cannot load weights: " + "; ".join(problems) + ".")
    return arrays


class BiasParamsMixin:
    """Framework-free half of every ``PositionalBias``: its learnable parameters.

    A module sets ``self.spec`` and implements ``_read_param(name)`` (native
    value) and ``_write_param(name, array)``; parameters are created from
    ``spec.init_params(seed)`` (seeded NumPy), so every framework starts from
    identical values.
    """

    spec: BiasSpec

    def _read_param(self, name: str) -> Any:
        raise NotImplementedError

    def _write_param(self, name: str, value: np.ndarray) -> None:
        raise NotImplementedError

    def native_params(self) -> dict[str, Any] | None:
        """The parameters as this framework's tensors (None for parameter-free biases)."""
        if not self.spec.learnable:
            return None
        return {name: self._read_param(name) for name in self.spec.param_shapes()}

    def export_params(self) -> dict[str, np.ndarray]:
        """Parameters as a portable ``dict[str, numpy.ndarray]`` (float32)."""
        params = self.native_params() or {}
        return {
            name: np.array(_to_numpy(value), dtype=np.float32) for name, value in params.items()
        }

    def load_params(self, params: Mapping[str, Any]) -> None:
        """Load a portable parameter dict (from any framework's ``export_params``).

        Missing, unexpected and mis-shaped entries are listed in one error.
        """
        arrays = {k: np.asarray(_to_numpy(v), dtype=np.float64) for k, v in params.items()}
        self.spec.check_params(arrays)
        for name, value in arrays.items():
            self._write_param(name, value.astype(np.float32))


def _to_numpy(value: Any) -> np.ndarray:
    return backends.to_numpy(value)


class PortableWeightsMixin:
    """Framework-free half of every ``MultiHeadAttention``: portable weight I/O.

    A layer sets ``self.mha_config`` and implements ``_read_projection(name)``
    → ``(kernel, bias or None)`` as NumPy-convertible arrays in ``x @ kernel``
    orientation, and ``_write_projection(name, kernel, bias)``.
    """

    mha_config: MHAConfig

    def _read_projection(self, name: str) -> tuple[Any, Any]:
        raise NotImplementedError

    def _write_projection(self, name: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        raise NotImplementedError

    def portable_weights(self) -> dict[str, np.ndarray]:
        """Weights as ``{"q.kernel": (E, H·D), "q.bias": (H·D,), ...}`` float32 NumPy arrays."""
        out = {}
        for name in PROJECTIONS:
            kernel, bias = self._read_projection(name)
            out[f"{name}.kernel"] = np.array(kernel, dtype=np.float32)
            if bias is not None:
                out[f"{name}.bias"] = np.array(bias, dtype=np.float32)
        return out

    def load_portable_weights(self, weights: Mapping[str, Any]) -> None:
        """Load weights exported by any framework's ``portable_weights()``.

        Missing, unexpected and mis-shaped entries are all listed in one error.
        """
        arrays = check_weights(self.mha_config, weights)
        for name in PROJECTIONS:
            self._write_projection(name, arrays[f"{name}.kernel"], arrays.get(f"{name}.bias"))


def mha_forward(
    xp,
    cfg: MHAConfig,
    project: Callable[[str, Any], Any],
    x: Any,
    bias: Any,
    *,
    key_mask: Any = None,
    segment_ids: Any = None,
    cache: problem.KVCache | None = None,
    removed: Mapping[str, Any] | None = None,
) -> Any:
    """Self-attention forward pass; returns ``out`` or ``(out, new_cache)``.

    ``removed``: keyword arguments the layer's call does not name (an error
    that explains each, e.g. ``key_padding_mask`` → ``key_mask``).
    """
    conventions.reject_unknown(
        "MultiHeadAttention", removed or {}, ("key_mask", "segment_ids", "cache")
    )
    if cache is not None and not isinstance(cache, problem.KVCache):
        raise InvalidTypeError(
            f"cache must be the KVCache that layer.init_cache() returns (or the cache a "
            f"previous call returned), got {type(cache).__name__}."
        )
    shape = xp.shape(x)
    if len(shape) != 3 or shape[-1] != cfg.embed_dim:
        raise InvalidArgumentError(
            f"input must have shape (B, L, embed_dim={cfg.embed_dim}), got {shape}."
        )
    q, k, v = (
        einops.rearrange(project(n, x), "b l (h d) -> b h l d", d=cfg.head_dim)
        for n in ("q", "k", "v")
    )
    if cache is None:
        out = dispatch.attend(
            xp,
            q,
            k,
            v,
            bias,
            causal=cfg.causal,
            key_mask=key_mask,
            segment_ids=segment_ids,
            implementation=cfg.implementation,
            block_size=cfg.block_size,
        )
        new_cache = None
    else:
        if not cfg.causal:
            raise InvalidArgumentError("KV-cache decoding needs a causal layer (causal=True).")
        if segment_ids is not None:
            raise InvalidArgumentError("segment_ids are not supported with a KV cache.")
        offset = cache.length
        new_cache = cache_write(xp, cache, k, v, key_mask)
        out = dispatch.attend(
            xp,
            q,
            new_cache.k,
            new_cache.v,
            bias,
            causal=True,
            q_offset=offset,
            key_mask=new_cache.valid,
            implementation=cfg.implementation,
            block_size=cfg.block_size,
        )
    out = project("o", einops.rearrange(out, "b h l d -> b l (h d)"))
    return out if cache is None else (out, new_cache)


def init_cache(xp, cfg: MHAConfig, batch_size: int, capacity: int, dtype: str) -> problem.KVCache:
    """An empty cache for ``batch_size`` sequences of up to ``capacity`` tokens."""
    batch_size = check_int("batch_size", batch_size, minimum=1)
    capacity = check_int("capacity", capacity, minimum=1)
    shape = (batch_size, cfg.num_kv_heads, capacity, cfg.head_dim)
    return problem.KVCache(
        k=xp.zeros(shape, dtype),
        v=xp.zeros(shape, dtype),
        valid=xp.zeros((batch_size, capacity), "bool"),
        length=xp.as_int(xp.zeros((batch_size,), "int32")),
    )


def cache_write(xp, cache: problem.KVCache, k: Any, v: Any, valid: Any) -> problem.KVCache:
    """Write ``T`` new keys/values ``(B, H_kv, T, D)`` at each sequence's next slots."""
    batch, heads, capacity, dim = xp.shape(cache.k)
    new_batch, new_heads, steps, new_dim = xp.shape(k)
    if new_batch != batch:
        raise InvalidArgumentError(
            f"the cache was built for batch size {batch}, the input has {new_batch}; "
            "create a cache with init_cache(batch_size=...)."
        )
    if (new_heads, new_dim) != (heads, dim):
        raise InvalidArgumentError(
            f"the cache holds {heads} heads of dim {dim}, the layer produced {new_heads} of "
            f"dim {new_dim}; was the cache made by another layer?"
        )
    if xp.is_concrete(cache.length):
        filled = int(np.max(xp.to_numpy(cache.length)))
        if filled + steps > capacity:
            raise InvalidArgumentError(
                f"decoding past the cache capacity: {filled} slots used + {steps} new tokens "
                f"> capacity {capacity}; create the cache with a larger capacity."
            )
    if valid is None:
        valid = xp.zeros((batch, steps), "int32") == 0
    else:
        valid = problem.check_mask(xp, "key_mask", valid, batch, steps, boolean=True)
    rel = xp.arange(capacity) - cache.length[:, None]  # (B, capacity): slot - filled
    onehot = rel[..., None] == xp.arange(steps)  # (B, capacity, T)
    writing = (rel >= 0) & (rel < steps)
    dtype = xp.dtype_name(cache.k.dtype)
    weights = xp.cast(onehot, dtype)
    new_k = xp.einsum("bst,bhtd->bhsd", weights, xp.cast(k, dtype))
    new_v = xp.einsum("bst,bhtd->bhsd", weights, xp.cast(v, dtype))
    hit_valid = xp.sum(xp.as_int(onehot & valid[:, None, :]), -1) > 0
    where_heads = writing[:, None, :, None]
    return problem.KVCache(
        k=xp.where(where_heads, new_k, cache.k),
        v=xp.where(where_heads, new_v, cache.v),
        valid=xp.where(writing, hit_valid, cache.valid),
        length=cache.length + steps,
    )
