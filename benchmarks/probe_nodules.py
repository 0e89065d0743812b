"""Why the demo teacher states no nodules: is it the input, the objective, or the encoder?

    python benchmarks/probe_nodules.py --run RUN [--steps 800] [--encoders vit,cnn,seg,hybrid,staged] [--width 16]
        [--threads 2]

RUN is an `edgevlm train` output folder: its cached training set (`volumes-N.npy`, the studies at the
model grid, seeds 0..N-1) and per-patch lesion targets (`lesions-N.npy`, `lesion_patch_targets`) are
reused, so nothing is rendered. Three measurements, on the first N - 400 studies for training and the
last 400 held out:

- `blob_filter`: no training. Connected components of voxels above 0.45 (about -280 HU in the demo-chest
  window) whose 2-voxel shell is at least 70% lung-dark (< 0.25); the study score is the largest one's
  voxel count. Tells how far nodules stand out from what the nodule-free studies hold at this grid.
- `vit` / `cnn`: an encoder trained from scratch on the nodule alone, for --steps steps (batch 16, AdamW 1e-3,
  cosine): per-patch BCE on the nodule targets (positives weighted 20, as the training loop's lesion heads)
  plus a study-level term on the max patch logit (multiple-instance). `vit` is the demo-tiny
  encoder as `edgevlm train` initializes it (`prepare_for_training`); `cnn` is five convolutions down to the
  same 8x8x8 patch grid, each cell centred on its patch. If an encoder trained on nothing else cannot
  rank held-out studies, no loss weighting in the full recipe will make the teacher write nodules.

- `seg` / `hybrid` / `staged`: a dense objective instead, on the nodule's voxel mask (the study
  rendered again without its nodules, voxels moved by more than the loop's LESION_DELTA; cached in RUN as
  `nodule-masks-N.npz`), batches of 8 with half of them nodule studies so every step has dense positives.
  `seg` is four convolutions (GroupNorm, GELU) to a 32 x 32 x 32 voxel-logit map (1 x 4 x 4 blocks of the
  grid), trained with voxel BCE (positives weighted 10); its study score is the map's max. `hybrid` puts the
  same kind of stem under the demo-tiny ViT: the stem's 32 x 32 x 32 features feed a voxel head (the dense
  loss) and, through two strided convolutions, the 8 x 8 x 8 patch tokens that replace the ViT's linear
  patch embedding, whose patch head keeps the per-patch and study-level objective of `vit`; both of its
  scores are reported (`seg` and `patch`). `staged` (after `seg` in --encoders) is the hybrid with `seg`'s
  trained stem and voxel head frozen, the rest trained on the patch objective alone. They ask whether the
  signal a detector learns from dense masks reaches the ViT's patch tokens. --width sets the stem's channels
  (16, 32, 32, 32 at 16); `stem_latency_ms` times the stem at widths 8 and 16 beside the demo-tiny encoder.

Study-level ROC AUC overall and by the largest solid nodule's size band (studies with only ground-glass
or no solid nodule of that band are left out of a band; nodule-free studies are the negatives
everywhere). Writes benchmarks/results/probe-nodules.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results" / "probe-nodules.json"
HELDOUT = 400
BANDS_MM = ((6, 10), (10, 16), (16, 31))
DENSE_KINDS = ("seg", "hybrid", "staged")  # trained by train_dense on the voxel masks; vit and cnn by train_probe


def auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC as the training loop measures it (`finding_auc`: the rank statistic, ties counted half, 3
    decimals); None when `y` holds one class only."""
    from edgevlm.train import finding_auc

    y_col = torch.from_numpy(np.asarray(y, bool)).float()[:, None]
    return finding_auc(torch.from_numpy(np.asarray(score, np.float64))[:, None], y_col, ("nodule",)).get("nodule")


def band_aucs(y: np.ndarray, score: np.ndarray, solid_mm: np.ndarray) -> dict[str, float | None]:
    out = {"all": auc(y, score)}
    for lo, hi in BANDS_MM:
        keep = ~y | ((solid_mm >= lo) & (solid_mm < hi))
        out[f"solid_{lo}_{hi - 1}mm"] = auc(y[keep], score[keep])
    return out


def blob_score(volume: np.ndarray) -> int:
    from scipy import ndimage

    bright = volume > 0.45
    labels, n = ndimage.label(bright)
    sizes = ndimage.sum(bright, labels, range(1, n + 1))
    best = 0
    for i in np.flatnonzero((sizes >= 4) & (sizes <= 400)):
        comp = labels == i + 1
        shell = ndimage.binary_dilation(comp, iterations=2) & ~comp
        if (volume[shell] < 0.25).mean() > 0.7:
            best = max(best, int(sizes[i]))
    return best


