"""Shared pieces of the public-checkpoint importers.

An importer turns someone else's checkpoint into an `ImportPlan` BEFORE any weight is read: the
edgevlm config, an explicit key map (source name -> edgevlm name, every mapped key shape-checked
against the meta-built model), and the keys it drops with the reason for each. Loading then streams
the mapped tensors one at a time (`ImportPlan.tensors`) into `checkpoint.load_state`, so a 16 GB
checkpoint never needs a second copy of itself in memory.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from edgevlm.errors import EdgeVLMError
from edgevlm.models import MedVLMConfig, VisionConfig

log = logging.getLogger("edgevlm.importers")

Shapes = dict[str, tuple[int, ...]]


@dataclass
class ImportPlan:
    source: str  # importer name, e.g. "m3d-lamed"
    path: Path
    config: MedVLMConfig | None  # None: a vision tower alone (no decoder to build a MedVLM from)
    vision: VisionConfig
    key_map: dict[str, str]  # source key -> edgevlm parameter name
    dropped: dict[str, str]  # source key -> why edgevlm does not need it
    tokenizer_json: str | None
    notes: list[str] = field(default_factory=list)
    # Streams (edgevlm name, tensor) for the mapped keys only, one tensor at a time.
    stream: Callable[[ImportPlan], Iterator[tuple[str, torch.Tensor]]] | None = None

    @property
    def vision_only(self) -> bool:
        return self.config is None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.stream is None:
            raise EdgeVLMError(f"{self.source} importer gave no tensor reader", self.path)
        return self.stream(self)

    def dropped_summary(self) -> list[str]:
        """One line per reason: how many keys, under which prefixes (the full list is `dropped`)."""
        lines = []
        for reason, count in Counter(self.dropped.values()).most_common():
            prefixes = sorted({_group(k) for k, r in self.dropped.items() if r == reason})
            shown = ", ".join(prefixes[:4]) + (f" (+{len(prefixes) - 4} more)" if len(prefixes) > 4 else "")
            lines.append(f"dropped {count} key(s) under {shown}: {reason}")
        return lines

    @property
    def extra(self) -> dict[str, Any]:
        """What a Checkpoint / bundle records about the import (JSON-able, short)."""
        return {"imported_from": self.source, "import_dropped": self.dropped_summary(), "import_notes": self.notes}


def _group(key: str) -> str:
    """`model.seg_module.image_encoder.blocks.3.attn.qkv.weight` -> `model.seg_module.`"""
    parts = key.split(".")
    depth = 2 if parts[0] == "model" and len(parts) > 2 else 1
    return ".".join(parts[:depth]) + "."


def announce(plan: ImportPlan) -> None:
    """Log what was dropped and any notes: never drop weights silently."""
    for line in plan.dropped_summary():
        log.warning("%s: %s", plan.path, line)
    for note in plan.notes:
        log.warning("%s: %s", plan.path, note)


# ------------------------------------------------------------------------------ reading headers


def shard_files(folder: Path) -> list[Path]:
    """Shards named by model.safetensors.index.json, else every *.safetensors in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise EdgeVLMError(f"unreadable model.safetensors.index.json ({e})", index) from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise EdgeVLMError("shard named in model.safetensors.index.json is missing", f)
        return files
    return sorted(folder.glob("*.safetensors"))


def safetensors_shapes(files: list[Path]) -> Shapes:
    """Names and shapes from the shard headers only: no tensor data is read."""
    shapes: Shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    if name in shapes:
                        raise EdgeVLMError(f"tensor {name} appears in more than one shard", file)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except EdgeVLMError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise EdgeVLMError(f"not a readable safetensors file ({e})", file) from None
    return shapes


def stream_safetensors(files: list[Path]) -> Callable[[ImportPlan], Iterator[tuple[str, torch.Tensor]]]:
    """Reader that opens one shard at a time and yields only mapped tensors (dropped ones are never read)."""

    def stream(plan: ImportPlan) -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            # One shard open at a time, one tensor at a time: load_state casts (fp16) or keeps (fp32) each
            # tensor before the next is read, so peak memory is the model plus the largest single tensor.
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    target = plan.key_map.get(name)
                    if target is not None:
                        yield target, f.get_tensor(name)

    return stream


# ------------------------------------------------------------------------------ checking the map


def check_key_map(key_map: dict[str, str], source_shapes: Shapes, expected: Shapes, path: Path,
                  what: str, optional: frozenset[str] = frozenset()) -> None:
    """Every mapped source key exists with the shape its edgevlm target needs; every target is covered."""
    problems = []
    absent = [k for k in key_map if k not in source_shapes]
    misshaped = [f"{k} {source_shapes[k]} -> {t} wants {expected.get(t)}" for k, t in key_map.items()
                 if k in source_shapes and source_shapes[k] != expected.get(t)]
    uncovered = sorted(set(expected) - set(key_map.values()) - optional)
    labelled = (("missing", absent), ("mis-shaped", misshaped), ("edgevlm parameter(s) not covered", uncovered))
    for label, names in labelled:
        if names:
            shown = "; ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    if problems:
        raise EdgeVLMError(f"{what} does not match the layout edgevlm expects: " + " | ".join(problems), path)


def split_keys(names: list[str], key_map: dict[str, str], droppable: list[tuple[re.Pattern[str], str]],
               path: Path, what: str) -> dict[str, str]:
    """Keys that are neither mapped nor known-droppable are an error; returns {dropped key: reason}."""
    dropped: dict[str, str] = {}
    unknown = []
    for name in names:
        if name in key_map:
            continue
        reason = next((why for pattern, why in droppable if pattern.match(name)), None)
        if reason is None:
            unknown.append(name)
        else:
            dropped[name] = reason
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise EdgeVLMError(f"{len(unknown)} unknown key(s) in this {what} (neither mapped onto edgevlm's model "
                           f"nor known to be unused): {shown}", path)
    return dropped
