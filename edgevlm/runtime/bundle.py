"""A bundle on disk: its layout, its manifest, and the checks made before anything in it is used.

    bundle/
      vision.onnx            preprocessed volume (B, 1, D, H, W) -> visual tokens (B, M, dim)
      decoder.onnx           one prefill/decode step over a per-layer static KV cache
      embeddings.safetensors token embedding table "embed_tokens" (vocab, dim); the runtime gathers rows
      tokenizer.json         Hugging Face tokenizers JSON
      preprocess.json        the preprocessing Recipe (edgevlm.preprocess)
      manifest.json          schema, versions, opsets, sha256 of every other file, source, config, parity

DESIGN.md decision 4: a bundle is a verified artifact. `verify_bundle` refuses a bundle that is
incomplete, tampered with (any sha256 mismatch, any unlisted file) or written by a newer edgevlm.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm import __version__
from edgevlm.checkpoint import file_sha256
from edgevlm.errors import EdgeVLMError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
VISION_FILE = "vision.onnx"
DECODER_FILE = "decoder.onnx"
EMBEDDINGS_FILE = "embeddings.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESS_FILE = "preprocess.json"
REQUIRED_FILES = (VISION_FILE, DECODER_FILE, EMBEDDINGS_FILE, TOKENIZER_FILE, PREPROCESS_FILE)


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str  # the bundle id: covers every file's sha256 through the manifest

    @property
    def bundle_id(self) -> str:
        return self.manifest_sha256

    def file(self, name: str) -> Path:
        return self.path / name


def version_tuple(version: str) -> tuple[int, ...]:
    """"0.1.0" -> (0, 1, 0); pre-release tails ("0.2.0rc1") keep their numeric head."""
    parts = []
    for piece in str(version).split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative name: {sha256, bytes}} for every file in `folder` except the manifest."""
    table = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = f.relative_to(folder).as_posix()
        if name != MANIFEST:
            table[name] = {"sha256": file_sha256(f), "bytes": f.stat().st_size}
    return table


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise EdgeVLMError("no such bundle folder (make one with `edgevlm export MODEL -o BUNDLE`)", path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise EdgeVLMError("not a bundle: manifest.json is missing (an interrupted or partial copy?)", path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgeVLMError(f"manifest.json is not valid JSON ({e}); re-export the bundle", manifest_path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != "edgevlm-bundle":
        raise EdgeVLMError("manifest.json is not an edgevlm bundle manifest", manifest_path)
    return manifest


def verify_bundle(path: str | Path, check_hashes: bool = True) -> Bundle:
    """Read and check a bundle; every problem is one EdgeVLMError line naming the file and the fix."""
    path = Path(path)
    manifest = read_manifest(path)
    where = path / MANIFEST
    schema = manifest.get("schema_version")
    made_by = str(manifest.get("edgevlm_version", "?"))
    if not isinstance(schema, int) or schema > SCHEMA_VERSION or version_tuple(made_by) > version_tuple(__version__):
        raise EdgeVLMError(
            f"bundle was written by edgevlm {made_by} (schema {schema}); this is edgevlm {__version__} "
            f"(schema {SCHEMA_VERSION}): upgrade edgevlm or re-export the bundle with this version", where)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise EdgeVLMError("manifest.json lists no files; re-export the bundle", where)
    for name in REQUIRED_FILES:
        if name not in files:
            raise EdgeVLMError(f"manifest.json does not list {name}; re-export the bundle", where)
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise EdgeVLMError(f"bundle file {name} is missing (incomplete copy?); copy the whole bundle again",
                               path)
        if f.stat().st_size != entry.get("bytes"):
            raise EdgeVLMError(f"bundle file {name} has {f.stat().st_size} bytes, the manifest says "
                               f"{entry.get('bytes')} (truncated or modified); re-copy or re-export the bundle", path)
        if check_hashes and file_sha256(f) != entry.get("sha256"):
            raise EdgeVLMError(f"bundle file {name} does not match its sha256 in manifest.json (modified or "
                               "corrupted); re-copy or re-export the bundle", path)
    extra = sorted(set(file_table_names(path)) - set(files))
    if extra:
        raise EdgeVLMError(f"bundle holds files its manifest does not list ({', '.join(extra[:5])}); a bundle "
                           "is never edited by hand: re-export it", path)
    return Bundle(path, manifest, file_sha256(where))


def file_table_names(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
