"""ALiBi: Attention with Linear Biases (Press et al., ICLR 2022).

https://arxiv.org/abs/2108.12409

``alibi``: ``bias[h, i, j] = -m_h · |i - j|``. Under a causal mask this is the
paper's decoder bias; without a mask it is the symmetric encoder form used by
MosaicBERT and FlashAttention's non-causal ALiBi.

``alibi_asymmetric``: separate slopes for past keys (``j <= i``) and future keys
(``j > i``): ``-m_h · (i - j)`` for past keys and ``-m'_h · (j - i)`` for future
keys, for bidirectional encoders that should tell left from right.

``alibi_learned``: ``-exp(θ_h)·|i-j|`` with per-head learnable log-slopes
``θ``, initialised to the log of the paper's slopes (so it starts as ``alibi``).

``alibi_scaled``: slope interpolation for contexts longer than training. A
static factor (``scale``) multiplies every slope; with ``train_length = T``
the dynamic rule multiplies the slopes of query ``i`` by ``min(1, T / (i + 1))``:
the slopes shrink by ``train_length / current_length`` once the sequence a
query sees (its prefix, ``i + 1`` tokens) exceeds ``T``. Defining the current
length per query keeps tiles, KV-cache decoding and sequence parallelism
consistent (a row never depends on which keys are in the tile).

Slopes: :func:`posbias.alibi_slopes` (``schedule="paper"``, the default) or the
naive ``2^(-max_bias·(h+1)/H)`` (``schedule="geometric"``), or explicit
``custom_slopes``; times ``scale``; resolved into ``spec.slopes``. All are
float64 NumPy constants cast once to float32, so every backend multiplies the
same float32 slope by the same exact float32 distance: float32 results are
bit-identical across NumPy, PyTorch, JAX and TensorFlow.
"""

from __future__ import annotations

import numpy as np

from .._core.checks import MAX_POSITION, check_finite_float, check_float_sequence, check_int
from ..errors import InvalidArgumentError
from ..registry import register
from ..slopes import SCHEDULES, resolve_slopes
from ..spec import BiasSpec


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _check_schedule(schedule: object) -> str:
    if schedule not in SCHEDULES:
        raise InvalidArgumentError(
            f"unknown slope schedule {schedule!r}; expected one of {sorted(SCHEDULES)}."
        )
    return schedule  # type: ignore[return-value]


@register("alibi")
class Alibi(BiasSpec):
    """ALiBi, ``bias[h, i, j] = -m_h · |i - j|`` (Press et al. 2022).

    Args:
        num_heads: number of heads ``H``.
        max_bias: ``B`` of the slope schedule, 8 in the paper (MPT and keras-hub
            call it ``alibi_bias_max``).
        schedule: ``"paper"`` (default; the paper's rule for any ``H``) or
            ``"geometric"`` (``2^(-B(h+1)/H)``; differs for non-power-of-two ``H``).
        scale: multiplies every slope, e.g. ``train_len / test_len`` for length
            interpolation.
        custom_slopes: explicit per-head slopes, ``H`` positive numbers (then
            ``max_bias``/``schedule`` are unused; ``scale`` still multiplies them).

    Attributes:
        slopes: the resolved per-head slopes ``m_h`` (float64, read-only),
            whichever way they were given.

    Shapes: ``(H, Lq, Lk)``, or ``(B, H, Lq, Lk)`` for batched positions.

    Example:
        >>> import posbias
        >>> spec = posbias.get("alibi", num_heads=8)
        >>> spec.bias(q_len=1, k_len=4)[0].tolist()
        [[-1.5, -1.0, -0.5, 0.0]]
    """

    toeplitz = True

    max_bias: float = 8.0
    schedule: str = "paper"
    scale: float = 1.0
    custom_slopes: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("max_bias", check_finite_float("max_bias", self.max_bias, positive=True))
        self._set("schedule", _check_schedule(self.schedule))
        self._set("scale", check_finite_float("scale", self.scale, positive=True))
        if self.custom_slopes is not None:
            self._set(
                "custom_slopes",
                check_float_sequence(
                    "custom_slopes", self.custom_slopes, length=self.num_heads, nonnegative=True
                ),
            )
        # derived once here (not a cached_property: torch.compile cannot trace its lock)
        self._set(
            "_slopes",
            _frozen(
                resolve_slopes(
                    self.num_heads,
                    max_bias=self.max_bias,
                    schedule=self.schedule,
                    scale=self.scale,
                    slopes=self.custom_slopes,
                )
            ),
        )

    @classmethod
    def parity_examples(cls, num_heads: int) -> list[BiasSpec]:
        return [
            cls(num_heads=num_heads),
            cls(num_heads=num_heads, schedule="geometric", max_bias=4.0, scale=0.25),
            cls(num_heads=num_heads, custom_slopes=[1.0 / (h + 3) for h in range(num_heads)]),
        ]

    @property
    def slopes(self) -> np.ndarray:
        """Per-head slopes ``m_h``, float64, shape ``(num_heads,)`` (read-only)."""
        return self._slopes

    def symmetric_slopes(self) -> np.ndarray | None:
        return self.slopes

    def compute(self, xp, q_pos, k_pos, heads, params):
        m = xp.constant(self.slopes[heads])[:, None, None]
        # 0 - m·|d|: exact (as m·(-|d|) is), and a zero product stays +0.0 (also for a
        # zero slope, a head without bias, where m·(-|d|) would give -0.0)
        distance = xp.float(xp.abs(k_pos - q_pos))[..., None, :, :]
        return 0.0 - m * distance