class ConvEncoder(torch.nn.Module):
    """(B, 1, 32, 128, 128) -> (B, 512, 64): strides (1,2,2), (1,2,2), 2, 2 reach the 8x8x8 patch grid.

    Strided layers have even kernels (4, padding 1), so each output cell is centred on its 4x16x16 patch
    (cell j at 16j + 7.5 in-plane); 3-wide kernels with stride 2 would centre it on the patch's corner.
    """

    def __init__(self) -> None:
        super().__init__()
        conv, act = torch.nn.Conv3d, torch.nn.GELU
        self.net = torch.nn.Sequential(conv(1, 8, (1, 4, 4), (1, 2, 2), (0, 1, 1)), act(),
                                       conv(8, 16, (3, 4, 4), (1, 2, 2), 1), act(), conv(16, 32, 4, 2, 1), act(),
                                       conv(32, 64, 4, 2, 1), act(), conv(64, 64, 3, 1, 1), act())
        self.dim = 64

    def patch_tokens(self, volume: torch.Tensor) -> torch.Tensor:
        return self.net(volume).flatten(2).transpose(1, 2)  # raster (d, h, w) order, as patchify


def probe_lr(step: int, steps: int) -> float:
    """AdamW 1e-3, 50 warm-up steps, cosine down to 5%: the same schedule for every probe."""
    return 1e-3 * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / steps)))


def _conv_block(c_in: int, c_out: int, kernel: Any, stride: Any, padding: Any) -> list[torch.nn.Module]:
    return [torch.nn.Conv3d(c_in, c_out, kernel, stride, padding), torch.nn.GroupNorm(8, c_out), torch.nn.GELU()]


def dense_stem(width: int) -> torch.nn.Sequential:
    """(B, 1, 32, 128, 128) -> (B, 2 * width, 32, 32, 32); even in-plane kernels keep each cell centred on its
    1 x 4 x 4 block of the grid (cell j at 4j + 1.5)."""
    return torch.nn.Sequential(*_conv_block(1, width, (1, 4, 4), (1, 2, 2), (0, 1, 1)),
                               *_conv_block(width, 2 * width, (1, 4, 4), (1, 2, 2), (0, 1, 1)),
                               *_conv_block(2 * width, 2 * width, 3, 1, 1), *_conv_block(2 * width, 2 * width, 3, 1, 1))


