"""edgevlm.calibration: calibration sets (studies -> a bundle's preprocessing) and the activation
observers (onnxruntime's min-max, percentile and entropy calibrators) used by int8 export."""

from edgevlm.calibration.dataset import (
    CALIB_SEED_START,
    GATE_SEED_START,
    CalibrationSet,
    array_sha256,
    build_calibration_set,
    render_synthetic,
)
from edgevlm.calibration.observers import calibration_methods, check_method, decoder_feeds, volume_reader

__all__ = [
    "CALIB_SEED_START",
    "GATE_SEED_START",
    "CalibrationSet",
    "array_sha256",
    "build_calibration_set",
    "calibration_methods",
    "check_method",
    "decoder_feeds",
    "render_synthetic",
    "volume_reader",
]
