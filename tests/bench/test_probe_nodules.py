"""benchmarks/probe_nodules.py: its hand-made filter must find an isolated blob in lung and ignore what
touches soft tissue, and its AUC must be the rank statistic, or its verdict (nodules visible, encoders
blind) would mean nothing."""

from __future__ import annotations

import numpy as np
import torch


def _lung(shape: tuple[int, int, int] = (32, 128, 128)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.05 + 0.01 * rng.standard_normal(shape)).astype(np.float32)  # aerated lung in the window


def test_blob_score_counts_an_isolated_nodule_and_ignores_walls_and_specks(benchmark_script):
    probe = benchmark_script("probe_nodules")
    v = _lung()
    assert probe.blob_score(v) == 0
    v[10:12, 40:47, 40:47] = 0.65  # a nodule: 2 slices of 7 x 7 voxels in lung
    assert probe.blob_score(v) == 2 * 7 * 7
    wall = _lung()
    wall[:, :, :20] = 0.65  # chest wall: large, and not surrounded by lung
    wall[16, 60, 60:63] = 0.65  # a 3-voxel speck (a vessel crossing), below the 4-voxel floor
    assert probe.blob_score(wall) == 0
    wall[5:7, 60:66, 18:24] = 0.65  # a blob against the wall: its shell is mostly wall, not lung
    assert probe.blob_score(wall) == 0


def test_auc_is_the_rank_statistic_and_bands_keep_their_negatives(benchmark_script):
    probe = benchmark_script("probe_nodules")
    y = np.array([0, 0, 1, 1, 0, 1], bool)
    assert probe.auc(y, np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])) == 1.0
    assert probe.auc(y, -np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])) == 0.0
    assert probe.auc(y, np.array([0.1, 0.5, 0.8, 0.2, 0.3, 0.7])) == round(7 / 9, 3)  # 0.2 beats one of three
    solid_mm = np.array([0, 0, 8, 20, 0, 12])
    bands = probe.band_aucs(y, np.array([0.1, 0.5, 0.8, 0.2, 0.3, 0.7]), solid_mm)
    assert bands == {"all": round(7 / 9, 3), "solid_6_9mm": 1.0, "solid_10_15mm": 1.0, "solid_16_30mm": 0.333}


def test_conv_encoder_reaches_the_patch_grid_in_raster_order(benchmark_script):
    """The CNN's cells must be centred on the ViT's patches (the targets are per patch, raster d, h, w): a
    voxel at a patch's centre moves that patch's cell most."""
    probe = benchmark_script("probe_nodules")
    torch.manual_seed(0)
    encoder = probe.ConvEncoder()
    base = torch.zeros(1, 1, 32, 128, 128)
    lit = base.clone()
    lit[0, 0, 13, 71, 39] = 1.0  # the centre of patch (3, 4, 2) of 4 x 16 x 16
    with torch.no_grad():
        diff = (encoder.patch_tokens(lit) - encoder.patch_tokens(base)).abs().sum(-1)[0]
    assert diff.shape == (512,)
    assert int(diff.argmax()) == np.ravel_multi_index((3, 4, 2), (8, 8, 8))
