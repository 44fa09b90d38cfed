"""NumPy backend: the float64 reference and a plain-CPU float32 path."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from ._base import NAMES, Backend, check_dtype_name


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def native_dtype(self, name: str) -> Any:
        name = check_dtype_name(name, NAMES)
        return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)

    def dtype_name(self, dtype: Any) -> str | None:
        try:
            return np.dtype(dtype).name
        except TypeError:
            return None

    def from_numpy(self, array: np.ndarray) -> Any:
        return np.asarray(array)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def cast(self, x: Any, name: str) -> Any:
        return np.asarray(x).astype(self.native_dtype(name), copy=False)

    def is_integer(self, x: Any) -> bool:
        return np.issubdtype(np.asarray(x).dtype, np.integer)

    def sigmoid(self, x):
        return 0.5 * (np.tanh(0.5 * x) + 1)

    fast_toeplitz = True

    def toeplitz(self, g, rows: int, cols: int):
        windows = np.lib.stride_tricks.sliding_window_view(g, cols, axis=-1)
        return np.ascontiguousarray(windows[..., ::-1, :])
