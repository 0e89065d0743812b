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


def _support_centre(layers: torch.nn.Module, cell: tuple[int, int, int]) -> tuple[float, ...]:
    """Centre of the bounding box of the input voxels one output cell depends on. GroupNorm is left out: it
    couples every voxel through its statistics, while the question is where the convolutions look."""
    local = torch.nn.Sequential(*[m for m in layers.modules()
                                  if isinstance(m, torch.nn.Conv3d | torch.nn.GELU)])
    volume = torch.rand(1, 1, 32, 128, 128, requires_grad=True)
    local(volume)[(0, slice(None), *cell)].sum().backward()
    idx = np.argwhere(volume.grad[0, 0].numpy() != 0)
    return tuple((idx.min(0) + idx.max(0)) / 2)


def test_dense_encoders_keep_their_cells_on_the_grid_blocks_the_targets_use(benchmark_script):
    """The voxel head's cell (z, y // 4, x // 4) must look at its 1 x 4 x 4 block of the grid, the hybrid's
    token at its 4 x 16 x 16 patch (raster order), and `dense_targets` must mark that same cell, or the
    dense loss would teach a neighbour (3-wide stride-2 kernels put a cell 1.5 voxels off its block)."""
    probe = benchmark_script("probe_nodules")
    torch.manual_seed(0)
    seg = probe.SegEncoder()
    assert _support_centre(seg.stem, (13, 17, 9)) == (13.0, 4 * 17 + 1.5, 4 * 9 + 1.5)
    mask = np.zeros((32, 128, 128), bool)
    mask[13, 70, 38] = True
    cells = probe.dense_targets({7: mask}, np.array([7, 3]))
    assert cells.shape == (2, 1, 32, 32, 32) and cells[1].sum() == 0 and cells[0].sum() == 1
    assert cells[0, 0, 13, 70 // 4, 38 // 4] == 1

    from edgevlm.models import PRESETS, MedVLM

    vit = MedVLM(PRESETS["demo-tiny"]()).vision
    hybrid = probe.HybridEncoder(vit, vit.cfg.dim)
    # Patch (3, 4, 2) spans z 12..15, y 64..79, x 32..47.
    assert _support_centre(torch.nn.Sequential(hybrid.stem, hybrid.to_tokens), (3, 4, 2)) == (13.5, 71.5, 39.5)
    with torch.no_grad():
        voxel_logits, patch_logits = hybrid(torch.rand(2, 1, 32, 128, 128))
    assert voxel_logits.shape == (2, 1, 32, 32, 32) and patch_logits.shape == (2, 512)


def test_nodule_voxel_masks_mark_the_nodule_and_are_cached(benchmark_script, tmp_path):
    """On two real renders (seed 0 has a nodule, seed 3 none): the mask is the nodule's few voxels, inside the
    study's own nodule patches, and a second call reads the cache instead of rendering."""
    probe = benchmark_script("probe_nodules")
    from edgevlm.data import sample_study
    from edgevlm.models import PRESETS
    from edgevlm.train import lesion_patch_targets, patch_targets_from_masks, render_spec

    cfg = PRESETS["demo-tiny"]()
    specs = [sample_study(s) for s in (0, 3)]
    assert [any(f.type == "nodule" for f in s.findings) for s in specs] == [True, False]
    volumes = torch.from_numpy(np.stack([render_spec(s, cfg) for s in specs]).astype(np.float16))
    masks = probe.nodule_voxel_masks(tmp_path, volumes, specs)
    assert set(masks) == {0} and 4 <= masks[0].sum() <= 400
    patches = patch_targets_from_masks(masks[0][None], cfg)[:, 0].astype(bool)
    expected = lesion_patch_targets(specs[0], volumes[0].float().numpy(), cfg)[:, 0].astype(bool)
    assert np.array_equal(patches, expected)
    # A second call must read the cache, not the volumes: blank ones would give empty masks.
    again = probe.nodule_voxel_masks(tmp_path, torch.zeros_like(volumes), specs)
    assert set(again) == {0} and np.array_equal(again[0], masks[0])


def test_staged_trains_on_the_frozen_segmenter_stem(benchmark_script):
    """One step of `seg` then `staged` on random studies: the staged model starts from the segmenter's stem and
    voxel head and leaves them as they are, while its token convolutions and ViT move."""
    probe = benchmark_script("probe_nodules")
    torch.manual_seed(0)
    volumes = torch.rand(10, 32, 128, 128).half()
    masks = {i: np.zeros((32, 128, 128), bool) for i in range(5)}
    for i in masks:
        masks[i][10:12, 60:66, 30:36] = True
    targets = torch.zeros(10, 512)
    targets[:5, np.ravel_multi_index((2, 3, 2), (8, 8, 8))] = 1.0
    has_nodule = (torch.arange(10) < 5).float()
    train_idx, test_idx, solid_mm = np.r_[0:4, 5:9], np.array([4, 9]), np.r_[[20.0] * 5, [0.0] * 5]
    args = (volumes, masks, targets, has_nodule, train_idx, test_idx, solid_mm, 1)
    seg_record, seg = probe.train_dense("seg", *args)
    assert seg_record["final"]["step"] == 1 and seg_record["final"]["heldout"]["solid_6_9mm"] is None  # no such study
    staged_record, staged = probe.train_dense("staged", *args, trained_seg=seg)
    assert {"heldout", "heldout_seg"} <= set(staged_record["final"])
    for ours, theirs in ((staged.stem, seg.stem), (staged.voxel_head, seg.voxel_head)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(),
                                                        strict=True))
    torch.manual_seed(0)  # as train_dense starts: the same initial weights
    fresh = probe.HybridEncoder(*probe.make_encoder("vit", volumes, train_idx))
    assert not torch.equal(staged.to_tokens[0].weight, fresh.to_tokens[0].weight)  # same seed, one step apart
