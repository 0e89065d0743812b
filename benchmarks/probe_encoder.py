"""Does a trained model's encoder see each finding? Study-level probes on its frozen tokens.

    python benchmarks/probe_encoder.py [--model edgevlm/assets/demo-teacher.safetensors] \
        [--train-studies 1600] [--heldout-studies 200] [--threads 2]

A report can only state what the visual tokens carry. Before blaming the decoder for a finding its
reports miss (or spending hours training one), fit small probes on the frozen encoder's outputs and
read their held-out study-level ROC AUC per finding type:
- `visual_flat`: one logistic regression on all visual tokens (the projector's output, what the decoder
  reads), flattened: any linearly decodable study-level signal, wherever it sits;
- `visual_max`: a per-visual-token linear score, pooled by log-sum-exp over tokens (plus a learned
  per-token offset): what one attention head that looks for "the most nodule-like token" can read;
- `patch_lesion_max`: an MLP on each ViT patch token trained on the per-patch lesion targets the
  training loop uses (`lesion_patch_targets`), its study score the max over patches; reported with its
  per-patch AUC, which alone says little (512 patches a study: a per-patch AUC of 0.9 still leaves
  false positives in every study).
- `cnn` (with --cnn-steps N): a reference, not a probe of the model: a small 3D CNN trained from scratch
  on the volumes for N steps with the same per-patch targets (plus a study-level max term), its study
  score the max over its patch grid. It tells whether a finding can be learnt from this input at all,
  and roughly what it takes, when the model's own tokens do not carry it.
- `isolated_blob_filter`: no training, no model: `isolated_blob_score`, a hand-made nodule filter (a voxel
  brighter than all its neighbours 5 voxels away in-plane and 2 slices away), its study score the max. If
  the nodule-free studies score as high as those with a nodule, the nodules do not stand out by local
  contrast from what else the phantom draws at this grid: an encoder must learn shape and context.
Training studies are seeds 0.. (the training range), held-out ones from HELDOUT_SEED_START, rendered
at the model grid (`render_study`). A probe AUC near 0.5 means the encoder, not the decoder, is what
keeps that finding out of the reports. Writes benchmarks/results/probe-encoder-<model name>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edgevlm.bench.fingerprint import environment
from edgevlm.checkpoint import atomic_write, load_checkpoint
from edgevlm.train import (
    HELDOUT_SEED_START,
    LESION_TYPES,
    finding_auc,
    finding_labels,
    finding_targets,
    lesion_voxel_masks,
    mean_volume_of,
    patch_targets_from_masks,
    render_study,
)

DENSE_POOL = (2, 4, 4)  # the CNN's stride-(2, 4, 4) stage: 16 x 32 x 32 cells of 20 x 11 x 11 mm at the demo grid


def _render(args: tuple[int, object, bool]) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray | None]:
    seed, cfg, dense = args
    torch.set_num_threads(1)
    volume, spec = render_study(seed, cfg)
    masks = lesion_voxel_masks(spec, volume, cfg)
    cells = None
    if dense:
        cells = F.max_pool3d(torch.from_numpy(masks).float()[None], DENSE_POOL)[0].to(torch.uint8).numpy()
    return volume, finding_targets(spec), patch_targets_from_masks(masks, cfg), cells


@torch.no_grad()
def encode(model, volumes: list[np.ndarray], batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens (S, N, vision_dim), visual tokens (S, M, dim)) of the frozen model."""
    patches, visual = [], []
    for i in range(0, len(volumes), batch):
        x = torch.from_numpy(np.stack(volumes[i: i + batch]))[:, None]
        tokens = model.vision.patch_tokens(x)
        patches.append(tokens)
        visual.append(model.projector(tokens))
    return torch.cat(patches), torch.cat(visual)


