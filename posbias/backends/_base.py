"""The backend interface: the small op vocabulary every bias is written against.

A bias variant's ``compute`` receives a :class:`Backend` instance ``xp`` bound to
one framework, one device and one compute dtype (``float32``, or ``float64``
when asked). It only uses the methods below, Python operators (``+ - * / -x``,
comparisons) and basic indexing with ``None`` / ``...`` / slices, which every
framework supports with the same meaning.

Vocabulary (all elementwise unless said otherwise):

=====================  ==========================================================
``xp.constant(a)``     NumPy array → native tensor in the compute dtype, on device
``xp.float(x)``        cast to the compute dtype
``xp.abs where``       ``where(cond, a, b)``
``xp.minimum maximum`` elementwise min / max
``xp.log log1p exp``   natural log, ``log(1 + x)``, exponential
``xp.sqrt floor``      square root, round towards -inf
``xp.cos sin tanh``    trigonometric / hyperbolic
``xp.sigmoid relu``    activation functions
``xp.take(t, i)``      ``t[i]`` along axis 0 (gather from a table)
``xp.sum(x, axis)``    reduction
``xp.matmul(a, b)``    batched matrix product
``xp.scalar_mlp``      a ``1 → W → H`` ReLU MLP of every element, heads first
=====================  ==========================================================

Two more words serve the blockwise backward pass (:mod:`posbias._core.backward`),
never a bias's ``compute``: ``xp.custom_gradient(forward, backward)`` (the
framework's own custom-gradient mechanism) and ``xp.vjp(fn, params)`` (its
autodiff on a small function of a parameter dict).
"""

from __future__ import annotations

from typing import Any, ClassVar

import einops
import numpy as np

from ..errors import BackendError, InvalidArgumentError, InvalidTypeError

#: Canonical dtype names understood by every backend.
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: Every dtype name a backend maps (floats, position integers, masks).
NAMES = (*FLOAT_DTYPES, "int64", "int32", "bool")
_FLOAT16_MAX = 65504.0


