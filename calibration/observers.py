"""Activation statistics of the vision encoder through onnxruntime's calibrators.

`VolumeReader` feeds a calibration set to onnxruntime's `CalibrationDataReader` interface (one volume
per batch: the calibrators collect every intermediate tensor per batch, and a ViT-B on 32x256x256 holds
~5 GB of attention maps per volume). `CALIBRATION_METHODS` maps our names to onnxruntime's observers:

    minmax      running min/max of each tensor (exact range; one outlier stretches it)
    percentile  histogram, range clipped at the 99.999th percentile (onnxruntime's default)
    entropy     histogram, range minimising the KL divergence between float and int8 distributions
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgevlm.errors import EdgeVLMError


def calibration_methods() -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}


def check_method(name: str) -> None:
    if name not in ("minmax", "percentile", "entropy"):
        raise EdgeVLMError(f"--calib-method must be minmax, percentile or entropy, got {name!r}")


def volume_reader(volumes: np.ndarray, input_name: str = "volume",
                  on_volume: Callable[[], None] | None = None) -> Any:
    """An onnxruntime CalibrationDataReader over (N, 1, D, H, W) volumes, one per batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class VolumeReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.index = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index >= len(volumes):
                return None
            batch = np.ascontiguousarray(volumes[self.index:self.index + 1], dtype=np.float32)
            self.index += 1
            if on_volume:
                on_volume()
            return {input_name: batch}

        def rewind(self) -> None:
            self.index = 0

    return VolumeReader()