@register("alibi_asymmetric")
class AlibiAsymmetric(Alibi):
    """ALiBi with separate slopes for past and future keys.

    ``bias[h, i, j] = -m_h · (i - j)`` for ``j <= i`` and ``-m'_h · (j - i)`` for
    ``j > i``. ``m`` comes from the ``Alibi`` parameters; ``m'`` from
    ``future_custom_slopes`` if given, else from the same schedule with
    ``future_max_bias`` (default: ``max_bias``) and ``scale``. With equal slopes
    it equals ``alibi``.

    Example:
        >>> import posbias
        >>> spec = posbias.get("alibi_asymmetric", num_heads=1, future_max_bias=4.0)
        >>> spec.bias(q_len=1, k_len=3, q_offset=1).tolist()
        [[[-0.00390625, 0.0, -0.0625]]]
    """

    future_max_bias: float | None = None
    future_custom_slopes: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.future_max_bias is not None:
            self._set(
                "future_max_bias",
                check_finite_float("future_max_bias", self.future_max_bias, positive=True),
            )
        if self.future_custom_slopes is not None:
            self._set(
                "future_custom_slopes",
                check_float_sequence(
                    "future_custom_slopes",
                    self.future_custom_slopes,
                    length=self.num_heads,
                    nonnegative=True,
                ),
            )
        future_max_bias = self.max_bias if self.future_max_bias is None else self.future_max_bias
        self._set(
            "_future_slopes",
            _frozen(
                resolve_slopes(
                    self.num_heads,
                    max_bias=future_max_bias,
                    schedule=self.schedule,
                    scale=self.scale,
                    slopes=self.future_custom_slopes,
                )
            ),
        )

    @classmethod
    def parity_examples(cls, num_heads: int) -> list[BiasSpec]:
        return [
            cls(num_heads=num_heads, future_max_bias=4.0),
            cls(
                num_heads=num_heads,
                schedule="geometric",
                future_custom_slopes=[0.1 * (h + 1) for h in range(num_heads)],
            ),
        ]

    @property
    def future_slopes(self) -> np.ndarray:
        """Slopes ``m'_h`` for keys after the query, float64, shape ``(num_heads,)``."""
        return self._future_slopes

    def symmetric_slopes(self) -> np.ndarray | None:
        return None

    def compute(self, xp, q_pos, k_pos, heads, params):
        past = xp.constant(self.slopes[heads])[:, None, None]
        future = xp.constant(self.future_slopes[heads])[:, None, None]
        rel = (k_pos - q_pos)[..., None, :, :]
        slope = xp.where(rel > 0, future, past)  # pick the slope, then one exact product
        return 0.0 - slope * xp.float(xp.abs(rel))


@register("alibi_learned")
class AlibiLearned(BiasSpec):
    """ALiBi with learnable per-head log-slopes (``params["log_slopes"]``, shape ``(H,)``).

    Args:
        num_heads: ``H``.
        max_bias: ``B`` of the initial (paper) slopes.
        schedule: ``"paper"`` or ``"geometric"`` for the initial slopes.

    Example:
        >>> import posbias
        >>> spec = posbias.get("alibi_learned", num_heads=8)
        >>> spec.bias(q_len=1, k_len=3)[0].tolist()          # initial = alibi
        [[-1.0, -0.5, 0.0]]
    """

    toeplitz = True
    learnable = True
    bit_identical = False  # exp() differs by an ulp between frameworks

    max_bias: float = 8.0
    schedule: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("max_bias", check_finite_float("max_bias", self.max_bias, positive=True))
        self._set("schedule", _check_schedule(self.schedule))

    @property
    def slopes(self) -> np.ndarray:
        """The *initial* slopes; trained slopes are ``exp(params["log_slopes"])``."""
        return SCHEDULES[self.schedule](self.num_heads, self.max_bias)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"log_slopes": (self.num_heads,)}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        return {"log_slopes": np.log(self.slopes)}

    def compute(self, xp, q_pos, k_pos, heads, params):
        m = xp.exp(xp.take_axis(params["log_slopes"], heads, 0))[:, None, None]
        return 0.0 - m * xp.float(xp.abs(k_pos - q_pos))[..., None, :, :]


@register("alibi_scaled")
class AlibiScaled(Alibi):
    """ALiBi with slope interpolation: static ``scale`` and dynamic ``train_length``.

    Args:
        train_length: ``T``; if set, query ``i``'s slopes are multiplied by
            ``min(1, T / (i + 1))``. ``None``: static scaling only.
        (and every ``alibi`` argument; ``scale`` is the static factor)

    Example:
        >>> import posbias
        >>> spec = posbias.get("alibi_scaled", num_heads=1, custom_slopes=[1.0], train_length=2)
        >>> spec.bias(q_pos=[1, 3], k_pos=[0]).tolist()   # row i=3: slope 2/4
        [[[-1.0], [-1.5]]]
    """

    toeplitz = False  # with train_length, rows depend on the query position
    # The dynamic factor divides; XLA on GPU does not round that division like
    # NumPy (seen on an H100: 1-ulp differences), so no bitwise promise.
    bit_identical = False

    train_length: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_length is not None:
            self._set(
                "train_length",
                check_int("train_length", self.train_length, minimum=1, maximum=MAX_POSITION),
            )

    @classmethod
    def parity_examples(cls, num_heads: int) -> list[BiasSpec]:
        return [cls(num_heads=num_heads, scale=0.5), cls(num_heads=num_heads, train_length=4)]

    def symmetric_slopes(self) -> np.ndarray | None:
        return self.slopes if self.train_length is None else None

    def compute(self, xp, q_pos, k_pos, heads, params):
        values = super().compute(xp, q_pos, k_pos, heads, params)
        if self.train_length is None:
            return values
        length = xp.float(xp.maximum(q_pos + 1, 1))  # (..., Lq, 1)
        factor = xp.minimum(self.train_length / length, 1.0)
        return values * factor[..., None, :, :]
