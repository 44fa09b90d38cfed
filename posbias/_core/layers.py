"""Framework-free pieces of the layers: configuration, initial weights, the
multi-head attention forward pass and KV-cache updates.

Each framework module (``posbias.torch``, ``posbias.jax``,
``posbias.tensorflow``) keeps only what is idiomatic to it — parameters as
``nn.Linear`` / ``nnx.Linear`` / ``keras.layers.Dense``, state dicts,
serialisation — and calls :func:`mha_forward` with its projections.

Portable weights: ``{"q.kernel": (E, H·D), "q.bias": (H·D,), "k.kernel": (E, H_kv·D),
"k.bias", "v.kernel", "v.bias", "o.kernel": (H·D, E), "o.bias": (E,)}`` as
NumPy arrays (kernels in ``x @ kernel`` orientation; ``*.bias`` entries only
with ``use_bias=True``), plus ``"positional_bias.<name>"`` for each learnable
parameter of the layer's positional bias, and with a forget gate
(``gate="forgetting"`` or ``"cable"``) ``"gate.kernel"`` ``(E, H)`` and
``"gate.bias"`` ``(H,)`` (``(E, 2·H)`` and ``(2·H,)`` for a bidirectional layer:
the first ``H`` columns make ``log_gates``, the last ``H`` ``log_gates_after``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import einops
import numpy as np

from .. import backends, registry
from ..errors import InvalidArgumentError, InvalidTypeError, PosBiasError
from ..spec import BiasSpec
from . import bias_arg, conventions, dispatch, problem
from . import weights as _weights
from .checks import check_int, check_rate, real_array

PROJECTIONS = ("q", "k", "v", "o")
#: the ``gate=`` values of the layers: FoX's forget gate and CABLE's bias
GATES = ("forgetting", "cable")
#: the standard deviation of the gate projection's initial kernel (FoX's and CABLE's code)
GATE_INIT_STD = 0.02


def check_gate(gate: Any) -> str | None:
    """``gate`` if it is None or one of :data:`GATES`, else a clear error."""
    if gate is None or (isinstance(gate, str) and gate in GATES):
        return gate
    raise InvalidArgumentError(
        f"gate must be one of {list(GATES)} or None (FoX's forget gate logsigmoid(x·W + b), "
        f"CABLE's -softplus(x·W + b), or no gate), got {gate!r}."
    )


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
    dropout: float = 0.0  # attention dropout: the probability of dropping a weight
    gate: str | None = None  # data-dependent forget gate: one of GATES or None

    @property
    def gate_heads(self) -> int:
        """Outputs of the gate projection: ``H`` (causal), ``2·H`` (``g``, ``g'``), 0 (none)."""
        if self.gate is None:
            return 0
        return self.num_heads * (1 if self.causal else 2)

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
        dropout: Any = 0.0,
        dropout_name: str = "dropout",
        gate: Any = None,
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
            check_rate(dropout_name, dropout),
            check_gate(gate),
        )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Portable weight names and shapes."""
        e, q, kv = self.embed_dim, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        out = {"q.kernel": (e, q), "k.kernel": (e, kv), "v.kernel": (e, kv), "o.kernel": (q, e)}
        if self.use_bias:
            out.update({"q.bias": (q,), "k.bias": (kv,), "v.bias": (kv,), "o.bias": (e,)})
        if self.gate is not None:  # the gate projection always has a bias (b_f of both papers)
            out.update({"gate.kernel": (e, self.gate_heads), "gate.bias": (self.gate_heads,)})
        return out


def init_weights(cfg: MHAConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded NumPy initial projection weights (Glorot-uniform kernels, zero biases), float32.

    Every framework initialises from this, so equal seeds give equal layers. The
    gate projection (``gate=``) draws its kernel from ``N(0, 0.02²)`` with a zero
    bias, as the official code of FoX (zhixuan-lin/forgetting-transformer) and
    CABLE (axiomlab/Cable) initialise it, from its own stream of the seed (the
    other projections are those of a layer without gate).
    """
    shapes = cfg.shapes()
    gate = {name: shapes.pop(name) for name in ("gate.kernel", "gate.bias") if name in shapes}
    weights = init_from_shapes(shapes, seed)
    if gate:
        rng = np.random.default_rng([check_seed(seed), 1])
        kernel = rng.normal(0.0, GATE_INIT_STD, size=gate["gate.kernel"])
        weights["gate.kernel"] = kernel.astype(np.float32)
        weights["gate.bias"] = np.zeros(gate["gate.bias"], np.float32)
    return weights