class Backend:
    """One framework, one device, one compute dtype.

    Subclasses set :attr:`name`, :attr:`xp` (a namespace with the NumPy-style
    functions ``abs``, ``where``, ``minimum``, ...) and implement the handful of
    methods that differ between frameworks.
    """

    name: ClassVar[str]
    xp: Any
    #: the largest |position| or offset this backend holds exactly, with room for the
    #: differences ``k - q`` (int64: the documented 2^40; JAX without x64: 2^30)
    max_position: int = 1 << 40
    #: why positions are bounded, for error messages
    position_limit_hint: str = "positions and offsets are limited to 2^40"

    def __init__(self, device: Any = None, compute_dtype: str = "float32") -> None:
        self.device = device
        self.compute_dtype = compute_dtype

    def __repr__(self) -> str:
        return f"<posbias {self.name} backend device={self.device} compute={self.compute_dtype}>"

    # ----------------------------------------------------------- dtype handling
    def native_dtype(self, name: str) -> Any:
        """The framework's dtype object for a canonical name such as ``"float32"``."""
        raise NotImplementedError

    def dtype_name(self, dtype: Any) -> str | None:
        """Canonical name of a dtype given as this framework's object, or None."""
        raise NotImplementedError

    def supports(self, name: str) -> bool:
        """Whether this backend can hold values of dtype ``name`` right now."""
        return True

    def float_dtype(self, dtype: Any, what: str = "dtype") -> str:
        """The canonical name of a floating ``dtype=`` argument, however it is spelled.

        A string (``"bfloat16"``), a NumPy dtype or type, or this framework's dtype
        object. Raises InvalidTypeError for None or a bool, BackendError for any
        other dtype (integers included: ``what`` names it in the message) and for
        one this backend cannot hold right now (JAX float64 without x64).
        """
        if dtype is None or isinstance(dtype, bool):  # np.dtype(None) would mean float64
            raise InvalidTypeError(
                f"dtype must be a float dtype, got {dtype!r}; pass one of "
                f"{list(FLOAT_DTYPES)} (as a string or a {self.name} dtype)."
            )
        if isinstance(dtype, str):
            name = dtype
        else:
            name = self.dtype_name(dtype)
            if name is None:
                try:
                    name = np.dtype(dtype).name
                except TypeError:
                    name = repr(dtype)
        if name not in FLOAT_DTYPES:
            raise BackendError(
                f"unknown {what} {dtype!r}; expected one of {list(FLOAT_DTYPES)} "
                f"(as a string or a {self.name} dtype)."
            )
        self.native_dtype(name)  # raises when the backend cannot hold it (JAX float64)
        return name

    # ----------------------------------------------------- conversion / creation
    def from_numpy(self, array: np.ndarray) -> Any:
        """A native tensor on this backend's device with ``array``'s values and dtype."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy copy of a native tensor."""
        raise NotImplementedError

    def constant(self, array: np.ndarray) -> Any:
        """``array`` (float64 NumPy) cast once in NumPy to the compute dtype, on device."""
        return self.from_numpy(np.asarray(array, dtype=self.compute_dtype))

    def arange(self, n: int) -> Any:
        """``[0, 1, ..., n-1]`` as an int64 tensor (int32 where the backend lacks int64)."""
        return self.from_numpy(np.arange(n, dtype=np.int64))

    def as_int(self, x: Any) -> Any:
        """Cast an integer tensor to the backend's position dtype (int64 or int32)."""
        return self.cast(x, "int64")

    def cast(self, x: Any, name: str) -> Any:
        raise NotImplementedError

    def float(self, x: Any) -> Any:
        """Cast to the compute dtype."""
        return self.cast(x, self.compute_dtype)

    def cast_output(self, x: Any, name: str) -> Any:
        """Cast computed values to the requested output dtype, last.

        float16 values are clipped to its finite range first, so very long
        distances saturate at ``-65504`` instead of becoming ``-inf`` (and NaN
        after a softmax of a fully masked row).
        """
        if name == self.compute_dtype:
            return x
        if name == "float16":
            x = self.minimum(self.maximum(x, -_FLOAT16_MAX), _FLOAT16_MAX)
        return self.cast(x, name)

    # ------------------------------------------------------------ inspection
    def shape(self, x: Any) -> tuple[int, ...]:
        """Static shape as a tuple of ints."""
        return tuple(int(d) for d in x.shape)

    def is_integer(self, x: Any) -> bool:
        """Whether ``x`` holds integers (bool excluded)."""
        raise NotImplementedError

    def device_of(self, x: Any) -> Any:
        """The device ``x`` lives on, in a form :meth:`__init__` accepts."""
        return None

    @classmethod
    def check_device(cls, device: Any) -> Any:
        """``device`` as this framework accepts it, or a BackendError saying what is valid."""
        if device in (None, "cpu"):
            return None
        raise BackendError(
            f"device={device!r} is not a {cls.name} device; {cls.name} arrays live on the CPU "
            "(leave device=None)."
        )

    def on_other_device(self, x: Any) -> Any:
        """The device of a native ``x`` when it is not this backend's device, else None."""
        return None

    # -------------------------------------------------------------- vocabulary
    def abs(self, x):
        return self.xp.abs(x)

    def where(self, cond, a, b):
        return self.xp.where(cond, a, b)

    def minimum(self, a, b):
        return self.xp.minimum(a, b)

    def maximum(self, a, b):
        return self.xp.maximum(a, b)

    def log(self, x):
        return self.xp.log(x)

    def log1p(self, x):
        return self.xp.log1p(x)

    def exp(self, x):
        return self.xp.exp(x)

    def sqrt(self, x):
        return self.xp.sqrt(x)

    def floor(self, x):
        return self.xp.floor(x)

    def cos(self, x):
        return self.xp.cos(x)

    def sin(self, x):
        return self.xp.sin(x)

    def tanh(self, x):
        return self.xp.tanh(x)

    def sigmoid(self, x):
        return 1 / (1 + self.xp.exp(-x))

    def relu(self, x):
        return self.xp.maximum(x, 0)

    def stop_gradient(self, x):
        """``x`` as a constant for automatic differentiation (NumPy: ``x``)."""
        return x

    def take(self, table, index):
        return table[index]

    def take_axis(self, x, index: np.ndarray, axis: int):
        """``x`` restricted to the static NumPy ``index`` along ``axis`` (e.g. head subsets)."""
        return self.xp.take(x, index, axis)

    def stack(self, tensors, axis):
        return self.xp.stack(tensors, axis)

    def sum(self, x, axis):
        return self.xp.sum(x, axis)

    def concat(self, tensors, axis):
        return self.xp.concatenate(tensors, axis)

    def any(self, x, axis):
        return self.xp.any(x, axis)

    #: whether :meth:`toeplitz` builds matrices by copying a strided view
    fast_toeplitz = False

    def toeplitz(self, g, rows: int, cols: int):
        """``out[..., i, j] = g[..., rows - 1 - i + j]``: a Toeplitz matrix from its diagonals."""
        raise NotImplementedError

    def after(self, done, x):
        """``x``, but only once ``done`` (a tensor or a list) is computed (a scheduling edge)."""
        return x

    def gather_last(self, x, index):
        """``x[b, index[b, r]]`` for ``x`` ``(B, N)`` and ``index`` ``(B, R)``."""
        return self.xp.take_along_axis(x, index, -1)

    def matmul(self, a, b):
        return self.xp.matmul(a, b)

    def scalar_mlp(self, x, w1, b1, w2, b2):
        """A one-hidden-layer ReLU MLP ``1 → W → H`` applied to every element of ``x``:

            out[..., h, q, k] = Σ_w relu(x[..., q, k] · w1[w] + b1[w]) · w2[w, h] + b2[h]

        ``x`` ``(..., Lq, Lk)``, ``w1`` and ``b1`` ``(W,)``, ``w2`` ``(W, H)``, ``b2``
        ``(H,)``, all in the compute dtype. Returns ``(..., H, Lq, Lk)``. FIRE's MLP
        (arXiv:2310.04418). Here in plain operations (the ``(..., Lq, Lk, W)`` hidden
        layer at once); PyTorch's CPU backend computes it in cache-sized chunks with
        a hand-written gradient, never holding the hidden layer of the whole tile.
        """
        hidden = self.relu(x[..., None] * w1 + b1)  # (..., Lq, Lk, W)
        out = self.matmul(hidden, w2) + b2  # (..., Lq, Lk, H)
        return einops.rearrange(out, "... q k h -> ... h q k")

    # ------------------------------------------ attention vocabulary (layers)
    def einsum(self, equation, *operands):
        return self.xp.einsum(equation, *operands)

    def cumsum(self, x, axis):
        return self.xp.cumsum(x, axis)

    def flip(self, x, axis):
        """``x`` in reverse order along ``axis``."""
        return self.xp.flip(x, axis)

    def take_last(self, x, index):
        """``x[..., index]``: a gather along the last axis with one 1-D integer ``index``."""
        return x[..., index]

    def pad_last(self, x, before: int, after: int):
        """``x`` with ``before`` zeros prepended and ``after`` appended on the last axis
        (no batch size needed: works where it is unknown while tracing)."""
        return self.xp.pad(x, [(0, 0)] * (len(x.shape) - 1) + [(before, after)])

    def amax(self, x, axis, keepdims=False):
        return self.xp.max(x, axis, keepdims=keepdims)

    def sum_keepdims(self, x, axis):
        return self.xp.sum(x, axis, keepdims=True)

    def zeros(self, shape, dtype):
        return self.from_numpy(np.zeros(shape, dtype=self.native_dtype(dtype)))

    def finfo_min(self, name: str) -> float:
        """Most negative finite value of a compute dtype (masked scores)."""
        return float(np.finfo(name).min)

    def finfo_tiny(self, name: str) -> float:
        return float(np.finfo(name).tiny)

    def is_concrete(self, x) -> bool:
        """False while tracing / compiling (values unknown): skip value checks."""
        return True

    #: what ``rng`` of :meth:`uniform` may be, in words (errors)
    rng_kinds: ClassVar[str] = "None (fresh entropy), an int seed or a numpy.random.Generator"

    def uniform(self, rng: Any, shape: tuple[int, ...]) -> Any:
        """``shape`` float32 uniform in ``[0, 1)`` from ``rng`` (the framework's RNG idiom).

        Raises :class:`InvalidTypeError` naming ``dropout_rng`` for an ``rng`` the
        framework does not take (:attr:`rng_kinds`).
        """
        if rng is not None and not (is_seed(rng) or isinstance(rng, np.random.Generator)):
            raise rng_error(self, rng)
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        return self.from_numpy(generator.random(shape, dtype=np.float32))

    # ------------------------------------------- differentiation (backward pass)
    #: whether :meth:`custom_gradient` and :meth:`vjp` exist (not NumPy)
    autodiff: ClassVar[bool] = False

    def custom_gradient(self, forward, backward, recompute=None):
        """A differentiable function of tensors with a hand-written gradient.

        ``forward(*inputs)`` returns ``(outputs, saved)``: a tuple of output
        tensors and a tuple of tensors (or None) kept for the backward pass;
        ``backward(saved, cotangents)`` returns one gradient per input.
        Cotangents of outputs that were not used arrive as zeros or None.
        ``recompute(*inputs)`` (optional) gives the same outputs in plain
        differentiable operations: a framework whose hand-written backward is
        not itself differentiable uses it for higher derivatives.
        """
        raise NotImplementedError(f"{self.name} has no automatic differentiation")

    def vjp(self, fn, params):
        """``(fn(params), pullback)``: ``pullback(cotangent)`` → ``{name: gradient}``.

        ``params`` is a dict of tensors; ``fn`` maps such a dict to one tensor.
        Parameters that ``fn`` does not use get zero gradients.
        """
        raise NotImplementedError(f"{self.name} has no automatic differentiation")


#: int seeds every framework takes as they are (JAX without x64 keeps 32 bits)
SEED_LIMIT = 2**32


def is_seed(value: Any) -> bool:
    """An int (not a bool) in ``[0, 2**32)``: a seed every framework takes as it is."""
    return (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and 0 <= value < SEED_LIMIT
    )


def rng_error(backend: Backend, rng: Any) -> Exception:
    """The error for a ``dropout_rng`` that ``backend`` does not take."""
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return InvalidArgumentError(
            f"dropout_rng={rng}: an int seed must be in [0, 2**32) (JAX keeps 32 bits of a "
            "seed, so larger ones would collide)."
        )
    return InvalidTypeError(
        f"dropout_rng must be {backend.rng_kinds} for {backend.name}, got {rng!r} of type "
        f"{type(rng).__name__}."
    )


def check_dtype_name(name: str, known: tuple[str, ...] = FLOAT_DTYPES) -> str:
    if name not in known:
        raise BackendError(f"unknown dtype {name!r}; expected one of {list(known)}.")
    return name