def standardize(train: torch.Tensor, test: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(dims, keepdim=True), train.std(dims, keepdim=True) + 1e-4
    return (train - mean) / std, (test - mean) / std


def fit(score: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
        steps: int, batch: int,
        lr: float, weight_decay: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(score(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def probe_visual_flat(xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, labels: Sequence[str], seed: int) -> dict:
    w = torch.zeros(xtr[0].numel(), ytr.shape[1], requires_grad=True)
    b = torch.zeros(ytr.shape[1], requires_grad=True)

    def score(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ w + b

    fit(score, [w, b], xtr, ytr, steps=300, batch=256, lr=1e-2, weight_decay=1e-3, seed=seed)
    with torch.no_grad():
        return finding_auc(score(xte), yte, labels)


def probe_token_max(xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, labels: Sequence[str], seed: int) -> dict:
    torch.manual_seed(seed)
    n_tokens, dim = xtr.shape[1:]
    w = (torch.randn(dim, ytr.shape[1]) * 0.01).requires_grad_()
    offset = torch.zeros(n_tokens, ytr.shape[1], requires_grad=True)
    b = torch.zeros(ytr.shape[1], requires_grad=True)

    def score(x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(x @ w + offset, dim=1) + b

    # A focal signal in one token of many needs a large weight before it wins the log-sum-exp: 300 steps
    # at 1e-2 left a planted one-token signal at AUC 0.63 (tests/bench/test_probe_encoder.py), 1000 at 2e-2 0.96.
    fit(score, [w, offset, b], xtr, ytr, steps=1000, batch=256, lr=2e-2, weight_decay=1e-3, seed=seed)
    with torch.no_grad():
        return finding_auc(score(xte), yte, labels)


def probe_patch_lesion(ptr: Tensor, ltr: Tensor, pte: Tensor, lte: Tensor, yte_focal: Tensor,
                       seed: int) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    n_patches, dim = ptr.shape[1:]
    head = torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.GELU(), torch.nn.Linear(256, len(LESION_TYPES)))
    offset = torch.zeros(n_patches, len(LESION_TYPES), requires_grad=True)

    def score(x: torch.Tensor) -> torch.Tensor:
        return head(x) + offset

    fit(score, [*head.parameters(), offset], ptr, ltr, steps=600, batch=64, lr=3e-3, weight_decay=1e-4, seed=seed)
    with torch.no_grad():
        logits = score(pte)
    per_patch = finding_auc(logits.reshape(-1, len(LESION_TYPES)), lte.reshape(-1, len(LESION_TYPES)), LESION_TYPES)
    return per_patch, finding_auc(logits.amax(1), yte_focal, LESION_TYPES)


def _conv_block(c_in: int, c_out: int, stride: tuple[int, int, int] | int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv3d(c_in, c_out, 3, stride, 1), torch.nn.GroupNorm(4, c_out),
                               torch.nn.GELU())


def probe_cnn(vtr: torch.Tensor, ltr: torch.Tensor, ytr_focal: torch.Tensor, vte: torch.Tensor, lte: torch.Tensor,
              yte_focal: torch.Tensor, patch: tuple[int, int, int], steps: int, seed: int,
              batch: int = 8, log: Callable[[str], None] = print,
              dense_tr: torch.Tensor | None = None) -> tuple[dict, dict]:
    """A from-scratch 3D CNN on the volumes (S, D, H, W) with per-patch targets (S, num_patches, types):
    stride 4 in z and 16 in-plane, so its output grid is the ViT's patch grid for 4x16x16 patches.
    `dense_tr` (S, types, D/2, H/4, W/4): also a dense head on the stride-(2, 4, 4) stage, trained on the
    voxel lesion masks max-pooled to it (each cell 20 x 11 x 11 mm at the demo grid: a 9 mm nodule fills
    about one), plus its own study-level max term; the study score stays the patch grid's max.
    Returns (per-patch AUC, study-level AUC of the max over patches), both held out."""
    assert tuple(patch) == (4, 16, 16), f"the CNN reference is built for 4x16x16 patches, got {patch}"
    torch.manual_seed(seed)
    types = ltr.shape[-1]
    stem = torch.nn.Sequential(_conv_block(1, 16, (1, 2, 2)), _conv_block(16, 32, 2))
    net = torch.nn.Sequential(stem, _conv_block(32, 48, 2), _conv_block(48, 64, (1, 2, 2)),
                              torch.nn.Conv3d(64, types, 1))
    dense_head = torch.nn.Conv3d(32, types, 1) if dense_tr is not None else None
    mean = mean_volume_of(list(vtr))  # centred input, as the training loop centres the ViT's

    def logits(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, D, H, W) -> ((B, num_patches, types) in raster order, dense logits or None)."""
        cells = stem((v.float() - mean)[:, None])
        dense = dense_head(cells) if dense_head is not None else None
        return net[1:](cells).flatten(2).transpose(1, 2), dense

    params = [*net.parameters(), *(dense_head.parameters() if dense_head is not None else [])]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    pos_weight = torch.tensor(20.0)  # lesion patches are ~0.1-1% of all patches
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(vtr), (batch,), generator=gen)
        out, dense = logits(vtr[idx])
        loss = (F.binary_cross_entropy_with_logits(out, ltr[idx], pos_weight=pos_weight)
                + F.binary_cross_entropy_with_logits(out.amax(1), ytr_focal[idx]))
        if dense is not None:
            target = dense_tr[idx].float()
            loss = loss + (F.binary_cross_entropy_with_logits(dense, target, pos_weight=pos_weight)
                           + F.binary_cross_entropy_with_logits(dense.flatten(2).amax(2), ytr_focal[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            log(f"cnn step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    net.eval()
    with torch.no_grad():
        out = torch.cat([logits(vte[i: i + 25])[0] for i in range(0, len(vte), 25)])
    return (finding_auc(out.reshape(-1, types), lte.reshape(-1, types), LESION_TYPES),
            finding_auc(out.amax(1), yte_focal, LESION_TYPES))


def isolated_blob_score(volume: torch.Tensor, radius: int = 5, z_gap: int = 2) -> float:
    """A hand-made nodule filter, no training: the largest amount by which a voxel is brighter than every
    voxel `radius` voxels away in-plane (8 directions) and `z_gap` slices above and below. An isolated
    soft-tissue blob in lung scores its contrast; a wall, a boundary or a vessel running through the slab
    scores little, since one of those neighbours is as bright. Tells whether the input's nodules stand
    out by contrast alone from what the nodule-free studies hold."""
    t = volume.float()
    r = radius
    shifts = [(0, r), (0, -r), (r, 0), (-r, 0), (r, r), (r, -r), (-r, r), (-r, -r)]
    neighbours = [torch.roll(t, s, (1, 2)) for s in shifts] + [torch.roll(t, z_gap, 0), torch.roll(t, -z_gap, 0)]
    return float((t - torch.stack(neighbours).amax(0)).amax())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("edgevlm/assets/demo-teacher.safetensors"))
    parser.add_argument("--train-studies", type=int, default=1600)
    parser.add_argument("--heldout-studies", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cnn-steps", type=int, default=0,
                        help="also train the from-scratch CNN reference for this many steps (0: off)")
    parser.add_argument("--cnn-dense", action="store_true",
                        help="the CNN reference also learns the voxel lesion masks (a dense head at stride 2x4x4)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = load_checkpoint(args.model)
    cfg = ckpt.config
    seeds = [*range(args.train_studies), *range(HELDOUT_SEED_START, HELDOUT_SEED_START + args.heldout_studies)]
    t0 = time.perf_counter()
    with Pool(args.threads) as pool:
        rendered = pool.map(_render, [(s, cfg, args.cnn_dense) for s in seeds], chunksize=8)
    render_s = time.perf_counter() - t0
    volumes = [r[0] for r in rendered]
    targets = torch.stack([r[1] for r in rendered])
    lesions = torch.from_numpy(np.stack([r[2] for r in rendered])).float()
    dense = torch.from_numpy(np.stack([r[3] for r in rendered])) if args.cnn_dense else None
    t0 = time.perf_counter()
    patches, visual = encode(ckpt.model, volumes)
    encode_s = time.perf_counter() - t0
    # the hand-made filter needs no training: held-out studies only
    blob = torch.tensor([[isolated_blob_score(torch.from_numpy(v))] for v in volumes[args.train_studies:]])
    # fp16 (S, D, H, W), kept only for the CNN reference
    volumes = torch.from_numpy(np.stack(volumes)).half() if args.cnn_steps else None

    n = args.train_studies
    labels = finding_labels()
    focal = [labels.index(t) for t in LESION_TYPES]
    vtr, vte = standardize(visual[:n], visual[n:], (0,))
    ptr, pte = standardize(patches[:n], patches[n:], (0, 1))
    ytr, yte = targets[:n], targets[n:]
    probes = {
        "visual_flat": probe_visual_flat(vtr, ytr, vte, yte, labels, args.seed),
        "visual_max": probe_token_max(vtr, ytr, vte, yte, labels, args.seed),
    }
    per_patch, study = probe_patch_lesion(ptr, lesions[:n], pte, lesions[n:], yte[:, focal], args.seed)
    probes["patch_lesion_max"] = study
    cnn = None
    if args.cnn_steps:
        t0 = time.perf_counter()
        cnn_patch, cnn_study = probe_cnn(volumes[:n], lesions[:n], ytr[:, focal], volumes[n:], lesions[n:],
                                         yte[:, focal], cfg.vision.patch_size, args.cnn_steps, args.seed,
                                         dense_tr=dense[:n] if dense is not None else None)
        probes["cnn"] = cnn_study
        cnn = {"steps": args.cnn_steps, "batch": 8, "per_patch_auc": cnn_patch, "dense_head": args.cnn_dense,
               "train_s": round(time.perf_counter() - t0, 1)}
    probes["isolated_blob_filter"] = finding_auc(blob.expand(-1, len(focal)), yte[:, focal], LESION_TYPES)
    result = {
        "benchmark": "probe_encoder", "model": str(args.model), "model_name": cfg.name,
        "train_studies": n, "heldout_studies": args.heldout_studies, "heldout_first_seed": HELDOUT_SEED_START,
        "heldout_prevalence": {label: round(float(yte[:, j].mean()), 3) for j, label in enumerate(labels)},
        "study_auc": probes, "patch_lesion_per_patch_auc": per_patch, "cnn_reference": cnn,
        "render_s": round(render_s, 1), "encode_s": round(encode_s, 1),
        "environment": environment(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"held-out study-level ROC AUC ({args.heldout_studies} studies, {n} training studies for the probes)")
    print(f"{'finding':18s} {'prevalence':>10s} " + " ".join(f"{k:>16s}" for k in probes))
    for label in labels:
        cells = " ".join(f"{probes[k].get(label, float('nan')):16.3f}" for k in probes)
        print(f"{label:18s} {result['heldout_prevalence'][label]:10.3f} {cells}")
    print("per-patch AUC of the lesion probe:", per_patch)
    if cnn:
        print(f"per-patch AUC of the CNN reference ({cnn['steps']} steps, {cnn['train_s']:.0f} s):",
              cnn["per_patch_auc"])
    out = args.out or Path(__file__).parent / "results" / f"probe-encoder-{cfg.name}.json"
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
