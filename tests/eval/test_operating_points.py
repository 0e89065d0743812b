"""Operating points of report decisions: where they are read, how they are chosen, and the command that
writes them into a checkpoint (`edgevlm.eval.operating_points`, `edgevlm operating-points`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgevlm.cli import app
from edgevlm.data import sample_study
from edgevlm.data.reports import report_text
from edgevlm.eval.operating_points import (
    SIDES,
    choose_threshold,
    decision_positions,
    impression_slots,
    presence_scores,
    side_probs,
)
from edgevlm.models import PromptConfig
from edgevlm.models.tokenizer import decision_rules, train_tokenizer

TEACHER = Path(__file__).resolve().parents[2] / "edgevlm" / "assets" / "demo-teacher.safetensors"


@pytest.fixture(scope="module")
def report_tokenizer():
    reports = [report_text(sample_study(seed), np.random.default_rng(seed)) for seed in range(60)]
    return train_tokenizer(reports, 600)


def test_decision_positions_land_on_each_impression_answer(report_tokenizer):
    tok, checked_present = report_tokenizer, 0
    for seed in range(20):
        text = " " + report_text(sample_study(seed), np.random.default_rng(seed))
        enc = tok.encode(text, add_special_tokens=False)
        positions = decision_positions(text, enc.offsets)
        present_types = {f.type for f in sample_study(seed).findings}
        assert [p for _, p in positions] == [kind in present_types for kind, _ in impression_slots()]
        for (j, present), (_, key) in zip(positions, impression_slots(), strict=True):
            # The token just before is the key's colon; the token itself starts the answer word.
            assert tok.decode(enc.ids[j - 1:j]).endswith(":"), (key, tok.decode(enc.ids[j - 1:j]))
            answer = text[enc.offsets[j][0]:].lstrip()
            assert answer.startswith("none") != present, (key, answer[:20])
            checked_present += present
    assert checked_present >= 5  # the seeds include positive lines, not only "none"


def test_side_probs_read_the_side_word_of_each_present_lateral_line(report_tokenizer):
    """Probabilities that put all mass on the true report's next token at every position: side_probs must give
    the true side P = 1 (read at the wrong position, it would see another token and give every side 0)."""
    from edgevlm.data.findings import PLEURAL_EFFUSION, PNEUMOTHORAX

    tok, vocab = report_tokenizer, report_tokenizer.get_vocab_size()
    forced, expected = [], {"Pleural effusion:": [], "Pneumothorax:": []}
    for seed in range(400):
        spec = sample_study(seed)
        sides = {f.type: f.side for f in spec.findings if f.type in (PLEURAL_EFFUSION, PNEUMOTHORAX)}
        if not sides:
            continue
        text = " " + report_text(spec, np.random.default_rng(seed))
        enc = tok.encode(text, add_special_tokens=False)
        forced.append((text, enc.offsets, torch.nn.functional.one_hot(torch.tensor(enc.ids), vocab).float()))
        for kind, key in ((PLEURAL_EFFUSION, "Pleural effusion:"), (PNEUMOTHORAX, "Pneumothorax:")):
            if kind in sides:
                expected[key].append(sides[kind])
        if len(forced) == 30:
            break
    out = side_probs(tok, forced)
    assert {k: [r["truth"] for r in rows] for k, rows in out.items()} == expected
    assert all(len(rows) >= 5 for rows in out.values())
    for rows in out.values():
        for r in rows:
            assert r[r["truth"]] == 1.0 and sum(r[s] for s in SIDES) == 1.0


def test_each_keys_rule_is_the_ids_that_precede_its_answer_inside_a_report(report_tokenizer):
    # Encoded alone, "Lung mass:" gets a prefix space the tokenizer adds; inside a report it follows a newline.
    tok = report_tokenizer
    keys = [key for _, key in impression_slots()]
    prompt = PromptConfig(decisions={key: (" none", 0.5) for key in keys})
    rules = dict(zip(sorted(keys), decision_rules(tok, prompt), strict=True))
    assert {r[1] for r in rules.values()} == {tok.token_to_id("Ġnone")}
    assert tok.encode("Lung mass:", add_special_tokens=False).ids != list(rules["Lung mass:"][0])
    for seed in range(100, 160):
        text = " " + report_text(sample_study(seed), np.random.default_rng(seed))
        enc = tok.encode(text, add_special_tokens=False)
        for (j, _), key in zip(decision_positions(text, enc.offsets), keys, strict=True):
            trigger = rules[key][0]
            assert tuple(enc.ids[j - len(trigger):j]) == trigger, key
            # ... and nowhere else in the report, so no other token is decided by it.
            hits = [k for k in range(len(trigger), len(enc.ids) + 1) if tuple(enc.ids[k - len(trigger):k]) == trigger]
            assert hits == [j], (key, hits)


def test_section_keys_fire_once_each_right_before_the_sections_first_word(report_tokenizer):
    from edgevlm.eval.operating_points import SECTION_DECISIONS

    tok = report_tokenizer
    rules = dict(zip(sorted(SECTION_DECISIONS), decision_rules(tok, PromptConfig(decisions=SECTION_DECISIONS)),
                     strict=True))
    assert {r[1] for r in rules.values()} == {tok.token_to_id("ĠNo")}
    opened_with_no = 0
    for seed in range(200, 240):
        text = " " + report_text(sample_study(seed), np.random.default_rng(seed))
        enc = tok.encode(text, add_special_tokens=False)
        for key, (trigger, _, _) in rules.items():
            hits = [k for k in range(len(trigger), len(enc.ids) + 1) if tuple(enc.ids[k - len(trigger):k]) == trigger]
            assert len(hits) == 1, (key, hits)
            first_word = text[text.index("\n" + key) + len(key) + 1:].split()[0]
            after = tok.decode(enc.ids[hits[0]:hits[0] + 8])  # from the token the rule decides on
            assert after.lstrip().startswith(first_word), (key, first_word, after)
            opened_with_no += first_word == "No"
    assert opened_with_no > 20  # the negatives' shared opening is common: it is what the rule weighs


def test_a_multi_token_decision_token_is_refused(report_tokenizer):
    prompt = PromptConfig(decisions={"Lung mass:": (" nonexistentword", 0.5)})
    with pytest.raises(ValueError, match="not one"):
        decision_rules(report_tokenizer, prompt)
    with pytest.raises(ValueError, match="not a probability"):
        PromptConfig(decisions={"Lung mass:": (" none", 1.5)})


def _best_by_grid(p_none: np.ndarray, present: np.ndarray, max_fpr: float) -> float:
    """Brute force over a fine grid: the best F1 any threshold reaches within the false-positive ceiling."""
    best = 0.0
    for t in np.linspace(0, 1.0001, 20001):
        called = p_none < t
        s = presence_scores(called, present)
        if s["fpr"] <= max_fpr and s["f1"] is not None:
            best = max(best, s["f1"])
    return best


def test_thresholds_reach_the_best_f1_within_the_false_positive_ceiling():
    rng = np.random.default_rng(7)
    for trial in range(6):
        n = 300
        present = rng.random(n) < rng.uniform(0.05, 0.4)
        # Ranked but under-called: P(none) stays above 1/2 for most positives (a spread-out first token).
        separation = rng.uniform(0.0, 0.4)
        p_none = np.clip(np.where(present, 0.6 - separation, 0.9) + rng.normal(0, 0.08, n), 0, 1)
        max_fpr = [0.0, 0.02, 0.05, 0.1, 0.2, 1.0][trial]
        t = choose_threshold(p_none, present, max_fpr)
        s = presence_scores(p_none < t, present)
        assert s["fpr"] <= max_fpr
        assert (s["f1"] or 0.0) == pytest.approx(_best_by_grid(p_none, present, max_fpr), abs=1e-3)


def test_a_type_the_model_does_not_see_is_not_called_everywhere():
    # Prevalence ~35% and P(none) unrelated to the truth: calling every study would score F1 ~0.5.
    rng = np.random.default_rng(3)
    present = rng.random(400) < 0.35
    p_none = rng.uniform(0.4, 0.8, 400)
    assert presence_scores(np.ones(400, bool), present)["f1"] > 0.45
    t = choose_threshold(p_none, present, max_fpr=0.05)
    assert (p_none < t).mean() < 0.1


def test_plain_greedy_misses_what_the_threshold_calls():
    # The decision the module exists for: " none" at P = 0.4 is still greedy's argmax when the other 0.6
    # is spread over ten sizes; the threshold 1/2 calls it, through the same function generation uses.
    from edgevlm.models.medvlm import apply_decisions

    probs = np.array([[0.4] + [0.06] * 10])
    logits = np.log(probs)
    rules = (((7,), 0, 0.5),)
    assert int(logits.argmax()) == 0
    decided = apply_decisions(logits.copy(), [[3, 7]], rules)
    assert int(decided.argmax()) != 0 and np.isneginf(decided[0, 0])
    assert np.array_equal(apply_decisions(logits.copy(), [[7, 3]], rules), logits)  # trigger not at the end


def test_operating_points_command_writes_a_calibrated_copy(tmp_path):
    from edgevlm.checkpoint import file_sha256, load_checkpoint
    from edgevlm.eval.operating_points import DECISION_SEED_START, SECTION_DECISIONS
    from edgevlm.models.tokenizer import generation_config, load_tokenizer
    def cli(*args: str):
        return CliRunner().invoke(app, list(args), terminal_width=200)

    before = file_sha256(TEACHER)
    out, record_path = tmp_path / "op.safetensors", tmp_path / "op.json"
    result = cli("operating-points", str(TEACHER), "-o", str(out), "--studies", "4", "--json", str(record_path))
    assert result.exit_code == 0, result.output
    assert file_sha256(TEACHER) == before and out.stat().st_size == pytest.approx(TEACHER.stat().st_size, rel=0.01)
    record = json.loads(record_path.read_text())
    assert record["first_seed"] == DECISION_SEED_START and record["n_studies"] == 4
    calibrated, original = load_checkpoint(out), load_checkpoint(TEACHER)
    decisions = calibrated.config.prompt.decisions
    assert decisions == {k: tuple(v) for k, v in record["decisions"].items()}
    assert set(decisions) == {k for _, k in impression_slots()} | set(SECTION_DECISIONS)
    assert all(token == " none" and 0.0 <= t <= 1.0 for key, (token, t) in decisions.items()
               if key not in SECTION_DECISIONS)
    assert all(decisions[key] == rule for key, rule in SECTION_DECISIONS.items())
    assert calibrated.extra["operating_points"]["decisions"] == record["decisions"]
    for (name, a), (_, b) in zip(calibrated.model.state_dict().items(), original.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name  # the weights are the model's own, bit for bit
    gen = generation_config(load_tokenizer(calibrated.tokenizer_json), calibrated.config)
    assert len(gen.decisions) == len(decisions)

    same = cli("operating-points", str(TEACHER), "-o", str(TEACHER))
    missing = cli("operating-points", str(tmp_path / "nope.safetensors"), "-o", str(out))
    for bad in (same, missing):
        assert bad.exit_code == 2 and bad.output.strip().startswith("edgevlm: error:"), bad.output
        assert bad.output.strip().count("\n") == 0 and "Traceback" not in bad.output
    assert file_sha256(TEACHER) == before
