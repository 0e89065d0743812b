"""Where a model keeps the side of a lateral finding: in its visual tokens' places, or in their content too?

    python benchmarks/side_readout.py [--model edgevlm/assets/demo-small.safetensors ...] [--studies 500]

Only studies that HAVE a one-sided effusion (or pneumothorax) count, so presence cannot carry the score (a
"left effusion" label scored over all studies is mostly "effusion"). Per model and finding type, the
leave-one-out AUC of left vs right from a ridge regression (closed-form leave-one-out, standardized
features) on:
- `flat`: all visual tokens flattened: the side, wherever it is written (which token shows the fluid);
- `mean`: their mean over tokens: what an attention head with a content-blind query averages.
A decoder with one layer reads the image through such averages, its query fixed by the current token alone
(it cannot depend on which impression line it is on); to say "left" it needs the side in the tokens'
content (`mean`), where the deeper teacher can look the side up by position (`flat`).
Studies are held out (seeds from HELDOUT_SEED_START + 9,000), rendered at the model grid (`render_study`).
Writes benchmarks/results/side-readout.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgevlm.checkpoint import load_checkpoint
from edgevlm.data.findings import LATERAL_TYPES
from edgevlm.train import HELDOUT_SEED_START, finding_auc, render_study


def loo_ridge_auc(x: np.ndarray, y: np.ndarray, ridge: float) -> float | None:
    """Leave-one-out ROC AUC of a ridge regression (unpenalized intercept) of y (0/1) on x (n, d), in closed
    form: the left-out prediction is ((H y)_i - H_ii y_i) / (1 - H_ii) with H = 11'/n + K (K + ridge I)^-1,
    K from the centred features. The intercept belongs in H: centring y outside it leaks each study's own
    label (with more features than studies, pure noise then scores AUC 1)."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    k = x @ x.T
    n = len(y)
    h = np.full((n, n), 1.0 / n) + k @ np.linalg.inv(k + ridge * np.eye(n))
    loo = (h @ y - np.diag(h) * y) / (1.0 - np.diag(h))
    return finding_auc(torch.from_numpy(loo)[:, None], torch.from_numpy(y)[:, None], ("side",)).get("side")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, nargs="+", default=[Path("edgevlm/assets/demo-small.safetensors"),
                                                                  Path("edgevlm/assets/demo-teacher.safetensors")])
    parser.add_argument("--studies", type=int, default=500, help="held-out studies drawn (about 1 in 7 has each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "side-readout.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = [load_checkpoint(p).model.float().eval() for p in args.model]
    grids = {(m.cfg.vision.image_size, json.dumps(m.cfg.preprocess, sort_keys=True)) for m in models}
    if len(grids) != 1:
        raise SystemExit("the models must share their input grid and preprocessing (one rendering for all)")
    tokens: list[list[np.ndarray]] = [[] for _ in models]
    sides: list[dict[str, str]] = []
    with torch.no_grad():
        for seed in range(HELDOUT_SEED_START + 9_000, HELDOUT_SEED_START + 9_000 + args.studies):
            volume, spec = render_study(seed, models[0].cfg)
            found = {f.type: f.side for f in spec.findings if f.type in LATERAL_TYPES and f.side in ("left", "right")}
            if not found:
                continue
            sides.append(found)
            x = torch.from_numpy(volume).float()[None, None]
            for i, model in enumerate(models):
                tokens[i].append(model.encode_image(x)[0].numpy())
    result: dict = {"benchmark": "side_readout", "studies_drawn": args.studies,
                    "first_seed": HELDOUT_SEED_START + 9_000, "per_model": {}}
    print(f"{'model':<28}{'finding':<18}{'n':>4}{'left':>6}{'flat':>8}{'mean':>8}")
    for path, model_tokens in zip(args.model, tokens, strict=True):
        per_type = {}
        for kind in LATERAL_TYPES:
            rows = [i for i, s in enumerate(sides) if kind in s]
            y = np.array([sides[i][kind] == "left" for i in rows], dtype=np.float64)
            t = np.stack([model_tokens[i] for i in rows]).astype(np.float64)
            # Ridge by the feature count: the flattened tokens have M times the mean's.
            flat = loo_ridge_auc(t.reshape(len(rows), -1), y, 1e2)
            mean = loo_ridge_auc(t.mean(1), y, 1e1)
            per_type[kind] = {"n": len(rows), "n_left": int(y.sum()), "flat_auc": flat, "mean_auc": mean}
            print(f"{str(path)[-27:]:<28}{kind:<18}{len(rows):>4}{int(y.sum()):>6}{flat:>8}{mean:>8}")
        result["per_model"][str(path)] = per_type
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
