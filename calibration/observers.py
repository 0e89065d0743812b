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



def decoder_feeds(backend: Any, table: np.ndarray, volumes: np.ndarray, prompts: list[list[int]], image_id: int,
                  max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[dict[str, np.ndarray]]:
    """Prefill inputs of decoder.onnx for data-aware int4 (GPTQ): one sequence per calibration volume.

    Each is the volume's visual tokens, a prompt (cycled over `prompts`) and the fp32 graphs' own greedy
    answer to it, run as one prefill over an empty cache: every linear layer sees the activations of
    real image, prompt and report positions, with no labels needed (a folder of unlabeled studies
    calibrates as well as synthetic ones). `backend`: the fp32 OrtBackend of the same export.
    """
    from edgevlm.models import GenerationConfig
    from edgevlm.runtime.session import generate_ids, splice_embeddings

    gen = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    feeds = []
    for i in range(len(volumes)):
        volume = volumes[i:i + 1]
        prompt = list(prompts[i % len(prompts)])
        visual = backend.encode(volume)
        answer = generate_ids(backend, table, volume, [prompt], image_id, gen)[0]
        ids = np.asarray([prompt + answer], dtype=np.int64)
        t = ids.shape[1]
        cache = np.zeros((1, backend.cache_shape_tail[0], t, backend.cache_shape_tail[1]), np.float32)
        feed = {"embeds": splice_embeddings(table, ids, visual, image_id).astype(np.float32),
                "input_pos": np.arange(t, dtype=np.int64), "rope_pos": np.arange(t, dtype=np.int64)[None],
                "key_valid": np.ones((1, t), dtype=bool)}
        feed.update({name: cache for name in backend.past_names})
        feeds.append(feed)
    return feeds
