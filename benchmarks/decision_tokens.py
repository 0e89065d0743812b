"""Are a model's report decisions ranked well but called wrong? The structured impression's decision tokens.

    python benchmarks/decision_tokens.py --model RUN/model.safetensors [--studies 40] [--out JSON]

Every generated report opens with one line per finding type ("Pleural effusion: none." or "Pleural
effusion: small, right."), so the token after each "Type:" is where greedy decoding decides presence.
Teacher-forced on the TRUE report of held-out studies (preprocessed from their native volumes, as `edgevlm
eval` does), per finding type:
- `auc`: ROC AUC of P(positive) = 1 - P(" none") at that position: how well the decoder ranks studies;
- `greedy_recall` / `greedy_fpr`: how often the argmax there is not " none" on studies with / without the
  finding;
- `p_above_half_recall` / `p_above_half_fpr`: the same with P(positive) > 0.5, which differs from greedy
  when the positive mass is split over several words ("small" / "moderate" / "large").
A high AUC with a low recall says the decisions are calibrated towards "none" (the reports under-call), not
that the model does not see the finding: a training problem of the decision tokens, not of the encoder.
Writes benchmarks/results/decision-tokens-<model name>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgevlm.checkpoint import load_checkpoint
from edgevlm.data.reports import _IMPRESSION_SLOTS
from edgevlm.eval.operating_points import decision_probs
from edgevlm.eval.runner import synthetic_studies
from edgevlm.models.tokenizer import load_tokenizer
from edgevlm.train import finding_auc


def summarize(p_pos: np.ndarray, truth: np.ndarray, greedy: np.ndarray) -> dict:
    types = tuple(kind for kind, _ in _IMPRESSION_SLOTS)
    auc = finding_auc(torch.from_numpy(p_pos), torch.from_numpy(truth).float(), types)
    out = {}
    for i, kind in enumerate(types):
        pos, neg = truth[:, i], ~truth[:, i]

        def rate(mask: np.ndarray, hit: np.ndarray) -> float | None:
            return round(float(hit[mask].mean()), 3) if mask.any() else None

        above_half = p_pos[:, i] > 0.5
        median_present = round(float(np.median(p_pos[pos, i])), 3) if pos.any() else None
        out[kind] = {"n_positive": int(pos.sum()), "auc": auc.get(kind),
                     "greedy_recall": rate(pos, greedy[:, i]), "greedy_fpr": rate(neg, greedy[:, i]),
                     "p_above_half_recall": rate(pos, above_half), "p_above_half_fpr": rate(neg, above_half),
                     "median_p_positive_when_present": median_present}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="checkpoint; its tokenizer must spell ' none' as one token")
    parser.add_argument("--studies", type=int, default=40, help="held-out synthetic studies")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model)
    t0 = time.perf_counter()
    p_none, truth, greedy = decision_probs(ckpt.model.float().eval(), load_tokenizer(ckpt.tokenizer_json),
                                           synthetic_studies(args.studies))
    per_type = summarize(1.0 - p_none, truth, greedy)
    print(f"{'finding':<18}{'n+':>4}{'AUC':>7}{'greedy recall':>15}{'P>0.5 recall':>14}{'greedy FPR':>12}"
          f"{'median P+':>11}")
    for kind, r in per_type.items():
        print(f"{kind:<18}{r['n_positive']:>4}{r['auc'] if r['auc'] is not None else '-':>7}"
              f"{r['greedy_recall'] if r['greedy_recall'] is not None else '-':>15}"
              f"{r['p_above_half_recall'] if r['p_above_half_recall'] is not None else '-':>14}"
              f"{r['greedy_fpr']:>12}{r['median_p_positive_when_present'] if r['n_positive'] else '-':>11}")
    result = {"benchmark": "decision_tokens", "model": str(args.model), "name": ckpt.config.name,
              "heldout_studies": args.studies, "path": "native volume -> preprocess -> teacher-forced true report",
              "per_type": per_type, "seconds": round(time.perf_counter() - t0, 1),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = args.out or Path(__file__).parent / "results" / f"decision-tokens-{ckpt.config.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
