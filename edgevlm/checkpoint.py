"""Checkpoint loading and saving.

Three inputs load into the same `MedVLM`:
  (a) edgevlm's own format (what edgevlm writes): ONE safetensors file; its string metadata holds
      `edgevlm_format` ("1"), `config` (MedVLMConfig JSON), `tokenizer` (tokenizer.json text) and
      `extra` (JSON: training command, seed, eval summary...). Tied lm_head weights are stored once.
  (b) a PyTorch / Lightning `.ckpt` / `.pt` / `.bin`: a dict with `state_dict` (and optionally
      `hyper_parameters` holding `config` and `tokenizer`), or a bare state dict. Read with
      `torch.load(weights_only=True)`: a pickle that needs code execution is refused, never run.
  (c) a Hugging Face-style directory: `config.json` (a MedVLMConfig), `model.safetensors` or shards
      with `model.safetensors.index.json`, and `tokenizer.json`.
Where the config is not inside the checkpoint, `config=` (the CLI's `--config FILE`) supplies it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edgevlm import __version__
from edgevlm.errors import EdgeVLMError
from edgevlm.models import PRESETS, MedVLM, MedVLMConfig

FORMAT_VERSION = "1"
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class Checkpoint:
    model: MedVLM
    config: MedVLMConfig
    tokenizer_json: str | None
    path: Path
    kind: str  # "edgevlm" | "torch" | "hf-dir" | an importer name ("m3d-lamed")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return path_sha256(self.path)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def path_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode())
        digest.update(bytes.fromhex(file_sha256(f)))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- reading


def checkpoint_kind(path: Path) -> str:
    if path.is_dir():
        if not (path / "config.json").exists() and not _shard_files(path):
            raise EdgeVLMError("folder is not a checkpoint (no config.json or *.safetensors)", path)
        return "hf-dir"
    if not path.exists():
        raise EdgeVLMError("no such file or folder", path)
    if path.suffix == ".safetensors":
        return "edgevlm"
    if path.suffix in TORCH_SUFFIXES:
        return "torch"
    with open(path, "rb") as f:
        head = f.read(8)
    # A safetensors file starts with a little-endian u64 header length followed by '{'.
    if len(head) == 8 and int.from_bytes(head, "little") < (1 << 30):
        with open(path, "rb") as f:
            f.seek(8)
            if f.read(1) == b"{":
                return "edgevlm"
    return "torch"


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def _config_from(source: Any, where: Path) -> MedVLMConfig:
    try:
        if isinstance(source, MedVLMConfig):
            return source
        if isinstance(source, (str, Path)) and str(source) in PRESETS:
            return PRESETS[str(source)]()
        if isinstance(source, str) and source.lstrip().startswith("{"):
            source = json.loads(source)
        elif isinstance(source, (str, Path)):
            where = Path(source)
            if not where.is_file():
                raise EdgeVLMError("config file not found (give a MedVLMConfig JSON or a preset name: "
                                   f"{', '.join(PRESETS)})", where)
            source = json.loads(where.read_text())
        if isinstance(source, dict) and "config" in source and "vision" not in source:
            source = source["config"]
        return MedVLMConfig.from_dict(source)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise EdgeVLMError(f"not a valid edgevlm model config: {e}", where) from None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise EdgeVLMError(f"not a readable safetensors file ({e})", path) from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeVLMError(
            "refusing to load: this pickle needs code execution, which edgevlm never runs "
            f"({first[:160]}). Re-save the weights as safetensors or a plain state dict.", path
        ) from None
    except Exception as e:  # a corrupt pickle can fail anywhere in the unpickler (KeyError, EOFError, ...)
        detail = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise EdgeVLMError(f"not a readable PyTorch checkpoint ({type(e).__name__}: {detail})", path) from None


def _torch_parts(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, hyper-parameters) of a torch/Lightning checkpoint dict."""
    if not isinstance(obj, dict):
        raise EdgeVLMError(f"expected a dict checkpoint, found {type(obj).__name__}", path)
    hyper = obj.get("hyper_parameters") or obj.get("hparams") or {}
    state = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgeVLMError("no state_dict of tensors found in the checkpoint", path)
    # Lightning wraps the model in a LightningModule attribute: strip a prefix every key shares.
    for prefix in ("model.", "module.", "net."):
        if state and all(k.startswith(prefix) for k in state) and not any(
            k.startswith(("vision.", "decoder.")) for k in state
        ):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, dict(hyper) if isinstance(hyper, dict) else {}


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) from a native file or an HF directory, one tensor at a time."""
    files = _shard_files(path) if path.is_dir() else [path]
    for file in files:
        if not file.exists():
            raise EdgeVLMError("shard named in the index is missing", file)
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, f.get_tensor(name)
        except EdgeVLMError:
            raise
        except Exception as e:
            raise EdgeVLMError(f"not a readable safetensors file ({e})", file) from None


def _import_plan(path: Path, from_: str | None) -> Any:
    """Hook for public checkpoints (edgevlm.importers): their plan, or None for edgevlm's own formats."""
    from edgevlm.importers import plan_import

    plan = plan_import(path, from_)
    if plan is not None and plan.config is None:
        raise EdgeVLMError(f"{plan.source}: a vision tower alone (no decoder) is not a whole model; load it "
                           "with edgevlm.importers.m3d.load_m3d_vision or pass the model's full folder", path)
    return plan


