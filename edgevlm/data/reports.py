"""Radiology reports and question-answer pairs for a `StudySpec`.

Phrasing varies (several templates per finding, synonyms, mm or cm) but stays inside a vocabulary
that `edgevlm.eval.extract_findings` parses back exactly; tests hold the two together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgevlm.data.findings import (
    CARDIOMEGALY,
    CONSOLIDATION,
    EMPHYSEMA,
    FINDING_TYPES,
    LOBE_NAMES,
    LOBES,
    MASS,
    NODULE,
    PLEURAL_EFFUSION,
    PNEUMOTHORAX,
    Finding,
)
from edgevlm.data.spec import StudySpec

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def format_size(size_mm: float, rng: np.random.Generator) -> str:
    """'8 mm', '8mm' or '0.8 cm' (cm is used for 10 mm and more, as reports tend to)."""
    mm = round(size_mm)
    if mm >= 10 and rng.random() < 0.35:
        return f"{mm / 10:.1f} cm"
    return f"{mm} mm" if rng.random() < 0.8 else f"{mm}mm"


def _sizes_list(sizes: list[float], rng: np.random.Generator) -> str:
    """'6 and 9 mm' / '6 mm and 9 mm' / '6, 8 and 9 mm'."""
    mms = [round(s) for s in sizes]
    if rng.random() < 0.5:
        head = ", ".join(str(m) for m in mms[:-1])
        return f"{head} and {mms[-1]} mm"
    parts = [f"{m} mm" for m in mms]
    return ", ".join(parts[:-1]) + f" and {parts[-1]}"


def _density_word(density: str | None, rng: np.random.Generator) -> str:
    if density == "ground-glass":
        return _pick(rng, ["ground-glass", "ground glass", "pure ground-glass"])
    return "solid"


def _side_word(side: str, rng: np.random.Generator) -> str:
    if side == "bilateral":
        return "bilateral"
    return _pick(rng, [side, f"{side}-sided"])


def _severity_word(severity: str, rng: np.random.Generator) -> str:
    return {
        "small": _pick(rng, ["small", "small"]),
        "moderate": _pick(rng, ["moderate", "moderate-sized"]),
        "large": _pick(rng, ["large", "large-volume"]),
    }[severity]


# -- positive sentences --------------------------------------------------------------------------------
def _nodule_sentences(nodules: list[Finding], rng: np.random.Generator) -> list[str]:
    groups: dict[tuple[str, str], list[Finding]] = {}
    for f in nodules:
        groups.setdefault((f.lobe, f.density), []).append(f)
    out = []
    for (lobe, density), group in sorted(groups.items()):
        lobe_name = LOBE_NAMES[lobe]
        dens = _density_word(density, rng)
        if len(group) == 1:
            size = format_size(group[0].size_mm, rng)
            out.append(
                _pick(
                    rng,
                    [
                        f"A {size} {dens} nodule is seen in the {lobe_name}.",
                        f"There is a {size} {dens} nodule in the {lobe_name}.",
                        f"{_cap(dens)} pulmonary nodule in the {lobe_name} measuring {size}.",
                        f"{_cap(lobe_name)} {dens} nodule measures {size}.",
                        f"Noted is a {dens} nodule in the {lobe_name}, {size} in diameter.",
                    ],
                )
            )
        else:
            sizes = _sizes_list(sorted(f.size_mm for f in group), rng)
            count = _NUMBER_WORDS.get(len(group), str(len(group)))
            out.append(
                _pick(
                    rng,
                    [
                        f"{_cap(count)} {dens} nodules in the {lobe_name} measuring {sizes}.",
                        f"There are {count} {dens} nodules in the {lobe_name}, measuring {sizes}.",
                        f"{_cap(count)} {dens} pulmonary nodules are present in the {lobe_name} ({sizes}).",
                    ],
                )
            )
    return out


def _positive_sentence(f: Finding, rng: np.random.Generator) -> str:
    if f.type == MASS:
        lobe, size = LOBE_NAMES[f.lobe], format_size(f.size_mm, rng)
        return _pick(
            rng,
            [
                f"A {size} mass is present in the {lobe}.",
                f"There is a {size} mass in the {lobe}, suspicious for malignancy.",
                f"{_cap(lobe)} mass measuring {size}.",
                f"Large soft tissue mass in the {lobe}, measuring {size}.",
            ],
        )
    if f.type == PLEURAL_EFFUSION:
        sev = _severity_word(f.severity, rng)
        if f.side == "bilateral":
            return _pick(
                rng,
                [
                    f"{_cap(sev)} bilateral pleural effusions.",
                    f"There are {sev} bilateral pleural effusions.",
                    f"{_cap(sev)} pleural effusions bilaterally.",
                ],
            )
        side = _side_word(f.side, rng)
        return _pick(
            rng,
            [
                f"{_cap(sev)} {side} pleural effusion.",
                f"There is a {sev} {side} pleural effusion.",
                f"A {sev} pleural effusion is present on the {f.side}.",
                f"{_cap(sev)} {f.side} pleural effusion with adjacent compressive atelectasis.",
            ],
        )
    if f.type == PNEUMOTHORAX:
        side = _side_word(f.side, rng)
        return _pick(
            rng,
            [
                f"{_cap(side)} pneumothorax.",
                f"There is a {side} pneumothorax.",
                f"A {f.side} apical and lateral pneumothorax is present.",
                f"Pneumothorax on the {f.side}.",
            ],
        )
    if f.type == CONSOLIDATION:
        lobe = LOBE_NAMES[f.lobe]
        return _pick(
            rng,
            [
                f"Consolidation in the {lobe}.",
                f"There is airspace consolidation in the {lobe}.",
                f"{_cap(lobe)} consolidation with air bronchograms.",
                f"Focal consolidation involving the {lobe}.",
            ],
        )
    if f.type == CARDIOMEGALY:
        return _pick(
            rng, ["Cardiomegaly.", "The heart is enlarged.", "Enlarged heart.", "Cardiac enlargement is noted."]
        )
    if f.type == EMPHYSEMA:
        return _pick(
            rng,
            [
                "Emphysema.",
                "Centrilobular emphysema with scattered bullae.",
                "Emphysematous changes with scattered bullae.",
                "There is emphysema.",
            ],
        )
    raise ValueError(f"no sentence for {f.type}")


# -- negative sentences --------------------------------------------------------------------------------
_NEGATIVES = {
    NODULE: ["No pulmonary nodules.", "No suspicious pulmonary nodule.", "There are no lung nodules."],
    MASS: ["No lung mass.", "No pulmonary mass.", "There is no mass."],
    (NODULE, MASS): ["No pulmonary nodules or masses.", "No suspicious pulmonary nodule or mass."],
    CONSOLIDATION: ["No consolidation.", "No focal consolidation.", "No airspace consolidation."],
    EMPHYSEMA: ["No emphysema.", "No emphysematous changes."],
    PLEURAL_EFFUSION: ["No pleural effusion.", "There is no pleural effusion.", "No pleural effusions."],
    PNEUMOTHORAX: ["No pneumothorax.", "There is no pneumothorax."],
    (PLEURAL_EFFUSION, PNEUMOTHORAX): ["No pleural effusion or pneumothorax.", "No pneumothorax or pleural effusion."],
    CARDIOMEGALY: ["Heart size is normal.", "Normal heart size.", "No cardiomegaly.", "The heart is not enlarged."],
}


def _negatives(absent: set[str], pair: tuple[str, str], rng: np.random.Generator) -> list[str]:
    if pair[0] in absent and pair[1] in absent and rng.random() < 0.6:
        return [_pick(rng, _NEGATIVES[pair])]
    return [_pick(rng, _NEGATIVES[t]) for t in pair if t in absent]


# Structured impression: one line per finding type, always in this order, the type named first.
_IMPRESSION_SLOTS = [
    (PNEUMOTHORAX, "Pneumothorax"),
    (MASS, "Lung mass"),
    (CONSOLIDATION, "Consolidation"),
    (PLEURAL_EFFUSION, "Pleural effusion"),
    (NODULE, "Pulmonary nodules"),
    (CARDIOMEGALY, "Cardiomegaly"),
    (EMPHYSEMA, "Emphysema"),
]


def _impression_entry(f: Finding) -> str:
    if f.type == NODULE:
        return f"{round(f.size_mm)} mm {f.density or 'solid'}, {LOBE_NAMES[f.lobe]}"
    if f.type == MASS:
        return f"{round(f.size_mm)} mm, {LOBE_NAMES[f.lobe]}"
    if f.type == CONSOLIDATION:
        return LOBE_NAMES[f.lobe]
    if f.type == PLEURAL_EFFUSION:
        return f"{f.severity}, {f.side}"
    if f.type == PNEUMOTHORAX:
        return f.side
    return "present"


def impression_text(spec: StudySpec) -> str:
    """'Pneumothorax: none.' ... 'Pulmonary nodules: 14 mm solid, right middle lobe; 6 mm ...' (fixed
    wording: the only thing that varies is what the image shows)."""
    lines = []
    for kind, name in _IMPRESSION_SLOTS:
        found = sorted((f for f in spec.findings if f.type == kind), key=lambda f: -(f.size_mm or 0))
        # Lesions that read the same ("9 mm solid, right upper lobe" twice) are written once with both
        # sizes, "9 and 9 mm solid, ...": a repeated entry would read as one lesion mentioned twice.
        entries: list[tuple[list[str], str]] = []  # (sizes in mm, the rest of the entry)
        for f in found:
            entry = _impression_entry(f)
            size, rest = entry.split(" mm", 1) if f.size_mm is not None else ("", entry)
            if size and entries and entries[-1][1] == rest and entries[-1][0][-1:] == [size]:
                entries[-1][0].append(size)
            else:
                entries.append(([size] if size else [], rest))
        text = "; ".join(f"{' and '.join(sizes)} mm{rest}" if sizes else rest for sizes, rest in entries)
        lines.append(f"{name}: {text or 'none'}.")
    return "\n".join(lines)


def impression_answers(report: str) -> list[tuple[int, int, bool]]:
    """(start, stop, finding present) of each structured-impression answer in `report`, in
    _IMPRESSION_SLOTS order: the characters after "Type:" up to its line's full stop (" none" or
    " small, right"), where the image decides the words; `report` may carry a prefix (e.g. the training
    target's leading space)."""
    out = []
    for _, name in _IMPRESSION_SLOTS:
        start = report.index(f"\n{name}:") + len(name) + 2
        stop = report.index(".\n", start)
        out.append((start, stop, report[start:stop].strip() != "none"))
    return out


def report_text(spec: StudySpec, rng: np.random.Generator) -> str:
    """A chest CT report: a structured IMPRESSION (one line per finding type, `impression_text`), then
    TECHNIQUE and free-text FINDINGS, where every absent finding type is stated negative.

    Impression first and structured because of how a small decoder reads the image. With rotary
    positions, attention to the visual tokens is learned at the distances training shows it: a finding
    sentence 80-330 tokens into a report stayed blind to the image (teacher-forced log-odds at the
    prior for every study) while the same model answered questions 15-80 tokens after the image. A
    free-text impression list first was not enough either (it learned "one item" as a prior). Each
    line here names its finding type and then states it, which is the shape of a question and its
    answer right after the image; the FINDINGS restate the same facts in varied prose.
    """
    present = {f.type for f in spec.findings}
    absent = set(FINDING_TYPES) - present
    by_type = {t: [f for f in spec.findings if f.type == t] for t in FINDING_TYPES}

    lungs: list[str] = []
    lungs += _nodule_sentences(by_type[NODULE], rng)
    lungs += [_positive_sentence(f, rng) for f in by_type[MASS] + by_type[CONSOLIDATION] + by_type[EMPHYSEMA]]
    lungs += _negatives(absent, (NODULE, MASS), rng)
    lungs += [_pick(rng, _NEGATIVES[t]) for t in (CONSOLIDATION, EMPHYSEMA) if t in absent]
    pleura = [_positive_sentence(f, rng) for f in by_type[PLEURAL_EFFUSION] + by_type[PNEUMOTHORAX]]
    pleura += _negatives(absent, (PLEURAL_EFFUSION, PNEUMOTHORAX), rng)
    heart = [_positive_sentence(f, rng) for f in by_type[CARDIOMEGALY]] or [_pick(rng, _NEGATIVES[CARDIOMEGALY])]
    heart.append(_pick(rng, ["No pericardial effusion.", "The great vessels are normal in calibre.", ""]))
    bones = _pick(rng, ["No acute osseous abnormality.", "Visualized osseous structures are unremarkable."])

    lungs = [lungs[i] for i in rng.permutation(len(lungs))] if rng.random() < 0.3 else lungs
    sections = [
        ("Lungs and airways", lungs),
        ("Pleura", pleura),
        ("Heart and mediastinum", [s for s in heart if s]),
        ("Bones", [bones]),
    ]
    findings_text = "\n".join(f"{name}: {' '.join(sents)}" for name, sents in sections)

    impression = impression_text(spec)
    technique = _pick(
        rng,
        [
            "CT of the chest without intravenous contrast.",
            "Non-contrast CT chest, axial images with multiplanar reformats.",
        ],
    )
    return f"IMPRESSION:\n{impression}\n\nTECHNIQUE: {technique}\n\nFINDINGS:\n{findings_text}\n"


# -- questions -----------------------------------------------------------------------------------------
@dataclass
class QA:
    question: str
    answer: str
    kind: str  # "closed" (yes/no or one of `choices`) or "open"
    finding_type: str  # the finding type the question probes
    choices: list[str] | None = None  # the answer set of a closed question

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QA:
        return cls(**d)


_PRESENCE_Q = {
    NODULE: [
        "Are there any pulmonary nodules?",
        "Is a lung nodule present?",
        "Does the study show a pulmonary nodule?",
    ],
    MASS: ["Is there a lung mass?", "Is a pulmonary mass present?"],
    PLEURAL_EFFUSION: [
        "Is there a pleural effusion?",
        "Is pleural fluid present?",
        "Does the patient have a pleural effusion?",
    ],
    PNEUMOTHORAX: ["Is there a pneumothorax?", "Is a pneumothorax present?"],
    CONSOLIDATION: ["Is there consolidation?", "Is there any airspace consolidation?"],
    CARDIOMEGALY: ["Is there cardiomegaly?", "Is the heart enlarged?"],
    EMPHYSEMA: ["Is there emphysema?", "Are there emphysematous changes?"],
}
YES_NO = ["yes", "no"]
LOBE_CHOICES = [LOBE_NAMES[lb] for lb in LOBES]


def _closed(question: str, answer: str, ftype: str, choices: list[str]) -> QA:
    return QA(question=question, answer=answer, kind="closed", finding_type=ftype, choices=list(choices))


def _open(question: str, answer: str, ftype: str) -> QA:
    return QA(question=question, answer=answer, kind="open", finding_type=ftype, choices=None)


def questions(spec: StudySpec, rng: np.random.Generator) -> list[QA]:
    """Closed (yes/no, multiple choice) and open questions about the study, with their answers."""
    by_type = {t: [f for f in spec.findings if f.type == t] for t in FINDING_TYPES}
    out: list[QA] = []
    # Presence of every positive type plus as many absent types (balanced yes/no).
    positives = [t for t in FINDING_TYPES if by_type[t]]
    negatives = [t for t in FINDING_TYPES if not by_type[t]]
    k = max(2, len(positives))
    negatives = [negatives[i] for i in rng.permutation(len(negatives))][:k]
    for t in positives + negatives:
        out.append(_closed(_pick(rng, _PRESENCE_Q[t]), "yes" if by_type[t] else "no", t, YES_NO))

    for f in by_type[PLEURAL_EFFUSION]:
        out.append(
            _closed("Which side is the pleural effusion on?", f.side, PLEURAL_EFFUSION, ["left", "right", "bilateral"])
        )
        out.append(
            _closed("How large is the pleural effusion?", f.severity, PLEURAL_EFFUSION, ["small", "moderate", "large"])
        )
    for f in by_type[PNEUMOTHORAX]:
        out.append(_closed("Which side is the pneumothorax on?", f.side, PNEUMOTHORAX, ["left", "right"]))
    for f in by_type[CONSOLIDATION]:
        out.append(_closed("Which lobe is consolidated?", LOBE_NAMES[f.lobe], CONSOLIDATION, LOBE_CHOICES))
        out.append(_open("Where is the consolidation?", LOBE_NAMES[f.lobe], CONSOLIDATION))
    for f in by_type[MASS]:
        out.append(_open("Where is the mass?", LOBE_NAMES[f.lobe], MASS))
        out.append(_open("What is the size of the mass?", f"{round(f.size_mm)} mm", MASS))

    nodules = sorted(by_type[NODULE], key=lambda f: -f.size_mm)
    if len(nodules) == 1:
        f = nodules[0]
        out.append(_open("What is the size of the nodule?", f"{round(f.size_mm)} mm", NODULE))
        out.append(_open("Where is the nodule?", LOBE_NAMES[f.lobe], NODULE))
        out.append(_closed("Is the nodule solid or ground-glass?", f.density, NODULE, ["solid", "ground-glass"]))
        out.append(_closed("Which lung contains the nodule?", f.side, NODULE, ["left", "right"]))
    elif nodules:
        f = nodules[0]
        out.append(_open("How many pulmonary nodules are there?", str(len(nodules)), NODULE))
        out.append(_open("What is the size of the largest nodule?", f"{round(f.size_mm)} mm", NODULE))
        out.append(_open("Where is the largest nodule?", LOBE_NAMES[f.lobe], NODULE))
    return out


def ground_truth(spec: StudySpec, rng: np.random.Generator | None = None) -> dict:
    """Findings, report and questions of a study: the JSON written beside its DICOM (no identifiers)."""
    rng = rng or np.random.default_rng([spec.seed, 0x7E47])
    return {
        "study_id": spec.study_id,
        "seed": spec.seed,
        "normal": spec.is_normal,
        "findings": [f.to_dict(with_geometry=False) for f in spec.findings],
        "report": report_text(spec, rng),
        "questions": [q.to_dict() for q in questions(spec, rng)],
        "spec": spec.to_dict(),
    }
