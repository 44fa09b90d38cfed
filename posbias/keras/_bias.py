"""``posbias.keras.PositionalBias``: a bias and its learnable parameters as a Keras layer."""

from __future__ import annotations

from typing import Any

import keras

from .._core import layers as _layers
from . import _engine


@keras.saving.register_keras_serializable(package="posbias.keras")
class PositionalBias(
    _layers.PosbiasErrorsFromConfig, _layers.KerasBiasParamsMixin, keras.layers.Layer
):
    """The bias as a Keras 3 layer on any Keras backend: ``layer(q_pos, k_pos)`` → ``(H, Lq, Lk)``.

    ``bias[h, i, j]`` of the spec at query positions ``q_pos`` and key positions
    ``k_pos`` (or ``q_len=``/``k_len=`` with bottom-right alignment), float32
    unless ``dtype=`` asks otherwise, as a native tensor of Keras' backend.

    Args:
        bias: registered name, ``BiasSpec`` or config dict.
        num_heads: head count when ``bias`` is a name.
        bias_options: hyper-parameters of the named bias (a dict).
        seed: seed of the NumPy initialisation of learnable parameters (an int >= 0),
            shared with every framework.
        **kwargs: hyper-parameters of the named bias (e.g. ``bidirectional=False``)
            and ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).

    Learnable variants hold their parameters as float32 Keras variables
    (``layer.bias_params[name]``, never autocast), saved in ``.keras`` files and
    trained by ``fit``; ``export_params()`` / ``load_params()`` move them to and
    from a portable ``dict`` of NumPy arrays.

    Raises:
        UnknownBiasError, ConfigError, InvalidArgumentError, InvalidTypeError: a
            bad ``bias``, head count, hyper-parameter or ``seed``.
        BackendError: Keras runs on a backend posbias cannot compute on.

    Example:
        >>> from posbias.keras import PositionalBias
        >>> layer = PositionalBias("alibi", num_heads=2)
        >>> tuple(layer(q_len=1, k_len=3).shape)
        (2, 1, 3)
    """

    def __init__(
        self,
        bias: Any = "alibi",
        num_heads: int | None = None,
        bias_options: dict[str, Any] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        _engine.keras_backend()
        hyper = _layers.split_bias_keywords(bias, bias_options, kwargs)
        super().__init__(**kwargs)
        self._build_bias_params(bias, num_heads, hyper, seed)

    def call(
        self,
        q_pos: Any = None,
        k_pos: Any = None,
        *,
        q_len: int | None = None,
        k_len: int | None = None,
        q_offset: Any = None,
        k_offset: Any = None,
        heads: Any = None,
        dtype: Any = "float32",
    ) -> Any:
        xp = _engine.backend_for(q_pos)
        args = (q_len, k_len, q_pos, k_pos, q_offset, k_offset, heads, dtype)
        return self._bias(xp.name, *args, device=xp.device)

    def _read_param(self, name: str) -> Any:
        # the variable's current value: under JAX's stateless calls (fit, jit) the traced one
        return keras.ops.convert_to_tensor(self.bias_params[name])
