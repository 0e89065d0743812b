"""Parse free-text chest CT reports into structured findings (rule-based, with negation handling).

The parser reads sentences, finds mentions of each finding type, decides per mention whether it is
negated (NegEx-style cues before the mention, or after it such as "is not seen", scoped to the
sentence and cut by "but"/"however"/"and a ..."), and reads attributes from the text that belongs
to the mention: side, lobe, size (mm or cm, lists such as "6 and 9 mm"), count, density, severity.

When a report has a FINDINGS section, it is the source; the IMPRESSION only adds finding types the
FINDINGS neither mention nor deny (so repeated findings are not counted twice), and attributes the
FINDINGS leave unstated for a finding both sections state once ("Pleural effusion: moderate, left." above
"Moderate-sized pleural effusion." is a left effusion, as a reader takes it; see `_complete`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from edgevlm.data.findings import (
    CARDIOMEGALY,
    CONSOLIDATION,
    EMPHYSEMA,
    MASS,
    NODULE,
    PLEURAL_EFFUSION,
    PNEUMOTHORAX,
    Finding,
    lobe_side,
)

_TYPE_PATTERNS: list[tuple[str, re.Pattern]] = [
    (NODULE, re.compile(r"\b(?:micro)?nodul(?:es?|ar opacit(?:y|ies))\b")),
    (MASS, re.compile(r"\bmass(?:es)?\b(?! effect)")),
    (
        PLEURAL_EFFUSION,
        re.compile(r"(?<!pericardial )\b(?:pleural )?effusions?\b|\bpleural fluid\b|\bhydrothora(?:x|ces)\b"),
    ),
    (PNEUMOTHORAX, re.compile(r"\bpneumothora(?:x|ces)\b")),
    (CONSOLIDATION, re.compile(r"\bconsolidat(?:ions?|ive|ed)\b|\bairspace (?:disease|opacit(?:y|ies))\b")),
    (
        CARDIOMEGALY,
        re.compile(
            r"\bcardiomegaly\b|\bcardiac enlargement\b|\benlarged (?:heart|cardiac silhouette)\b"
            r"|\benlargement of the (?:heart|cardiac silhouette)\b"
            r"|\bheart (?:size )?is (?:mildly |moderately |markedly |severely )?enlarged\b"
        ),
    ),
    (EMPHYSEMA, re.compile(r"\bemphysema(?:tous)?\b")),
]

# Phrases that contain a negation word but do not deny a finding.
_PSEUDO_NEGATIONS = re.compile(
    r"\bno (?:significant |interval |appreciable )?(?:change|increase|decrease|growth)\b|\bnot only\b|\bno longer\b"
)
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|negative for|free of|absence of|absent|neither|nor|resolved|resolution of|rules? out)\b"
)
_POST_NEGATION = re.compile(
    r"^[^.]*?\b(?:(?:is|are|was|were) (?:not (?:seen|identified|present|evident|demonstrated|visualized)|absent"
    r"|resolved)|not (?:seen|identified|present)|has resolved|ruled out)\b"
)
# Text between a negation cue and a later mention that ends the cue's scope.
_SCOPE_BREAK = re.compile(
    r"\b(?:but|however|although|though|whereas|yet)\b|\b(?:and|with) (?:an? |there (?:is|are) |small|moderate"
    r"|large|trace|mild|left|right|bilateral|\d)"
)
_CONJUNCTION = re.compile(r" and | as well as | plus |, | with ")

_LOBE_RE = re.compile(
    r"\b(right|left) (upper|middle|lower)(?: and (upper|middle|lower))? lobes?\b"
    r"|\b(rul|rml|rll|lul|lll)\b|\blingula(?:r)?\b"
)
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(mm|cm|millimet(?:er|re)s?|centimet(?:er|re)s?)?\b")
_LIST_JOIN = re.compile(r"^\s*(?:,|and|or|to|-|x|×|by|, and)\s*$")
_DIM_JOIN = re.compile(r"^\s*(?:mm|cm)?\s*(?:x|×|by)\s*$")
_COUNT_WORDS = {
    "a": 1, "an": 1, "one": 1, "single": 1, "solitary": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "several": 2, "multiple": 2, "numerous": 2, "few": 2,
}  # fmt: skip
_COUNT_RE = re.compile(r"\b(" + "|".join(_COUNT_WORDS) + r"|\d+)\b(?!\s*(?:\.\d|mm|cm|x\b))")
_SEVERITY = [
    ("large", re.compile(r"\b(?:large|large-volume|massive|extensive)\b")),
    ("moderate", re.compile(r"\bmoderate(?:-sized)?\b")),
    ("small", re.compile(r"\b(?:small|trace|tiny|minimal)\b")),
]
_GROUND_GLASS = re.compile(r"\b(?:ground-glass|non-?solid|subsolid|ggo|ggn)\b")
_SOLID = re.compile(r"\bsolid\b")


@dataclass
class Mention:
    type: str
    negated: bool
    findings: list[Finding]
    text: str  # the mention's own part of its sentence


_SLOT_LINE = re.compile(r"(?m)^[ \t]*([a-z][a-z -]*?)[ \t]*:[ \t]*(\S[^\n]*?)[ \t]*\.?[ \t]*$")
_SLOT_ABSENT = re.compile(r"(?:none|absent|not seen|not present|negative|no)\b")


def _unslot(match: re.Match) -> str:
    """A structured line "<finding type>: <value>" as prose: "pneumothorax: none" -> "no pneumothorax.",
    "pulmonary nodules: 9 mm solid, left upper lobe; 6 mm ..." -> one sentence per ';' entry.
    Section headings ("lungs and airways: ...") name no finding type and stay as they are."""
    name, value = match.group(1), match.group(2)
    if not any(p.search(name) for _, p in _TYPE_PATTERNS):
        return match.group(0)
    if _SLOT_ABSENT.match(value.strip()):
        return f"no {name}."
    return " ".join(f"{name} {entry.strip()}." for entry in value.split(";") if entry.strip())


def _normalize(text: str) -> str:
    t = text.lower().replace("ground glass", "ground-glass").replace("×", " x ")
    t = _SLOT_LINE.sub(_unslot, t)
    t = re.sub(r"(?m)^\s*\d+[.)]\s+", "", t)  # numbered impression items
    t = _PSEUDO_NEGATIONS.sub(" ", t)
    return re.sub(r"[ \t]+", " ", t)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<!\d)\.(?!\d)|[\n;:?!]", text)
    return [p.strip() for p in parts if p.strip()]


def _lobes(segment: str) -> list[str]:
    out = []
    for m in _LOBE_RE.finditer(segment):
        if m.group(4):
            out.append(m.group(4).upper())
        elif m.group(1):
            side_letter = "R" if m.group(1) == "right" else "L"
            for part in (m.group(2), m.group(3)):  # "right middle and lower lobes"
                if part:
                    out.append(side_letter + {"upper": "U", "middle": "M", "lower": "L"}[part] + "L")
        else:
            out.append("LUL")  # the lingula belongs to the left upper lobe
    return [lb for lb in out if lb in ("RUL", "RML", "RLL", "LUL", "LLL")]


def _sizes_mm(segment: str) -> list[float]:
    """Measurements in mm: '6 and 9 mm' -> [6, 9]; '1.2 x 0.8 cm' -> [12] (the longest dimension)."""
    nums = list(_SIZE_RE.finditer(segment))
    units = [m.group(2) for m in nums]
    # A bare number in a list takes the unit of the next number ("6 and 9 mm", "1.2 x 0.8 cm");
    # a bare number elsewhere is a count or a label, not a size ("2 nodules measuring ...").
    for i in range(len(nums) - 2, -1, -1):
        between = segment[nums[i].end() : nums[i + 1].start()]
        if units[i] is None and _LIST_JOIN.match(between):
            units[i] = units[i + 1]
    sizes: list[float] = []
    prev_end, joined = None, False
    for m, unit in zip(nums, units, strict=True):
        if unit is None:
            prev_end = None
            continue
        value = float(m.group(1)) * (10.0 if unit.startswith("c") else 1.0)
        value = round(value, 1)
        joined = prev_end is not None and bool(_DIM_JOIN.match(segment[prev_end : m.start()]))
        if joined and sizes:
            sizes[-1] = max(sizes[-1], value)
        else:
            sizes.append(value)
        prev_end = m.end()
    return sizes


def _side(segment: str) -> str | None:
    if re.search(r"\bbilateral(?:ly)?\b|\bboth (?:sides|lungs|hemithora(?:x|ces))\b", segment):
        return "bilateral"
    left, right = bool(re.search(r"\bleft\b", segment)), bool(re.search(r"\bright\b", segment))
    if left and right:
        return "bilateral"
    return "left" if left else "right" if right else None


def _count(pre: str) -> int | None:
    found = list(_COUNT_RE.finditer(pre))
    if not found:
        return None
    word = found[-1].group(1)
    return int(word) if word.isdigit() else _COUNT_WORDS[word]


def _build(ftype: str, segment: str, pre: str, mention: str) -> list[Finding]:
    lobes = _lobes(segment)
    if ftype in (NODULE, MASS):
        sizes = _sizes_mm(segment)
        density = None
        if ftype == NODULE:
            density = "ground-glass" if _GROUND_GLASS.search(segment) else "solid" if _SOLID.search(segment) else None
        n = len(sizes) if sizes else (_count(pre) or (2 if mention.endswith("s") else 1))
        side = _side(segment)
        out = []
        for i in range(n):
            lobe = lobes[i] if len(lobes) == n else (lobes[0] if lobes else None)
            size = sizes[i] if i < len(sizes) else None
            f_side = lobe_side(lobe) if lobe else (side if side != "bilateral" else None)
            out.append(Finding(ftype, side=f_side, lobe=lobe, size_mm=size, density=density))
        return out
    if ftype == CONSOLIDATION:
        if lobes:
            return [Finding(CONSOLIDATION, lobe=lb) for lb in dict.fromkeys(lobes)]
        side = _side(segment)
        if side == "bilateral":
            return [Finding(CONSOLIDATION, side="left"), Finding(CONSOLIDATION, side="right")]
        return [Finding(CONSOLIDATION, side=side)]
    if ftype == PLEURAL_EFFUSION:
        side = _side(segment)
        if side is None and mention.endswith("s"):
            side = "bilateral"  # "small pleural effusions"
        severity = next((name for name, rx in _SEVERITY if rx.search(segment)), None)
        return [Finding(PLEURAL_EFFUSION, side=side, severity=severity)]
    if ftype == PNEUMOTHORAX:
        side = _side(segment)
        if side == "bilateral":
            return [Finding(PNEUMOTHORAX, side="left"), Finding(PNEUMOTHORAX, side="right")]
        return [Finding(PNEUMOTHORAX, side=side)]
    return [Finding(ftype)]


def _sentence_mentions(sentence: str) -> list[Mention]:
    hits = []
    for ftype, rx in _TYPE_PATTERNS:
        hits += [(m.start(), m.end(), ftype) for m in rx.finditer(sentence)]
    hits.sort()
    # Drop overlapping hits (keep the earlier, longer one).
    kept: list[tuple[int, int, str]] = []
    for h in hits:
        if kept and h[0] < kept[-1][1]:
            continue
        kept.append(h)
    # Split the sentence between consecutive mentions at the last conjunction between them.
    cuts = [0]
    for (_, end, _), (start, _, _) in itertools.pairwise(kept):
        inter = sentence[end:start]
        conj = list(_CONJUNCTION.finditer(inter))
        cuts.append(end + conj[-1].start() if conj else start)
    cuts.append(len(sentence))

    cues = list(_PRE_NEGATION.finditer(sentence))
    out = []
    for i, (start, end, ftype) in enumerate(kept):
        negated = False
        for cue in cues:
            if cue.end() <= start and not _SCOPE_BREAK.search(sentence[cue.end() : start]):
                negated = True
        after = sentence[end : cuts[i + 1]]
        if _POST_NEGATION.search(after):
            negated = True
        segment = sentence[cuts[i] : cuts[i + 1]]
        pre = sentence[cuts[i] : start]
        mention = sentence[start:end]
        findings = [] if negated else _build(ftype, segment, pre, mention)
        out.append(Mention(ftype, negated, findings, segment))
    return out


def extract_mentions(text: str) -> list[Mention]:
    """Every finding mention in `text`, negated or not, in reading order."""
    return [m for s in _sentences(_normalize(text)) for m in _sentence_mentions(s)]


def _merge(mentions: list[Mention]) -> list[Finding]:
    """Findings of one section, with repeated mentions of the same finding merged."""
    out: list[Finding] = []
    for mi, m in enumerate(mentions):
        for f in m.findings:
            same = [g for g in out if g.type == f.type]
            if f.type == PLEURAL_EFFUSION and same:
                g = same[0]
                sides = {g.side, f.side} - {None}
                g.side = (
                    "bilateral"
                    if ("bilateral" in sides or sides == {"left", "right"})
                    else (sides.pop() if sides else None)
                )
                g.severity = g.severity or f.severity
                continue
            if f.type in (CARDIOMEGALY, EMPHYSEMA) and same:
                continue
            if f.type in (PNEUMOTHORAX, CONSOLIDATION) and any((g.side, g.lobe) == (f.side, f.lobe) for g in same):
                continue
            if f.type in (NODULE, MASS):
                # A later sentence naming an already-described lesion (same lobe, same or no size).
                earlier = [g for g in same if g.geometry.get("_mention") != mi]
                if any(g.lobe == f.lobe and (f.size_mm is None or g.size_mm == f.size_mm) for g in earlier):
                    continue
            f.geometry["_mention"] = mi
            out.append(f)
    for f in out:
        f.geometry.pop("_mention", None)
    return out


def _sections(text: str) -> tuple[str, str | None]:
    """(primary, secondary): FINDINGS and IMPRESSION when the report has them, else (text, None)."""
    heads = list(re.finditer(r"(?im)^\s*(findings|impression|technique|comparison|history|indication)\s*:", text))
    blocks: dict[str, str] = {}
    for i, h in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        blocks[h.group(1).lower()] = text[h.end() : end]
    if "findings" in blocks:
        return blocks["findings"], blocks.get("impression")
    if "impression" in blocks:
        return blocks["impression"], None
    return text, None


_ATTRIBUTES = ("side", "lobe", "size_mm", "severity", "density")


def _complete(findings: list[Finding], stated: list[Finding]) -> None:
    """Fill, in place, attributes a FINDINGS finding leaves unstated from the IMPRESSION's statement of it.

    Only where each section states that type exactly once and the two agree on every attribute both
    give: then they describe one finding (a severity or side that differs means they do not, and
    nothing is filled). Without this, a side given only in the impression scored as a wrong-side
    effusion: one false positive and one false negative for a report a reader finds complete."""
    for ftype in dict.fromkeys(f.type for f in findings):
        ours = [f for f in findings if f.type == ftype]
        theirs = [f for f in stated if f.type == ftype]
        if len(ours) != 1 or len(theirs) != 1:
            continue
        a, b = ours[0], theirs[0]
        given = [(getattr(a, k), getattr(b, k)) for k in _ATTRIBUTES]
        if any(x is not None and y is not None and x != y for x, y in given):
            continue
        for k, (x, y) in zip(_ATTRIBUTES, given, strict=True):
            if x is None and y is not None:
                setattr(a, k, y)


def extract_findings(report: str) -> list[Finding]:
    """Positive findings stated in a report (negated mentions dropped), with their attributes."""
    primary, secondary = _sections(report)
    mentions = extract_mentions(primary)
    findings = _merge(mentions)
    if secondary:
        covered = {m.type for m in mentions}
        impression = extract_mentions(secondary)
        _complete(findings, _merge([m for m in impression if m.type in covered]))
        findings += _merge([m for m in impression if m.type not in covered])
    return findings


def section_disagreements(report: str) -> list[str] | None:
    """Finding types a report's FINDINGS and IMPRESSION state differently (present in one, not in the
    other), sorted; None when it lacks either section. `extract_findings` reads the FINDINGS where both
    speak, so a report that calls a mass in its impression and denies it below scores as a miss."""
    primary, secondary = _sections(report)
    if secondary is None:
        return None
    stated = [{f.type for f in _merge(extract_mentions(part))} for part in (primary, secondary)]
    return sorted(stated[0] ^ stated[1])
