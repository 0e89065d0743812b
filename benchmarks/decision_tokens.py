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
`sides`: at the side word of each present effusion / pneumothorax line ("small, right"), teacher-forced the
same way, the AUC of P(left) / (P(left) + P(right)) between left and right studies and how often the
likeliest of left / right / bilateral is the true side: does the decoder read the side of what it found?
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
from edgevlm.data.findings import SIDES
from edgevlm.data.reports import _IMPRESSION_SLOTS
from edgevlm.eval.operating_points import decision_probs, side_probs, teacher_forced_reports
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


def summarize_sides(rows_by_line: dict[str, list[dict]]) -> dict:
    out = {}
    for key, rows in rows_by_line.items():
        lr = [r for r in rows if r["truth"] in ("left", "right")]
        score = torch.tensor([[r["left"] / max(r["left"] + r["right"], 1e-12)] for r in lr])
        truth = torch.tensor([[float(r["truth"] == "left")] for r in lr])
        auc = finding_auc(score, truth, ("left",)).get("left") if lr else None
        correct = [max(SIDES, key=lambda s, r=r: r[s]) == r["truth"] for r in rows]
        out[key] = {"n": len(rows), "n_left": sum(r["truth"] == "left" for r in rows),
                    "n_right": sum(r["truth"] == "right" for r in rows), "left_vs_right_auc": auc,
                    "side_accuracy": round(float(np.mean(correct)), 3) if rows else None}
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
    tokenizer = load_tokenizer(ckpt.tokenizer_json)
    # Held in memory, (report tokens, vocab) per study, so the studies render once for both summaries.
    forced = list(teacher_forced_reports(ckpt.model.float().eval(), tokenizer, synthetic_studies(args.studies)))
    p_none, truth, greedy = decision_probs(tokenizer, forced)
    per_type = summarize(1.0 - p_none, truth, greedy)
    sides = summarize_sides(side_probs(tokenizer, forced))
    print(f"{'finding':<18}{'n+':>4}{'AUC':>7}{'greedy recall':>15}{'P>0.5 recall':>14}{'greedy FPR':>12}"
          f"{'median P+':>11}")
    for kind, r in per_type.items():
        print(f"{kind:<18}{r['n_positive']:>4}{r['auc'] if r['auc'] is not None else '-':>7}"
              f"{r['greedy_recall'] if r['greedy_recall'] is not None else '-':>15}"
              f"{r['p_above_half_recall'] if r['p_above_half_recall'] is not None else '-':>14}"
              f"{r['greedy_fpr']:>12}{r['median_p_positive_when_present'] if r['n_positive'] else '-':>11}")
    for key, r in sides.items():
        print(f"side at {key:<18} n {r['n']:>3} (left {r['n_left']}, right {r['n_right']}): left-vs-right AUC "
              f"{r['left_vs_right_auc']}, side accuracy {r['side_accuracy']}")
    result = {"benchmark": "decision_tokens", "model": str(args.model), "name": ckpt.config.name,
              "heldout_studies": args.studies, "path": "native volume -> preprocess -> teacher-forced true report",
              "per_type": per_type, "sides": sides, "seconds": round(time.perf_counter() - t0, 1),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = args.out or Path(__file__).parent / "results" / f"decision-tokens-{ckpt.config.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