def init_from_shapes(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`init_weights` for explicit portable ``shapes`` (``"<name>.kernel"``: 2-D,
    Glorot-uniform in the order given; ``"<name>.bias"``: zeros), float32.

    Layers whose projections are not described by an :class:`MHAConfig` (Keras'
    ``key_dim``/``value_dim``/``output_shape``) use it; for the shapes of an
    ``MHAConfig`` it gives exactly :func:`init_weights`'s values.
    """
    rng = np.random.default_rng(check_seed(seed))
    weights = {}
    for name, shape in shapes.items():
        if name.endswith(".kernel"):
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            weights[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
        else:
            weights[name] = np.zeros(shape, dtype=np.float32)
    return weights


def layer_bias(bias: Any, num_heads: int, module_class: type, make: Callable[[], Any]) -> Any:
    """A layer's ``positional_bias``: None, a shared ``PositionalBias`` of this framework
    (checked against ``num_heads``), or a new one from a name, spec or config (``make``).

    A 2-D bias must say how token slots map to its grid here, not at the first call.
    """
    if bias is None:
        return None
    if isinstance(bias, module_class):
        bias_arg.check_count(bias.spec.num_heads, num_heads)
        module = bias
    else:
        module = make()
    if module.spec.position_dims == 2:
        module.spec.grid_width()  # raises when the variant needs grid=
    return module


def check_seed(seed: Any) -> int:
    """A seed of the NumPy initialisation: a non-negative int (not a bool, not None)."""
    return check_int("seed", seed, minimum=0)


def check_weights(
    expected: Mapping[str, tuple[int, ...]], weights: Any, what: str = "weights"
) -> dict[str, np.ndarray]:
    """A portable dict as float64 NumPy arrays, checked against ``expected`` names and shapes.

    Raises:
        InvalidTypeError: ``weights`` is not a mapping, or an entry is not numeric.
        InvalidArgumentError: one error listing every missing, unexpected and
            mis-shaped entry.
    """
    if not isinstance(weights, Mapping):
        raise InvalidTypeError(
            f"{what} must be a dict of arrays (name -> array), got {type(weights).__name__}."
        )
    problems = []
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    arrays = {}
    for name in sorted(set(expected) & set(weights)):
        value = weights[name]
        array = real_array(f"{what} entry {name!r}", _to_numpy(value))
        if array.shape != tuple(expected[name]):
            problems.append(f"{name} has shape {array.shape}, expected {tuple(expected[name])}")
        with np.errstate(over="ignore"):  # layers hold weights in float32
            if not np.isfinite(array.astype(np.float32)).all():
                problems.append(f"{name} holds NaN, infinite or beyond-float32 values")
        arrays[name] = array
    if problems:
        raise InvalidArgumentError(f"cannot load {what}: " + "; ".join(problems) + ".")
    return arrays


def _to_numpy(value: Any) -> np.ndarray:
    return backends.to_numpy(value)


class BiasParamsMixin:
    """Framework-free half of every ``PositionalBias``: its learnable parameters.

    A module sets ``self.spec`` and implements ``_read_param(name)`` (native
    value) and ``_write_param(name, array)`` (``array``: float32 NumPy); it
    creates its parameters from :meth:`_initial_params` (``spec.init_params(seed)``,
    seeded NumPy, checked and cast to float32), so every framework starts from
    identical values. On the forward path only :meth:`native_params` runs: it
    reads the parameters by the names of ``spec.param_shapes()`` (declared, no
    NumPy).
    """

    spec: BiasSpec

    def _read_param(self, name: str) -> Any:
        raise NotImplementedError

    def _write_param(self, name: str, value: np.ndarray) -> None:
        raise NotImplementedError

    def _initial_params(self, seed: Any) -> dict[str, np.ndarray]:
        """``spec.init_params(seed)`` checked against ``spec.param_shapes()``, as float32."""
        params = self.spec.init_params(check_seed(seed))
        self.spec.check_params(params)  # a variant whose init disagrees with its shapes
        return {name: np.asarray(value, dtype=np.float32) for name, value in params.items()}

    def _bias(
        self,
        backend: str,
        q_len: Any,
        k_len: Any,
        q_pos: Any,
        k_pos: Any,
        q_offset: Any,
        k_offset: Any,
        heads: Any,
        dtype: Any,
        device: Any = None,
    ) -> Any:
        """The module's call: ``spec.bias(...)`` on ``backend`` with the module's parameters."""
        return self.spec.bias(
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
            params=self.native_params(),
        )

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

        Values are stored as float32. Nothing is written unless every entry is valid.

        Raises:
            InvalidTypeError: ``params`` is not a mapping or holds non-numeric values.
            InvalidArgumentError: one error listing missing, unexpected and
                mis-shaped entries; or NaN / infinite values.
        """
        self._write_params(self._checked_params(params))

    def _checked_params(self, params: Any) -> dict[str, np.ndarray]:
        label = f"{self.spec.name or type(self.spec).__name__} parameters"
        arrays = check_weights(self.spec.param_shapes(), params, label)
        self.spec.check_params(arrays)  # values: finite, and the variant's own rules
        return arrays

    def _write_params(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            self._write_param(name, np.asarray(value, dtype=np.float32))


#: prefix of the positional bias's parameters in portable layer weights
BIAS_PREFIX = "positional_bias."


def split_bias_keywords(bias: Any, bias_options: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A named bias's hyper-parameters: ``bias_options`` plus those given as keywords.

    The keywords that are hyper-parameters of the registered ``bias`` are moved out
    of ``kwargs``; what remains are the layer's own arguments (Keras ``name``, ...).
    """
    hyper = dict(bias_options or {})
    if isinstance(bias, str) and bias in registry.registered():
        names = set(registry.registered()[bias].parameter_names())
        hyper.update({k: kwargs.pop(k) for k in list(kwargs) if k in names})
    return hyper


class KerasBiasParamsMixin(BiasParamsMixin):
    """``BiasParamsMixin`` of a Keras layer (``posbias.keras``, ``posbias.tensorflow``):
    the parameters are float32 Keras weights, never autocast, saved in ``.keras``
    files; the config holds the spec's config and the seed. The layer implements
    ``_read_param`` in its framework's terms."""

    def _build_bias_params(self, bias: Any, num_heads: Any, hyper: Any, seed: Any) -> None:
        """Set ``spec`` and ``seed``; create the parameters from the seeded initial values."""
        self.spec = make_spec(bias, num_heads, hyper)
        self.seed = check_seed(seed)
        initial = self._initial_params(self.seed)
        self.bias_params = {
            name: self.add_weight(
                name=name,
                shape=value.shape,
                initializer="zeros",
                dtype="float32",
                trainable=True,
                autocast=False,
            )
            for name, value in initial.items()
        }
        self._write_params(initial)
        self.built = True

    def _write_param(self, name: str, value: np.ndarray) -> None:
        self.bias_params[name].assign(value)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "bias": self.spec.to_config(), "seed": self.seed}


class PosbiasErrorsFromConfig:
    """Keras wraps every exception of ``from_config`` in a TypeError; posbias's errors
    (a bad config value) surface as themselves."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        try:
            return super().from_config(config)
        except TypeError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, PosBiasError):
                raise cause from None
            raise


class PortableWeightsMixin:
    """Framework-free half of every ``MultiHeadAttention``: portable weight I/O.

    A layer sets ``self.mha_config`` and ``self.positional_bias`` (its
    framework's ``PositionalBias`` or None) and implements
    ``_read_projection(name)`` → ``(kernel, bias or None)`` as
    NumPy-convertible arrays in ``x @ kernel`` orientation, and
    ``_write_projection(name, kernel, bias)``, for each name of
    :data:`PROJECTIONS` and ``"gate"`` when ``mha_config.gate`` is set.
    """

    mha_config: MHAConfig
    positional_bias: Any

    def _projection_names(self) -> tuple[str, ...]:
        """The projections the layer owns: q, k, v, o and, with ``gate=``, the gate's."""
        # posbias.keras layers describe their projections without an MHAConfig (no gate)
        cfg = getattr(self, "mha_config", None)
        return PROJECTIONS + (("gate",) if cfg is not None and cfg.gate is not None else ())

    def _read_projection(self, name: str) -> tuple[Any, Any]:
        raise NotImplementedError

    def _write_projection(self, name: str, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        raise NotImplementedError

    #: the layout of the framework's ``attention``: ``"bhld"`` (PyTorch, NumPy) or ``"blhd"``
    attention_layout = "bhld"

    def _backend(self) -> Any:
        """The backend of the layer's tensors (its device)."""
        raise NotImplementedError

    def _project(self, name: str, x: Any) -> Any:
        raise NotImplementedError

    def log_gates(self, x: Any) -> Any:
        """The forget gate's per-token log-gates of the layer input ``x`` ``(B, L, E)``.

        ``g = logsigmoid(x·W + b)`` (``gate="forgetting"``, FoX, arXiv:2503.02130) or
        ``g = -softplus(x·W + b)`` (``gate="cable"``, CABLE, arXiv:2503.08067), computed
        in float32 (float64 for float64 inputs): exactly the ``log_gates=`` (and
        ``log_gates_after=``) the layer passes to ``attention``, where key slot ``j`` of
        query slot ``i`` gets ``Σ_{s=j+1..i} g[s]``.

        Returns:
            ``(B, H, L)`` (PyTorch, NumPy) or ``(B, L, H)`` (JAX, TensorFlow), the
            layout of the framework's ``attention(log_gates=)``; a bidirectional layer
            (``causal=False``) returns ``(log_gates, log_gates_after)``.

        Raises:
            InvalidArgumentError: the layer has no gate (``gate=None``) or ``x`` has
                the wrong shape.
            InvalidTypeError: ``x`` is not a floating tensor.
        """
        cfg = self.mha_config
        if cfg.gate is None:
            raise InvalidArgumentError(
                "log_gates() needs a layer with a forget gate: gate='forgetting' or 'cable', "
                "got gate=None."
            )
        xp = self._backend()
        x = _layer_input(xp, cfg, "input", x, None)
        gates = _gate_options(cfg, gate_log_gates(xp, cfg, self._project, x))
        if self.attention_layout != "bhld":
            gates = {name: einops.rearrange(g, "b h l -> b l h") for name, g in gates.items()}
        return gates["log_gates"] if cfg.causal else (gates["log_gates"], gates["log_gates_after"])

    def _init_projections(self, seed: Any) -> None:
        """Write the seeded initial projection weights (:func:`init_weights`)."""
        self._write_projections(init_weights(self.mha_config, seed))

    def _write_projections(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name in self._projection_names():
            bias = arrays.get(f"{name}.bias")
            self._write_projection(
                name,
                np.asarray(arrays[f"{name}.kernel"], np.float32),
                None if bias is None else np.asarray(bias, np.float32),
            )

    def portable_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of :meth:`portable_weights` (no arrays are built).

        Example:
            >>> from posbias.numpy import MultiHeadAttention
            >>> shapes = MultiHeadAttention(8, 2, "t5", use_bias=False).portable_shapes()
            >>> shapes["q.kernel"], shapes["positional_bias.table"]
            ((8, 8), (32, 2))
        """
        shapes = self.mha_config.shapes()
        if self.positional_bias is not None:
            for name, shape in self.positional_bias.spec.param_shapes().items():
                shapes[BIAS_PREFIX + name] = shape
        return shapes

    def portable_weights(self) -> dict[str, np.ndarray]:
        """The whole layer as float32 NumPy arrays, loadable by any framework's layer.

        Keys: ``{"q.kernel": (E, H·D), "q.bias": (H·D,), "k.kernel": (E, H_kv·D),
        "k.bias", "v.kernel", "v.bias", "o.kernel": (H·D, E), "o.bias": (E,)}``
        (kernels in ``x @ kernel`` orientation; ``*.bias`` only with
        ``use_bias=True``), plus ``"positional_bias.<name>"`` for each learnable
        parameter of the positional bias (the arrays of
        ``layer.positional_bias.export_params()``), and with ``gate=`` the gate
        projection ``"gate.kernel"`` ``(E, H)`` and ``"gate.bias"`` ``(H,)``
        (``2·H`` columns for a bidirectional layer: ``log_gates``, then
        ``log_gates_after``).

        Returns:
            ``dict[str, numpy.ndarray]``, float32, shapes of :meth:`portable_shapes`.
        """
        out = {}
        for name in self._projection_names():
            kernel, bias = self._read_projection(name)
            out[f"{name}.kernel"] = np.array(kernel, dtype=np.float32)
            if bias is not None:
                out[f"{name}.bias"] = np.array(bias, dtype=np.float32)
        if self.positional_bias is not None:
            for name, value in self.positional_bias.export_params().items():
                out[BIAS_PREFIX + name] = value
        return out

    def load_portable_weights(self, weights: Mapping[str, Any]) -> None:
        """Load weights exported by any framework's :meth:`portable_weights`.

        Projections and the positional bias's learnable parameters are both
        loaded; values are stored in the layer's parameter dtype. Nothing is
        written unless every entry is valid.

        Raises:
            InvalidTypeError: ``weights`` is not a mapping or holds non-numeric values.
            InvalidArgumentError: one error listing every missing, unexpected and
                mis-shaped entry (names as in :meth:`portable_shapes`); or NaN /
                infinite positional-bias parameters.
        """
        arrays = check_weights(self.portable_shapes(), weights)
        bias_params = None
        if self.positional_bias is not None:
            bias_params = self.positional_bias._checked_params(
                {k[len(BIAS_PREFIX) :]: v for k, v in arrays.items() if k.startswith(BIAS_PREFIX)}
            )
        self._write_projections(arrays)
        if bias_params is not None:
            self.positional_bias._write_params(bias_params)


def mha_forward(
    xp,
    cfg: MHAConfig,
    project: Callable[[str, Any], Any],
    x: Any,
    bias: Any,
    *,
    key: Any = None,
    value: Any = None,
    key_mask: Any = None,
    segment_ids: Any = None,
    attn_mask: Any = None,
    cache: problem.KVCache | None = None,
    need_weights: Any = False,
    weights_name: str = "need_weights",
    dropout: Callable[[Any], Any] | None = None,
    removed: Mapping[str, Any] | None = None,
    weight_dtype: str | None = None,
) -> Any:
    """Multi-head attention forward pass: ``out``, then the weights and the cache if asked.

    Returns ``out`` ``(B, Lq, E)``; with ``need_weights=True`` (a strict bool,
    called ``weights_name`` in the layer's errors) also the attention
    probabilities ``(B, H, Lq, Lk)`` of :mod:`posbias._core.weights` (the
    exact path that materialises them: ``O(B·H·Lq·Lk)`` memory), and with a
    ``cache`` the new cache last: ``out``, ``(out, weights)``,
    ``(out, new_cache)`` or ``(out, weights, new_cache)``.

    ``dropout``: the framework's dropout of the probabilities, given only
    while training with ``cfg.dropout > 0`` (None: deterministic). It runs the
    materialised path too (exact: the dropped probabilities are the weights
    applied, and returned), since blockwise kernels never hold them.

    Self-attention by default; ``key`` and/or ``value`` ``(B, Lk, E)`` make it
    cross-attention: queries from ``x``, keys and values from ``key``/``value``
    (one given alone serves as both: Flax's ``inputs_v`` defaults to
    ``inputs_k``, Keras' ``key`` to ``value``). The bias is aligned bottom-right (query ``r`` at key
    slot ``Lk - Lq + r``, :mod:`posbias._core.conventions`), like every
    attention call. ``key_mask`` ``(B, Lk)`` and ``attn_mask`` (broadcastable
    to ``(B, H, Lq, Lk)``) are :func:`posbias._core.problem.prepare`'s.

    ``removed``: keyword arguments the layer's call does not name (an error
    that explains each, e.g. ``key_padding_mask`` → ``key_mask``).
    ``weight_dtype``: the projections' dtype, which the
    inputs must have (PyTorch layers: an input of another dtype is an error,
    not a raw matmul failure).
    """
    known = ("key", "value", "key_mask", "segment_ids", "attn_mask", "cache", weights_name)
    conventions.reject_unknown("MultiHeadAttention", removed or {}, known)
    if cache is not None and not isinstance(cache, problem.KVCache):
        raise InvalidTypeError(
            f"cache must be the KVCache that layer.init_cache() returns (or the cache a "
            f"previous call returned), got {type(cache).__name__}."
        )
    x = _layer_input(xp, cfg, "input", x, weight_dtype)
    cross = key is not None or value is not None
    if cross and cache is not None:
        raise InvalidArgumentError(
            "KV-cache decoding is self-attention: pass no key/value inputs with cache=."
        )
    if key is not None:
        key = _layer_input(xp, cfg, "key", key, weight_dtype, like=x)
    if value is not None:
        value = _layer_input(xp, cfg, "value", value, weight_dtype, like=x)
    key = x if not cross else value if key is None else key
    value = key if value is None else value
    if cross and xp.shape(value)[1] != xp.shape(key)[1]:
        raise InvalidArgumentError(
            f"key and value must have the same length, got shapes {xp.shape(key)} and "
            f"{xp.shape(value)}."
        )
    gates = None
    if cfg.gate is not None:
        if cross:
            raise InvalidArgumentError(
                f"gate={cfg.gate!r} is self-attention: the forget gates are per token of the "
                "input and summed between a query's slot and a key's, so pass no key/value "
                "inputs (or make the layer with gate=None for cross-attention)."
            )
        gates = gate_log_gates(xp, cfg, project, x)
    sources = {"q": x, "k": key, "v": value}
    q, k, v = (
        einops.rearrange(project(n, sources[n]), "b l (h d) -> b h l d", d=cfg.head_dim)
        for n in ("q", "k", "v")
    )
    want_weights = conventions.check_bool(weights_name, need_weights)
    materialised = want_weights or dropout is not None
    if materialised:  # the exact path that holds the (B, H, Lq, Lk) probabilities
        run = functools.partial(_weights.attend_with_weights, dropout=dropout)
    else:
        run = functools.partial(
            dispatch.attend, implementation=cfg.implementation, block_size=cfg.block_size
        )
    if cache is None:
        result = run(
            xp,
            q,
            k,
            v,
            bias,
            causal=cfg.causal,
            key_mask=key_mask,
            segment_ids=segment_ids,
            attn_mask=attn_mask,
            **_gate_options(cfg, gates),
        )
        new_cache = None
    else:
        if not cfg.causal:
            raise InvalidArgumentError("KV-cache decoding needs a causal layer (causal=True).")
        if segment_ids is not None:
            raise InvalidArgumentError("segment_ids are not supported with a KV cache.")
        offset = cache.length
        new_cache = cache_write(xp, cache, k, v, key_mask, log_gates=gates)
        q_dtype = xp.dtype_name(q.dtype)  # a cache may hold another dtype (init_cache(dtype=))
        result = run(
            xp,
            q,
            xp.cast(new_cache.k, q_dtype),
            xp.cast(new_cache.v, q_dtype),
            bias,
            causal=True,
            q_offset=offset,
            key_mask=new_cache.valid,
            attn_mask=attn_mask,
            log_gates=new_cache.log_gates,
        )
    out, probs = result if materialised else (result, None)
    out = project("o", einops.rearrange(out, "b h l d -> b l (h d)"))
    outputs = (out, *((probs,) if want_weights else ()), *(() if cache is None else (new_cache,)))
    return outputs[0] if len(outputs) == 1 else outputs


def gate_log_gates(xp, cfg: MHAConfig, project: Callable[[str, Any], Any], x: Any) -> Any:
    """``(B, n, L)`` log-gates of the layer input ``x`` ``(B, L, E)`` (``n = cfg.gate_heads``).

    ``z = x·W + b`` (``project("gate", ·)``, computed in float32; float64 for float64
    inputs and for a projection that computes in float64, the NumPy layer's), then
    FoX's ``g = logsigmoid(z)`` (``gate="forgetting"``, arXiv:2503.02130) or CABLE's
    ``g = -softplus(z)`` (``gate="cable"``, arXiv:2503.08067), both as
    ``-softplus(±z) = -(relu(±z) + log1p(exp(-|z|)))`` (stable, never positive).
    """
    compute = "float64" if xp.dtype_name(x.dtype) == "float64" else "float32"
    z = project("gate", xp.cast(x, compute))
    z = xp.cast(z, "float64" if xp.dtype_name(z.dtype) == "float64" else "float32")
    z = einops.rearrange(z, "b l h -> b h l")
    s = -z if cfg.gate == "forgetting" else z  # g = -softplus(s)
    return -(xp.relu(s) + xp.log1p(xp.exp(-xp.abs(s))))


def _gate_options(cfg: MHAConfig, gates: Any) -> dict[str, Any]:
    """``log_gates=`` (and ``log_gates_after=`` for a bidirectional layer) of ``gates``
    ``(B, n, L)`` from :func:`gate_log_gates`; nothing without a gate."""
    if gates is None:
        return {}
    heads = cfg.num_heads
    if cfg.causal:
        return {"log_gates": gates}
    return {"log_gates": gates[:, :heads], "log_gates_after": gates[:, heads:]}


def _layer_input(
    xp, cfg: MHAConfig, name: str, x: Any, weight_dtype: str | None, like: Any = None
) -> Any:
    """``x`` as a checked ``(B, L, embed_dim)`` floating tensor (of ``like``'s batch and dtype)."""
    x = problem.native(xp, name, x)
    shape = xp.shape(x)
    if len(shape) != 3 or shape[-1] != cfg.embed_dim:
        raise InvalidArgumentError(
            f"{name} must have shape (B, L, embed_dim={cfg.embed_dim}), got {shape}."
        )
    dtype = xp.dtype_name(x.dtype)
    owner = "the layer's weights"
    if like is not None:
        owner = "the layer's weights and the query input" if weight_dtype else "the query input"
        if shape[0] != xp.shape(like)[0]:
            raise InvalidArgumentError(
                f"{name} must have the query input's batch size {xp.shape(like)[0]}, got "
                f"shape {shape}."
            )
        weight_dtype = weight_dtype or xp.dtype_name(like.dtype)
    if dtype not in problem.FLOATS or (weight_dtype is not None and dtype != weight_dtype):
        expected = (
            f"of dtype {weight_dtype} ({owner})"
            if weight_dtype is not None
            else f"({', '.join(problem.FLOATS)})"
        )
        raise InvalidTypeError(
            f"{name} must be a floating tensor {expected}, got {dtype or x.dtype}; cast the "
            "input (or the layer) first."
        )
    return x


def init_cache(xp, cfg: MHAConfig, batch_size: int, capacity: int, dtype: Any) -> problem.KVCache:
    """An empty cache for ``batch_size`` sequences of up to ``capacity`` tokens.

    ``dtype``: a floating dtype however it is spelled (:meth:`Backend.float_dtype`).
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    capacity = check_int("capacity", capacity, minimum=1)
    dtype = xp.float_dtype(dtype, "cache dtype")
    shape = (batch_size, cfg.num_kv_heads, capacity, cfg.head_dim)
    log_gates = None
    if cfg.gate is not None:  # per-slot g (float32; float64 caches: float64), not cumsum G
        gate_dtype = "float64" if dtype == "float64" else "float32"
        log_gates = xp.zeros((batch_size, cfg.num_heads, capacity), gate_dtype)
    return problem.KVCache(
        k=xp.zeros(shape, dtype),
        v=xp.zeros(shape, dtype),
        valid=xp.zeros((batch_size, capacity), "bool"),
        length=xp.as_int(xp.zeros((batch_size,), "int32")),
        overflow=xp.zeros((batch_size,), "bool"),
        log_gates=log_gates,
    )


def check_cache(xp, cache: problem.KVCache, heads: int, dim: int) -> None:
    """Every field of a ``KVCache`` is this framework's tensor of the right shape and dtype.

    ``heads``, ``dim``: the layer's key/value heads and head size. Each size is the
    one most of the fields agree on (the layer's counts as one), so the message
    names the field that is off, not the one read first.
    """
    for name in problem.KVCache._fields:
        value = getattr(cache, name)
        if value is None and name in ("overflow", "log_gates"):
            continue
        if backends.check_framework(xp, f"cache.{name}", value) != xp.name:
            raise InvalidTypeError(
                f"cache.{name} must be a {xp.name} tensor (use the cache that init_cache() or "
                f"a previous call returned), got {type(value).__name__}."
            )
    shapes = {n: xp.shape(getattr(cache, n)) for n in ("k", "v", "valid", "length", "overflow")}
    batch = _majority([s[0] for s in shapes.values() if len(s) >= 1])
    capacity = _majority(
        [s[2] for n, s in shapes.items() if n in "kv" and len(s) == 4]
        + [s[1] for n, s in shapes.items() if n == "valid" and len(s) == 2]
    )
    kv = [shapes[n] for n in "kv" if len(shapes[n]) == 4]
    # the layer's own count is one vote: a cache of another layer (k and v agree) is
    # reported by cache_write as such, a k or v off on its own by name here
    heads = _majority([s[1] for s in kv] + [heads])
    dim = _majority([s[3] for s in kv] + [dim])
    expected = {
        "k": (4, problem.FLOATS, (batch, heads, capacity, dim)),
        "v": (4, problem.FLOATS, (batch, heads, capacity, dim)),
        "valid": (2, ("bool",), (batch, capacity)),
        "length": (1, ("int32", "int64"), (batch,)),
        "overflow": (1, ("bool",), (batch,)),
    }
    gates = cache.log_gates
    if gates is not None:  # (B, H, capacity): H query heads, checked against the layer's
        gate_heads = xp.shape(gates)[1] if len(xp.shape(gates)) == 3 else None
        expected["log_gates"] = (3, problem.FLOATS, (batch, gate_heads, capacity))
    for name, (ndim, dtypes, want) in expected.items():
        value = getattr(cache, name)
        if value is None:
            continue
        got, dtype = xp.shape(value), xp.dtype_name(value.dtype)
        if len(got) != ndim or got != want or dtype not in dtypes:
            raise InvalidArgumentError(
                f"cache.{name} has shape {got} and dtype {dtype}; a cache of {batch} sequences "
                f"needs shape {want} and dtype {' or '.join(dtypes)} (use the cache that "
                "init_cache() or a previous call returned)."
            )


def _majority(values: list[Any]) -> Any:
    """The value most of ``values`` share (the first of them on a tie), or None."""
    return max(values, key=values.count) if values else None


def cache_write(
    xp, cache: problem.KVCache, k: Any, v: Any, valid: Any, log_gates: Any = None
) -> problem.KVCache:
    """Write ``T`` new keys/values ``(B, H_kv, T, D)`` (and a gated layer's log-gates
    ``(B, H, T)``) at each sequence's next slots."""
    check_cache(xp, cache, xp.shape(k)[1], xp.shape(k)[3])
    if (log_gates is None) != (cache.log_gates is None):
        raise InvalidArgumentError(
            (
                "the cache holds forget gates but the layer has gate=None"
                if log_gates is None
                else "the layer has a forget gate (gate=) but the cache holds no log-gates"
            )
            + ": was the cache made by another layer? Use this layer's init_cache()."
        )
    if log_gates is not None and xp.shape(cache.log_gates)[1] != xp.shape(log_gates)[1]:
        raise InvalidArgumentError(
            f"the cache holds log-gates of {xp.shape(cache.log_gates)[1]} heads, the layer "
            f"has {xp.shape(log_gates)[1]}: was the cache made by another layer?"
        )
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
    overflow = (cache.length < 0) | (cache.length + steps > capacity)
    if cache.overflow is not None:
        overflow = overflow | cache.overflow
    if xp.is_concrete(cache.length):
        lengths = xp.to_numpy(cache.length)
        if lengths.min() < 0:
            raise InvalidArgumentError(
                f"the cache has a negative length {int(lengths.min())}; use the cache that "
                "init_cache() or a previous call returned."
            )
        if lengths.max() + steps > capacity:
            raise InvalidArgumentError(
                f"decoding past the cache capacity: {int(lengths.max())} slots used + {steps} "
                f"new tokens > capacity {capacity}; create the cache with a larger capacity."
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
    new_gates = None
    if log_gates is not None:  # g per slot (0 at padding): attention sums it chunkwise
        gate_dtype = xp.dtype_name(cache.log_gates.dtype)
        log_gates = xp.where(valid[:, None, :], xp.cast(log_gates, gate_dtype), 0.0)
        placed = xp.einsum("bst,bht->bhs", xp.cast(onehot, gate_dtype), log_gates)
        new_gates = xp.where(writing[:, None, :], placed, cache.log_gates)
    return problem.KVCache(
        k=xp.where(where_heads, new_k, cache.k),
        v=xp.where(where_heads, new_v, cache.v),
        valid=xp.where(writing, hit_valid, cache.valid),
        length=cache.length + steps,
        overflow=overflow,
        log_gates=new_gates,
    )
