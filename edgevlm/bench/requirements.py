"""A procurement requirements file (TOML) and the pass/fail checks against it.

    # requirements.toml: every key optional; top level or under [requirements]
    name = "Radiology workstation, 2025 tender"
    max_p90_seconds_per_study = 30
    max_vram_gb = 12                      # GB = 2**30 bytes, as GPU and RAM sizes are sold
    max_host_ram_gb = 16
    min_finding_f1 = 0.5
    min_accuracy_fraction_of_reference = 0.99

A check is "pass", "fail" or "unknown" (not measured: no ground truth, no reference, a run cut short).
A configuration's verdict: "fail" if any check fails, else "incomplete" if any is unknown, else "pass".
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgevlm.errors import EdgeVLMError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (pyproject: tomli on 3.10 only)
    import tomli as tomllib

GB = 2**30


def _get(c: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(c, dict) or c.get(k) is None:
            return None
        c = c[k]
    return c


def _scaled(value: Any, scale: float) -> float | None:
    return None if value is None else value / scale


def _vram(c: dict) -> tuple[float | None, str | None]:
    if _get(c, "backend", "device") == "cpu":
        return 0.0, "runs on the CPU: no GPU memory used"
    return _scaled(_get(c, "memory", "peak_vram_bytes"), GB), _get(c, "memory", "vram_source")


# key -> (what is checked, unit, "max"|"min", value getter returning (value, note))
Getter = Callable[[dict], tuple[float | None, str | None]]
REQUIREMENTS: dict[str, tuple[str, str, str, Getter]] = {
    "max_p90_seconds_per_study": ("p90 latency per study (single stream)", "s", "max",
                                  lambda c: (_scaled(_get(c, "single_stream", "latency_ms", "p90"), 1000), None)),
    "max_p50_seconds_per_study": ("p50 latency per study (single stream)", "s", "max",
                                  lambda c: (_scaled(_get(c, "single_stream", "latency_ms", "p50"), 1000), None)),
    "max_cold_start_seconds": ("cold start, process start to first result", "s", "max",
                               lambda c: (_scaled(_get(c, "load", "cold_start", "summary", "p50"), 1000), None)),
    "min_studies_per_hour": ("offline throughput", "studies/h", "min",
                             lambda c: (_get(c, "offline", "studies_per_hour"), None)),
    "max_vram_gb": ("peak GPU memory", "GB", "max", _vram),
    "max_host_ram_gb": ("peak host RAM (RSS)", "GB", "max",
                        lambda c: (_scaled(_get(c, "memory", "peak_rss_bytes"), GB), None)),
    "max_bundle_size_gb": ("bundle size on disk", "GB", "max",
                           lambda c: (_scaled(_get(c, "bundle", "size_bytes"), GB), None)),
    "min_finding_f1": ("finding micro F1", "", "min", lambda c: (_get(c, "accuracy", "finding_micro_f1"), None)),
    "min_closed_accuracy": ("closed-question accuracy", "", "min",
                            lambda c: (_get(c, "accuracy", "closed_accuracy"), None)),
    "min_accuracy_fraction_of_reference": ("finding F1 as a fraction of the reference's", "", "min",
                                           lambda c: (_get(c, "reference_agreement", "f1_fraction_of_reference"),
                                                      None)),
}


def parse_requirements(data: dict[str, Any], where: str = "requirements") -> dict[str, Any]:
    """{"name": str | None, "limits": {key: number}} from a TOML table; unknown keys are errors."""
    table = data.get("requirements", data)
    name = table.get("name", data.get("name"))
    limits = {}
    for key, value in table.items():
        if key == "name":
            continue
        if key not in REQUIREMENTS:
            raise EdgeVLMError(f"unknown requirement {key!r}; known: {', '.join(REQUIREMENTS)}", where)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise EdgeVLMError(f"requirement {key} must be a number, got {value!r}", where)
        limits[key] = float(value)
    return {"name": name, "limits": limits}


def load_requirements(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeVLMError("requirements file not found", path) from None
    except tomllib.TOMLDecodeError as e:
        raise EdgeVLMError(f"requirements file is not valid TOML ({e})", path) from None
    return parse_requirements(data, str(path))


def check(config: dict[str, Any], limits: dict[str, float]) -> list[dict[str, Any]]:
    """One check per requirement: value, limit, unit and status."""
    out = []
    for key, limit in limits.items():
        what, unit, kind, get = REQUIREMENTS[key]
        value, note = get(config)
        if value is None:
            status = "unknown"
        else:
            status = "pass" if (value <= limit if kind == "max" else value >= limit) else "fail"
        out.append({"requirement": key, "what": what, "kind": kind, "limit": limit, "value": value, "unit": unit,
                    "status": status, "note": note})
    return out


def verdict(checks: list[dict[str, Any]] | None) -> str:
    if not checks:
        return "not checked"
    statuses = {c["status"] for c in checks}
    return "fail" if "fail" in statuses else "incomplete" if "unknown" in statuses else "pass"


def apply_checks(doc: dict[str, Any], requirements: dict[str, Any] | None = None) -> None:
    """Set checks and verdict on every configuration, from `requirements` or each configuration's run's."""
    runs = {r["run_id"]: r for r in doc["runs"]}
    for c in doc["configurations"]:
        reqs = requirements if requirements is not None else runs[c["run_id"]].get("requirements")
        c["checks"] = check(c, reqs["limits"]) if reqs else None
        c["verdict"] = verdict(c["checks"]) if c.get("error") is None else "error"