def read_config(path: str | Path, config: Any = None,
                from_: str | None = None) -> tuple[MedVLMConfig, str | None, dict[str, Any]]:
    """(config, tokenizer JSON, extra) of a checkpoint, without loading its weights where possible.

    `from_` forces a public-checkpoint importer (e.g. "m3d-lamed"); by default one is auto-detected."""
    if config is None and from_ is None and str(path) in PRESETS:
        return PRESETS[str(path)](), None, {}
    path = Path(path)
    plan = _import_plan(path, from_)
    if plan is not None:
        return (plan.config if config is None else _config_from(config, path)), plan.tokenizer_json, plan.extra
    kind = checkpoint_kind(path)
    if kind == "edgevlm":
        meta = _safetensors_metadata(path)
        if config is None and "config" not in meta:
            raise EdgeVLMError("safetensors file carries no edgevlm config; pass --config FILE", path)
        cfg = _config_from(config if config is not None else meta["config"], path)
        return cfg, meta.get("tokenizer"), json.loads(meta.get("extra", "{}"))
    if kind == "hf-dir":
        cfg_source = config if config is not None else path / "config.json"
        if config is None and not (path / "config.json").exists():
            raise EdgeVLMError("folder has no config.json; pass --config FILE", path)
        tok = path / "tokenizer.json"
        return _config_from(cfg_source, path), tok.read_text() if tok.exists() else None, {}
    if path.suffix == ".json":
        return _config_from(path, path), None, {}
    _, hyper = _torch_parts(_torch_load(path), path)
    if config is None and "config" not in hyper:
        raise EdgeVLMError("checkpoint carries no model config (hyper_parameters['config']); pass --config FILE",
                           path)
    return _config_from(config if config is not None else hyper["config"], path), hyper.get("tokenizer"), {}


def build_model(cfg: MedVLMConfig, device: str | torch.device = "cpu") -> MedVLM:
    """An uninitialised-weights model; on "meta" it allocates nothing (for counting and loading)."""
    with torch.device(device):
        return MedVLM(cfg)


def _expected_shapes(model: MedVLM) -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.cfg.decoder.tie_embeddings:
        shapes.pop("decoder.lm_head.weight", None)
    return shapes


def load_state(model: MedVLM, tensors: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
               path: Path, dtype: torch.dtype = torch.float32) -> MedVLM:
    """Check names and shapes, then place the tensors into a meta-device model (no double copy)."""
    expected = _expected_shapes(model)
    items = tensors.items() if isinstance(tensors, dict) else tensors
    state: dict[str, torch.Tensor] = {}
    unexpected, misshaped = [], []
    for name, tensor in items:
        if model.cfg.decoder.tie_embeddings and name == "decoder.lm_head.weight":
            continue  # the tied copy: the embedding table is the weight
        if name not in expected:
            unexpected.append(name)
        elif tuple(tensor.shape) != expected[name]:
            misshaped.append(f"{name} {tuple(tensor.shape)} (model wants {expected[name]})")
        else:
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing = sorted(set(expected) - set(state) - {m.split(" ")[0] for m in misshaped})
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
            problems.append(f"{len(names)} {label} key(s): {shown}")
    if problems:
        raise EdgeVLMError("checkpoint does not match its config: " + "; ".join(problems), path)
    model.load_state_dict(state, strict=False, assign=True)
    if model.cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed_tokens.weight
    return model


def load_checkpoint(path: str | Path, config: Any = None, dtype: torch.dtype = torch.float32,
                    from_: str | None = None) -> Checkpoint:
    """Load any supported checkpoint into a MedVLM in eval mode (on CPU, in `dtype`).

    Public checkpoints (M3D-LaMed folders) are auto-detected or forced with `from_`, and streamed one
    tensor at a time through their importer's key map (edgevlm.importers)."""
    path = Path(path)
    plan = _import_plan(path, from_)
    if plan is not None:
        cfg = plan.config if config is None else _config_from(config, path)
        model = load_state(build_model(cfg, "meta"), plan.tensors(), path, dtype)
        return Checkpoint(model.eval(), cfg, plan.tokenizer_json, path, plan.source, plan.extra)
    cfg, tokenizer_json, extra = read_config(path, config)
    kind = checkpoint_kind(path)
    model = build_model(cfg, "meta")
    if kind == "torch":
        state, hyper = _torch_parts(_torch_load(path), path)
        tokenizer_json = tokenizer_json or hyper.get("tokenizer")
        load_state(model, state, path, dtype)
    else:
        load_state(model, iter_tensors(path), path, dtype)
    return Checkpoint(model.eval(), cfg, tokenizer_json, path, kind, extra)


# ----------------------------------------------------------------------------------------- writing


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), then rename onto `path`: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: MedVLM, path: str | Path, tokenizer_json: str | None = None,
                    extra: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write edgevlm's native format (one safetensors file), atomically."""
    path = Path(path)
    state = {}
    for name, tensor in model.state_dict().items():
        if model.cfg.decoder.tie_embeddings and name == "decoder.lm_head.weight":
            continue
        t = tensor.detach().cpu()
        state[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    metadata = {
        "edgevlm_format": FORMAT_VERSION,
        "edgevlm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": model.cfg.to_json(indent=None),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    if tokenizer_json is not None:
        metadata["tokenizer"] = tokenizer_json
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return path
