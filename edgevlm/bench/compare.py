"""`compare_results`: several results.json (workstation A, workstation B; other bundles) in one document.

Runs and configurations are concatenated; configuration labels gain the run's machine label when
more than one run is present. Checks are re-applied with one requirements set (given, or the first
run's) so every row is judged by the same limits. Accuracy is only comparable between runs on the
same study set; the document notes when the content hashes differ.
"""

from __future__ import annotations

import copy
from typing import Any

from edgevlm.bench import results as res
from edgevlm.bench.requirements import apply_checks
from edgevlm.errors import EdgeVLMError


def compare_results(docs: list[dict[str, Any]], requirements: dict[str, Any] | None = None) -> dict[str, Any]:
    if len(docs) < 2:
        raise EdgeVLMError("compare needs at least two results.json files")
    runs, configs = [], []
    seen: set[str] = set()
    for doc in docs:
        for run in doc["runs"]:
            if run["run_id"] in seen:  # the same run given twice (or inside an earlier compare)
                continue
            seen.add(run["run_id"])
            runs.append(copy.deepcopy(run))
            configs += [copy.deepcopy(c) for c in doc["configurations"] if c["run_id"] == run["run_id"]]
    if len(runs) < 2 and len(docs) >= 2:
        raise EdgeVLMError("the files hold the same run; nothing to compare")
    labels = [r["label"] for r in runs]
    # The same machine benchmarked twice: the run id tells the rows apart.
    machine = {r["run_id"]: r["label"] if labels.count(r["label"]) == 1 else f"{r['label']} [{r['run_id'][:6]}]"
               for r in runs}
    for c in configs:
        c["label"] = f"{machine[c['run_id']]}: {c['label'].split(': ', 1)[-1]}"
    out = res.new_document("compare", runs)
    out["configurations"] = configs
    out["status"] = "complete" if all(d.get("status") == "complete" for d in docs) else "partial"
    if requirements is None:
        requirements = next((r["requirements"] for r in runs if r.get("requirements")), None)
    out["requirements"] = requirements
    hashes = {r["study_set"]["content_sha256"] for r in runs}
    out["notes"] = [] if len(hashes) == 1 else [
        "The runs used different study sets (content hashes differ): compare speed and memory, not accuracy."]
    apply_checks(out, requirements)
    return out
