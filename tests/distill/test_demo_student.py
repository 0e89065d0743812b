"""The shipped demo student: its committed record is true to the file and to a fresh eval.

The record (edgevlm/assets/demo-small.json, written by benchmarks/distill.py) holds the student's and the
teacher's eval on >= 100 held-out studies and the measured speedup. These tests hold it to account: the
hash is the file's, the retained fractions and the pass flags follow from the recorded numbers, the
student is the demo-small preset distilled from the shipped teacher, and a fresh eval on 20 held-out
studies nobody has scored agrees with the recorded student numbers. Speed is not re-timed here (timed
tests on a shared machine prove nothing); it is the benchmark's JSON.
"""

import hashlib
import json
from pathlib import Path

from edgevlm.checkpoint import load_checkpoint
from edgevlm.cli.train import _headline
from edgevlm.eval.runner import checkpoint_predictor, parse_studies, run_eval
from edgevlm.models import PRESETS
from edgevlm.train import HELDOUT_SEED_START, REPORT_QUESTIONS

ASSETS = Path(__file__).resolve().parents[2] / "edgevlm" / "assets"
MODEL = ASSETS / "demo-small.safetensors"
RECORD = json.loads((ASSETS / "demo-small.json").read_text())
TEACHER = json.loads((ASSETS / "demo-teacher.json").read_text())


def test_the_record_describes_this_file_and_its_verdict_follows_from_its_numbers():
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == RECORD["sha256"]
    assert MODEL.stat().st_size <= 10 * 10**6
    assert RECORD["teacher"]["sha256"] == TEACHER["sha256"]  # distilled from the teacher shipped beside it
    ev = RECORD["eval"]
    assert ev["heldout_studies"] >= 100 and ev["student"]["n_studies"] == ev["teacher"]["n_studies"] >= 100
    for key in ("finding_micro_f1", "closed_accuracy"):
        assert abs(ev["retained"][key] - ev["student"][key] / ev["teacher"][key]) < 1e-3
    passed = RECORD["passed"]
    assert passed["retained_f1_and_closed"] == all(ev["retained"][k] >= 0.95
                                                   for k in ("finding_micro_f1", "closed_accuracy"))
    assert passed["speedup_end_to_end"] == (RECORD["speed"]["speedup"]["end_to_end_p50"] >= 3.0)


def test_the_shipped_student_is_the_demo_small_preset_and_generates():
    ckpt = load_checkpoint(MODEL)
    preset = PRESETS["demo-small"]()
    preset.decoder.vocab_size = ckpt.config.decoder.vocab_size  # the teacher's tokenizer decides
    # Its decision thresholds are its own, calibrated after distillation and recorded beside it.
    assert ckpt.config.prompt.decisions == {k: tuple(v) for k, v in (RECORD.get("operating_points") or {}).items()}
    preset.prompt.decisions = ckpt.config.prompt.decisions
    assert ckpt.config.to_dict() == preset.to_dict()
    assert ckpt.tokenizer_json is not None


def test_a_fresh_heldout_eval_agrees_with_the_record():
    first_seed = HELDOUT_SEED_START + 60_000  # past the record's range and the teacher test's
    predict, recipe = checkpoint_predictor(MODEL)
    source, count = parse_studies("synthetic:20", first_seed)
    fresh = _headline(run_eval(predict, recipe, source, REPORT_QUESTIONS[0]))
    assert fresh["n_studies"] == count == 20
    recorded = RECORD["eval"]["student"]
    # 20 studies against >= 100: agreement within sampling error, not equality.
    assert abs(fresh["closed_accuracy"] - recorded["closed_accuracy"]) <= 0.12, (fresh, recorded)
    assert abs(fresh["finding_micro_f1"] - recorded["finding_micro_f1"]) <= 0.2, (fresh, recorded)