class SegEncoder(torch.nn.Module):
    """A nodule segmenter: `dense_stem` and a 1x1x1 voxel-logit head, (B, 1, 32, 128, 128) -> (B, 1, 32, 32, 32)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = dense_stem(width)
        self.voxel_head = torch.nn.Conv3d(2 * width, 1, 1)

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.voxel_head(self.stem(volume)), None


class HybridEncoder(torch.nn.Module):
    """`dense_stem` under the demo-tiny ViT: voxel logits from the stem, and per-patch nodule logits from the
    ViT's tokens, whose patch embedding is two strided convolutions on the stem's features (cells centred on
    the 4 x 16 x 16 patches, raster d, h, w order as `patchify`)."""

    def __init__(self, vit: torch.nn.Module, dim: int, width: int = 16) -> None:
        super().__init__()
        self.vit = vit
        self.stem = dense_stem(width)
        self.voxel_head = torch.nn.Conv3d(2 * width, 1, 1)
        self.to_tokens = torch.nn.Sequential(*_conv_block(2 * width, 4 * width, 4, 2, 1),
                                             torch.nn.Conv3d(4 * width, dim, 4, 2, 1))
        self.patch_head = torch.nn.Linear(dim, 1)

    def patch_tokens(self, volume: torch.Tensor) -> torch.Tensor:
        return self.forward_features(volume)[1]

    def forward_features(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.stem(volume)
        x = self.to_tokens(features).flatten(2).transpose(1, 2) + self.vit.position_embedding()
        for block in self.vit.blocks:
            x = block(x)
        return features, self.vit.norm(x)

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, tokens = self.forward_features(volume)
        return self.voxel_head(features), self.patch_head(tokens)[..., 0]


def nodule_voxel_masks(run: Path, volumes: torch.Tensor, specs: list) -> dict[int, np.ndarray]:
    """{study: (32, 128, 128) bool} for the nodule studies among `volumes` (RUN's cached renders), cached in
    RUN as nodule-masks-N.npz: `lesion_voxel_masks` for the nodule type."""
    from edgevlm.checkpoint import atomic_write
    from edgevlm.models import PRESETS
    from edgevlm.train import lesion_voxel_masks

    shape = tuple(volumes.shape[1:])
    cache = run / f"nodule-masks-{len(volumes)}.npz"
    if cache.exists():
        packed = np.load(cache)
        return {int(k): np.unpackbits(packed[k])[:np.prod(shape)].reshape(shape).astype(bool) for k in packed.files}
    cfg = PRESETS["demo-tiny"]()
    masks, t0 = {}, time.perf_counter()
    for seed, spec in enumerate(specs):
        if any(f.type == "nodule" for f in spec.findings):
            masks[seed] = lesion_voxel_masks(spec, volumes[seed].numpy(), cfg, types=("nodule",))[0]
    print(f"nodule voxel masks for {len(masks)} studies in {time.perf_counter() - t0:.0f} s", flush=True)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to atomic_write's temp name
            np.savez(f, **{str(k): np.packbits(m) for k, m in masks.items()})

    atomic_write(cache, write)
    return masks


def dense_targets(masks: dict[int, np.ndarray], batch: np.ndarray) -> torch.Tensor:
    """(B, 1, 32, 32, 32): a cell is positive when any voxel of its 1 x 4 x 4 block is."""
    out = torch.zeros(len(batch), 1, 32, 32, 32)
    for row, seed in enumerate(batch):
        if int(seed) in masks:
            out[row, 0] = F.max_pool3d(torch.from_numpy(masks[int(seed)])[None].float(), (1, 4, 4))[0]
    return out


def stem_latency_ms(widths: tuple[int, ...] = (8, 16), repeats: int = 15) -> dict[str, float]:
    """Median ms of `dense_stem` per width on one study (fp32, batch 1, this process's threads), measured
    side by side in one run; the demo-tiny encoder with its linear patch embedding alongside, for scale."""
    from edgevlm.models import PRESETS, MedVLM

    volume = torch.rand(1, 1, 32, 128, 128)
    nets = {f"stem_w{w}": dense_stem(w).eval() for w in widths}
    nets["demo_tiny_encoder"] = MedVLM(PRESETS["demo-tiny"]()).vision.eval()
    times: dict[str, list[float]] = {name: [] for name in nets}
    with torch.no_grad():
        for _ in range(3):
            for net in nets.values():
                net(volume)
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits every net alike
            for name, net in nets.items():
                start = time.perf_counter()
                net(volume)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: round(float(np.median(t)), 1) for name, t in times.items()}


def train_dense(kind: str, volumes: torch.Tensor, masks: dict[int, np.ndarray], targets: torch.Tensor,
                has_nodule: torch.Tensor, train_idx: np.ndarray, test_idx: np.ndarray, solid_mm: np.ndarray,
                steps: int, trained_seg: SegEncoder | None = None, width: int = 16) -> tuple[dict, torch.nn.Module]:
    """`seg`, `hybrid` or `staged` (module docstring): dense voxel BCE, plus the `vit` objective on the
    hybrid's patch head; `staged` takes `trained_seg`'s stem and voxel head frozen and trains the rest on
    the patch objective alone. Returns the record and the trained model."""
    torch.manual_seed(0)
    if kind == "seg":
        model = SegEncoder(width)
    else:
        vit, dim = make_encoder("vit", volumes, train_idx)
        model = HybridEncoder(vit, dim, trained_seg.voxel_head.in_channels // 2 if kind == "staged" else width)
        if kind == "staged":
            model.stem.load_state_dict(trained_seg.stem.state_dict())
            model.voxel_head.load_state_dict(trained_seg.voxel_head.state_dict())
            model.stem.requires_grad_(False)
            model.voxel_head.requires_grad_(False)
    dense_loss = kind != "staged"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    rng = np.random.default_rng(0)
    positives = np.array([i for i in train_idx if int(i) in masks])

    def forward(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.autocast("cpu", torch.bfloat16):
            voxel, patch = model(volumes[idx].float()[:, None])
        return voxel.float(), None if patch is None else patch.float()

    @torch.no_grad()
    def study_scores(idx: np.ndarray) -> dict[str, np.ndarray]:
        model.eval()
        voxel, patch = [], []
        for i in range(0, len(idx), 16):
            v, p = forward(idx[i:i + 16])
            voxel.append(v.flatten(1).amax(1))
            patch.append(None if p is None else p.amax(1))
        model.train()
        out = {"seg": torch.cat(voxel).numpy()}
        if patch[0] is not None:
            out["patch"] = torch.cat(patch).numpy()
        return out

    def bands(idx: np.ndarray) -> dict[str, dict[str, float]]:
        y = has_nodule[idx].numpy() > 0
        return {name: band_aucs(y, score, solid_mm[idx]) for name, score in study_scores(idx).items()}

    history, t0 = [], time.perf_counter()
    for step in range(steps):
        lr = probe_lr(step, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = np.r_[rng.choice(positives, 4, replace=False), rng.choice(train_idx, 4, replace=False)]
        voxel, patch = forward(batch)
        loss = torch.zeros(())
        if dense_loss:
            loss = F.binary_cross_entropy_with_logits(voxel, dense_targets(masks, batch), pos_weight=torch.tensor(10.0))
        if patch is not None:
            loss = (loss + F.binary_cross_entropy_with_logits(patch, targets[batch], pos_weight=torch.tensor(20.0))
                    + F.binary_cross_entropy_with_logits(patch.amax(1), has_nodule[batch]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            train_rows, test_rows = bands(train_idx[:400]), bands(test_idx)
            row = {"step": step + 1, "seconds": round(time.perf_counter() - t0)}
            for name in train_rows:  # the patch head is what the teacher's tokens carry: "heldout" when there is one
                key = "" if name == ("patch" if "patch" in train_rows else "seg") else f"_{name}"
                row[f"train_400{key}"], row[f"heldout{key}"] = train_rows[name], test_rows[name]
            print(kind, json.dumps(row), flush=True)
            history.append(row)
    return {"steps": steps, "width": width, "batch": "8 (4 nodule studies, 4 drawn from all)", "history": history,
            "final": history[-1]}, model


def make_encoder(kind: str, volumes: torch.Tensor, train_idx: np.ndarray) -> tuple[torch.nn.Module, int]:
    if kind == "cnn":
        return ConvEncoder(), 64
    from edgevlm.models import PRESETS, MedVLM
    from edgevlm.train import mean_volume_of, prepare_for_training

    model = MedVLM(PRESETS["demo-tiny"]())
    prepare_for_training(model, mean_volume_of([volumes[i].float() for i in train_idx[:400]]))
    return model.vision, model.cfg.vision.dim


def train_probe(kind: str, volumes: torch.Tensor, targets: torch.Tensor, has_nodule: torch.Tensor,
                train_idx: np.ndarray, test_idx: np.ndarray, solid_mm: np.ndarray, steps: int) -> dict:
    torch.manual_seed(0)
    encoder, dim = make_encoder(kind, volumes, train_idx)
    head = torch.nn.Linear(dim, 1)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    rng = np.random.default_rng(0)

    @torch.no_grad()
    def patch_scores(idx: np.ndarray) -> np.ndarray:
        encoder.eval()
        out = []
        for i in range(0, len(idx), 32):
            with torch.autocast("cpu", torch.bfloat16):
                out.append(head(encoder.patch_tokens(volumes[idx[i:i + 32]].float()[:, None])).float()[..., 0])
        encoder.train()
        return torch.cat(out).numpy()

    def study_scores(idx: np.ndarray) -> np.ndarray:
        return patch_scores(idx).max(1)

    history, t0 = [], time.perf_counter()
    for step in range(steps):
        lr = probe_lr(step, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = rng.choice(train_idx, 16, replace=False)
        with torch.autocast("cpu", torch.bfloat16):
            logits = head(encoder.patch_tokens(volumes[batch].float()[:, None])).float()[..., 0]
        loss = (F.binary_cross_entropy_with_logits(logits, targets[batch], pos_weight=torch.tensor(20.0))
                + F.binary_cross_entropy_with_logits(logits.amax(1), has_nodule[batch]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 200 == 0 or step + 1 == steps:
            y_tr, y_te = has_nodule[train_idx[:400]].numpy() > 0, has_nodule[test_idx].numpy() > 0
            row = {"step": step + 1, "seconds": round(time.perf_counter() - t0),
                   "train_400": band_aucs(y_tr, study_scores(train_idx[:400]), solid_mm[train_idx[:400]]),
                   "heldout": band_aucs(y_te, study_scores(test_idx), solid_mm[test_idx])}
            print(kind, json.dumps(row), flush=True)
            history.append(row)
    # Where the nodule-free held-out studies score highest: one patch in most of them is a location prior,
    # not something the encoder sees there.
    negatives = test_idx[has_nodule[test_idx].numpy() == 0]
    top = np.bincount(patch_scores(negatives).argmax(1), minlength=targets.shape[1])
    hot = int(top.argmax())
    return {"steps": steps, "history": history, "final": history[-1],
            "heldout_negatives_top_patch": {"patch_dhw": [int(i) for i in np.unravel_index(hot, (8, 8, 8))],
                                            "share_of_negatives": round(float(top[hot] / len(negatives)), 3),
                                            "share_of_training_nodule_targets": round(float(
                                                targets[train_idx, hot].sum() / targets[train_idx].amax(1).sum()), 3)}}


def main() -> None:
    from edgevlm.data import sample_study

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="an `edgevlm train` output folder with its caches")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--encoders", default="vit,cnn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=16, help="channels of the dense stem's first layer (seg, hybrid)")
    p.add_argument("--json", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    caches = sorted(args.run.glob("volumes-*.npy"))
    if not caches:
        raise SystemExit(f"{args.run}: no volumes-N.npy (run `edgevlm train -o {args.run}` first)")
    n = int(caches[-1].stem.split("-")[1])
    volumes = torch.from_numpy(np.array(np.load(caches[-1], mmap_mode="r")))  # (N, D, H, W) fp16
    targets = torch.from_numpy(np.array(np.load(args.run / f"lesions-{n}.npy")[:, :, 0])).float()  # nodule column
    if targets.shape[1] != 512:
        raise SystemExit(f"{args.run}: built for demo-tiny's 8x8x8 patch grid, got {targets.shape[1]} patches")
    specs = [sample_study(s) for s in range(n)]
    has_nodule = torch.tensor([any(f.type == "nodule" for f in s.findings) for s in specs]).float()
    solid_mm = np.array([max([f.size_mm for f in s.findings if f.type == "nodule" and f.density == "solid"],
                             default=0) for s in specs])
    train_idx, test_idx = np.arange(n - HELDOUT), np.arange(n - HELDOUT, n)
    t0 = time.perf_counter()
    blob = np.array([blob_score(volumes[i].float().numpy()) for i in test_idx])
    record = {"benchmark": "probe_nodules", "run": args.run.name, "train_studies": n - HELDOUT,
              "heldout_studies": f"seeds {n - HELDOUT}..{n - 1} (training range, not trained on here)",
              "nodule_prevalence": round(float(has_nodule.mean()), 3),
              "blob_filter": {"heldout": band_aucs(has_nodule[test_idx].numpy() > 0, blob, solid_mm[test_idx]),
                              "seconds": round(time.perf_counter() - t0)}}
    print("blob_filter", json.dumps(record["blob_filter"]), flush=True)
    kinds = args.encoders.split(",")
    unknown = set(kinds) - {"vit", "cnn", *DENSE_KINDS}
    if unknown:
        raise SystemExit(f"--encoders: unknown {', '.join(sorted(unknown))} (vit, cnn, seg, hybrid, staged)")
    if "staged" in kinds and ("seg" not in kinds or kinds.index("seg") > kinds.index("staged")):
        raise SystemExit("--encoders: staged builds on seg's trained stem: list seg before it")
    dense = set(DENSE_KINDS) & set(kinds)
    masks = nodule_voxel_masks(args.run, volumes, specs) if dense else {}
    trained_seg = None
    for kind in kinds:
        if kind in DENSE_KINDS:
            record[kind], model = train_dense(kind, volumes, masks, targets, has_nodule, train_idx, test_idx,
                                              solid_mm, args.steps, trained_seg, args.width)
            trained_seg = model if kind == "seg" else trained_seg
        else:
            record[kind] = train_probe(kind, volumes, targets, has_nodule, train_idx, test_idx, solid_mm, args.steps)
    from edgevlm.bench.fingerprint import environment

    if dense:
        record["stem_latency_ms"] = stem_latency_ms()
    record["environment"] = {"cpu": environment()["cpu"], "threads": args.threads}
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.json.write_text(json.dumps(record, indent=2))
    print(f"\n{'study AUC (held out)':<22}" + "".join(f"{k:>16}" for k in record["blob_filter"]["heldout"]))
    for name in ("blob_filter", *args.encoders.split(",")):
        row = record[name]["heldout"] if name == "blob_filter" else record[name]["final"]["heldout"]
        print(f"{name:<22}" + "".join(f"{'-' if v is None else f'{v:.3f}':>16}" for v in row.values()))


if __name__ == "__main__":
    main()
