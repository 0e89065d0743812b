"""benchmarks/probe_encoder.py: its probes must find a planted signal and report chance where none is,
or its verdict on an encoder ("this finding is not in the visual tokens") would mean nothing."""

from __future__ import annotations

import torch


def _tokens(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (n, 64, 16) with labels: focal (one random token shifted on channel 0), diffuse (every
    token shifted a little on channel 1), none (labels independent of the tokens). Also the per-token
    targets of the focal label."""
    x = torch.randn(n, 64, 16, generator=gen)
    y = (torch.rand(n, 3, generator=gen) < 0.4).float()
    where = torch.randint(0, 64, (n,), generator=gen)
    per_token = torch.zeros(n, 64, 1)
    focal = y[:, 0].bool()
    x[focal, where[focal], 0] += 4.0
    per_token[focal, where[focal], 0] = 1.0
    x[y[:, 1].bool(), :, 1] += 0.4
    return x, y, per_token


def test_probes_find_planted_signals_and_report_chance_otherwise(monkeypatch, benchmark_script):
    probe = benchmark_script("probe_encoder")
    gen = torch.Generator().manual_seed(0)
    xtr, ytr, ltr = _tokens(800, gen)
    xte, yte, lte = _tokens(300, gen)
    xtr, xte = probe.standardize(xtr, xte, (0,))
    labels = ("focal", "diffuse", "none")
    flat = probe.probe_visual_flat(xtr, ytr, xte, yte, labels, seed=0)
    token_max = probe.probe_token_max(xtr, ytr, xte, yte, labels, seed=0)
    assert token_max["focal"] > 0.9, token_max  # one token of 64 carries it: a max over tokens reads it
    assert flat["diffuse"] > 0.9, flat
    assert max(flat["none"], token_max["none"]) < 0.65, (flat, token_max)

    monkeypatch.setattr(probe, "LESION_TYPES", ("focal",))
    per_patch, study = probe.probe_patch_lesion(xtr, ltr, xte, lte, yte[:, :1], seed=0)
    assert per_patch["focal"] > 0.9 and study["focal"] > 0.9, (per_patch, study)
    # Shuffled per-token targets carry nothing: the same probe must fall to chance.
    shuffled = ltr[torch.randperm(len(ltr), generator=gen)]
    _, study_shuffled = probe.probe_patch_lesion(xtr, shuffled, xte, lte, yte[:, :1], seed=0)
    assert study_shuffled["focal"] < 0.7, study_shuffled


def _blob_volumes(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise volumes (n, 8, 32, 32), patch grid 2x2x2 of 4x16x16; positives get a bright 3x6x6 blob in
    one random patch. Returns volumes, per-patch targets (n, 8, 1), study labels (n, 1)."""
    v = 0.3 * torch.randn(n, 8, 32, 32, generator=gen)
    y = (torch.rand(n, 1, generator=gen) < 0.4).float()
    targets = torch.zeros(n, 8, 1)
    for i in torch.nonzero(y[:, 0]).flatten().tolist():
        p = int(torch.randint(0, 8, (1,), generator=gen))
        z, yy, x = (p // 4) * 4, ((p // 2) % 2) * 16, (p % 2) * 16
        v[i, z: z + 3, yy + 5: yy + 11, x + 5: x + 11] += 1.5
        targets[i, p, 0] = 1.0
    return v.half(), targets, y


def _blob_probe(monkeypatch, benchmark_script, seed: int):
    """The probe module with one lesion type, a generator, and blob studies: 240 training, 80 held out."""
    probe = benchmark_script("probe_encoder")
    monkeypatch.setattr(probe, "LESION_TYPES", ("blob",))
    gen = torch.Generator().manual_seed(seed)
    return probe, gen, _blob_volumes(240, gen), _blob_volumes(80, gen)


def test_cnn_reference_learns_a_visible_lesion(monkeypatch, benchmark_script):
    probe, _, (vtr, ltr, ytr), (vte, lte, yte) = _blob_probe(monkeypatch, benchmark_script, 1)
    per_patch, study = probe.probe_cnn(vtr, ltr, ytr, vte, lte, yte, (4, 16, 16), steps=150, seed=0,
                                       log=lambda _msg: None)
    assert per_patch["blob"] > 0.9 and study["blob"] > 0.9, (per_patch, study)


def test_cnn_reference_with_dense_targets_learns_the_lesion_and_not_shuffled_labels(monkeypatch, benchmark_script):
    probe, gen, (vtr, ltr, ytr), (vte, lte, yte) = _blob_probe(monkeypatch, benchmark_script, 2)
    # voxel masks of the blobs (where the volume was raised), pooled as _render pools them
    mask = (vtr.float() > 0.9).float()[:, None]  # (S, 1, D, H, W): the +1.5 blobs, few noise voxels
    dense = torch.nn.functional.max_pool3d(mask, probe.DENSE_POOL).to(torch.uint8)
    per_patch, study = probe.probe_cnn(vtr, ltr, ytr, vte, lte, yte, (4, 16, 16), steps=150, seed=0,
                                       log=lambda _msg: None, dense_tr=dense)
    assert per_patch["blob"] > 0.9 and study["blob"] > 0.9, (per_patch, study)
    # labels independent of the volumes: the same CNN must report chance on held-out studies
    perm = torch.randperm(len(vtr), generator=gen)
    _, study_shuffled = probe.probe_cnn(vtr, ltr[perm], ytr[perm], vte, lte, yte, (4, 16, 16), steps=150,
                                        seed=0, log=lambda _msg: None, dense_tr=dense[perm])
    assert study_shuffled["blob"] < 0.75, study_shuffled


def test_isolated_blob_filter_scores_a_blob_and_not_a_tube_or_a_wall(benchmark_script):
    probe = benchmark_script("probe_encoder")
    base = torch.zeros(12, 24, 24)
    blob, tube, wall = base.clone(), base.clone(), base.clone()
    blob[5:7, 10:13, 10:13] = 0.6  # a small nodule: dark all around, and 2 slices away
    tube[:, 10:13, 10:13] = 0.6  # a vessel running through every slice
    wall[:, :, 12:] = 0.6  # a chest wall: one side bright
    scores = {name: probe.isolated_blob_score(v) for name, v in (("blob", blob), ("tube", tube), ("wall", wall))}
    assert scores["blob"] > 0.5 and scores["tube"] < 0.05 and scores["wall"] < 0.05, scores
