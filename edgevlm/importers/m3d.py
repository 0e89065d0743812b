"""Import M3D-LaMed (BAAI-DCAI/M3D) checkpoints onto edgevlm's model family.

Accepted inputs (facts verified against BAAI-DCAI/M3D @63e7200 and MONAI 1.3.0; see shared/MODELS.md):
  * the Hugging Face folder M3D publishes (`GoodBaiBai88/M3D-LaMed-Phi-3-4B`, `-Llama-2-7B`):
    config.json of `LamedPhi3Config` (model_type "lamed_phi3") or `LamedConfig` ("lamed_llama"),
    safetensors shards + model.safetensors.index.json, and a tokenizer;
  * the bare vision tower `pretrained_ViT.bin` (a torch state dict of MONAI-style ViT keys, no prefix),
    or the same keys in one .safetensors file.

Every M3D key maps 1:1 onto an edgevlm parameter, with no reshaping:
  * patch embedding: MONAI "perceptron" = Rearrange `b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)` on
    the input's three spatial axes (D, H, W for M3D's 1x32x256x256 input) followed by `patch_embeddings.1`,
    a Linear on the flattened patch. edgevlm's `patchify` uses the same order (pd, ph, pw, C), raster (d, h, w).
  * `position_embeddings` (1, N, dim) is added inside the patch embedding, so before the CLS token is
    prepended, and CLS gets none: the same as VisionEncoder3D.
  * MONAI SABlock's qkv output is laid out (qkv, heads, head_dim), as edgevlm's vision Attention.
  * spp projector: avg_pool3d(kernel = stride = proj_pooling_size) over the (d, h, w) token grid, then
    `projector.0` Linear, GELU, `projector.2` Linear.
  * decoder: Hugging Face Phi-3 (fused qkv_proj, gate_up_proj with gate first) or Llama names.
Keys edgevlm does not run (SegVol `seg_module`, `seg_projector`, ...) are listed and dropped with a notice;
any other unexpected key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from edgevlm.errors import EdgeVLMError
from edgevlm.importers.common import (
    ImportPlan,
    Shapes,
    announce,
    check_key_map,
    safetensors_shapes,
    shard_files,
    split_keys,
    stream_safetensors,
)
from edgevlm.models import DecoderConfig, MedVLM, MedVLMConfig, ProjectorConfig, PromptConfig, VisionConfig
from edgevlm.models.vision import VisionEncoder3D

NAME = "m3d-lamed"
MODEL_TYPES = {"lamed_phi3": "phi3", "lamed_llama": "llama2"}
VIT_PREFIX = "model.vision_tower.vision_tower."
PATCH_KEY = "patch_embedding.patch_embeddings.1.weight"
# ViT3DTower builds MONAI's ViT without passing num_heads, so every M3D ViT has the default 12 heads;
# the state dict cannot tell (head count has no weight of its own).
VIT_HEADS = 12
# M3D's training defaults (LaMed/src/train/train.py ModelArguments), used where config.json is silent.
M3D_DEFAULTS: dict[str, Any] = {
    "image_channel": 1, "image_size": [32, 256, 256], "patch_size": [4, 16, 16], "vision_tower": "vit3d",
    "vision_select_layer": -1, "vision_select_feature": "patch", "mm_projector_type": "spp",
    "proj_layer_type": "mlp", "proj_layer_num": 2, "proj_pooling_type": "spatial", "proj_pooling_size": 2,
}
# What edgevlm runs: anything else in config.json is a model edgevlm would compute differently.
SUPPORTED = {
    "vision_select_layer": (-1,), "vision_select_feature": ("patch",), "mm_projector_type": ("spp",),
    "proj_layer_type": ("mlp",), "proj_layer_num": (2,), "proj_pooling_type": ("spatial",),
}
# A caption prompt from M3D's caption prompt list (the task their benchmark scores with BLEU/ROUGE).
DEFAULT_QUESTION = "Can you provide a caption consists of findings for this medical image?"

VIT_BLOCK_PARTS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.out_proj.weight", "attn.out_proj.bias",
                   "norm2.weight", "norm2.bias", "mlp.linear1.weight", "mlp.linear1.bias", "mlp.linear2.weight",
                   "mlp.linear2.bias")
PHI3_LAYER_PARTS = ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")
LLAMA_LAYER_PARTS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight")


def _droppable(vit_prefix: str) -> list[tuple[re.Pattern[str], str]]:
    vp = re.escape(vit_prefix)
    return [
        (re.compile(r"model\.seg_module\."), "SegVol segmentation module (edgevlm generates text only)"),
        (re.compile(r"model\.seg_projector\."), "segmentation prompt projector ([SEG] token -> SegVol)"),
        (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
         "RoPE frequency buffer (recomputed from rope_theta)"),
        # MONAI >= 1.4 adds an unused cross-attention to every TransformerBlock; a checkpoint re-saved with
        # it carries these weights although M3D's ViT never calls them (with_cross_attention=False).
        (re.compile(vp + r"blocks\.\d+\.(norm_cross_attn|cross_attn)\."), "MONAI>=1.4 cross-attention (unused)"),
    ]


# ----------------------------------------------------------------------------------------- detection


def _torch_state(path: Path, mmap: bool) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # refused pickle, legacy (non-zip) format with mmap, corrupt file
        raise EdgeVLMError(f"not a readable PyTorch state dict ({type(e).__name__}: {str(e)[:160]})", path) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EdgeVLMError("not a state dict of tensors", path)
    return obj


def _file_names(path: Path) -> list[str] | None:
    """Tensor names of a single file, cheaply (header / lazily mmapped pickle); None if unreadable."""
    try:
        if path.suffix == ".safetensors":
            return list(safetensors_shapes([path]))
        return list(_torch_state(path, mmap=True))
    except EdgeVLMError:
        return None


def detect(path: Path) -> bool:
    """True for an M3D-LaMed folder (config model_type or its key names) or a bare M3D ViT file."""
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.exists():
            try:
                if json.loads(cfg.read_text()).get("model_type") in MODEL_TYPES:
                    return True
            except (ValueError, AttributeError):
                return False
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                return VIT_PREFIX + PATCH_KEY in json.loads(index.read_text()).get("weight_map", {})
            except (ValueError, AttributeError):
                return False
        return False
    # Files: only the suffixes M3D's vision tower ships with; peeking costs a header read / lazy unpickle.
    if path.is_file() and path.suffix in (".bin", ".pt", ".pth", ".safetensors"):
        names = _file_names(path)
        return names is not None and PATCH_KEY in names and "blocks.0.attn.qkv.weight" in names
    return False


# ----------------------------------------------------------------------------------------- key maps


def vision_key_map(depth: int, qkv_bias: bool, prefix: str) -> dict[str, str]:
    """M3D ViT key (with `prefix`) -> edgevlm `vision.*` name."""
    m = {
        f"{prefix}patch_embedding.patch_embeddings.1.weight": "vision.patch_embed.weight",
        f"{prefix}patch_embedding.patch_embeddings.1.bias": "vision.patch_embed.bias",
        f"{prefix}patch_embedding.position_embeddings": "vision.pos_embed",
        f"{prefix}cls_token": "vision.cls_token",
        f"{prefix}norm.weight": "vision.norm.weight",
        f"{prefix}norm.bias": "vision.norm.bias",
    }
    parts = VIT_BLOCK_PARTS + (("attn.qkv.bias",) if qkv_bias else ())
    for i in range(depth):
        for part in parts:
            m[f"{prefix}blocks.{i}.{part}"] = f"vision.blocks.{i}.{part}"
    return m


def projector_key_map() -> dict[str, str]:
    # nn.Sequential(Linear, GELU, Linear): indices 0 and 2 hold the weights.
    return {
        "model.mm_projector.projector.0.weight": "projector.linear1.weight",
        "model.mm_projector.projector.0.bias": "projector.linear1.bias",
        "model.mm_projector.projector.2.weight": "projector.linear2.weight",
        "model.mm_projector.projector.2.bias": "projector.linear2.bias",
    }


def decoder_key_map(n_layers: int, fused: bool, tied: bool) -> dict[str, str]:
    m = {"model.embed_tokens.weight": "decoder.embed_tokens.weight", "model.norm.weight": "decoder.norm.weight"}
    if not tied:
        m["lm_head.weight"] = "decoder.lm_head.weight"
    for i in range(n_layers):
        for part in PHI3_LAYER_PARTS if fused else LLAMA_LAYER_PARTS:
            m[f"model.layers.{i}.{part}"] = f"decoder.layers.{i}.{part}"
    return m


# ----------------------------------------------------------------------------------------- configs


def vision_config(shapes: Shapes, prefix: str, image_size: Any, patch_size: Any, channels: int,
                  path: Path) -> VisionConfig:
    """ViT shape from the weights (M3D's config.json does not record depth/width; MONAI defaults do)."""
    if prefix + PATCH_KEY not in shapes:
        raise EdgeVLMError(f"no M3D vision tower found (expected {prefix + PATCH_KEY})", path)
    dim, patch_dim = shapes[prefix + PATCH_KEY]
    block = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.norm1\.weight$")
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := block.match(k))), default=-1)
    mlp_key = f"{prefix}blocks.0.mlp.linear1.weight"
    if depth == 0 or mlp_key not in shapes:
        raise EdgeVLMError("M3D vision tower has no transformer blocks", path)
    if dim % VIT_HEADS:
        raise EdgeVLMError(f"M3D ViT width {dim} is not divisible by its {VIT_HEADS} heads", path)
    try:
        cfg = VisionConfig(image_size=tuple(image_size), patch_size=tuple(patch_size), in_channels=int(channels),
                           dim=dim, depth=depth, heads=VIT_HEADS, mlp_dim=shapes[mlp_key][0],
                           qkv_bias=f"{prefix}blocks.0.attn.qkv.bias" in shapes, pos_embed="learned",
                           cls_token=True, final_norm=True, norm_eps=1e-5)  # nn.LayerNorm default, as MONAI
    except ValueError as e:
        raise EdgeVLMError(f"M3D vision config: {e}", path) from None
    if cfg.patch_dim != patch_dim:
        raise EdgeVLMError(f"M3D patch embedding takes {patch_dim} values per patch, but patch_size "
                           f"{cfg.patch_size} x {cfg.in_channels} channel(s) gives {cfg.patch_dim}", path)
    return cfg


def _special_tokens(folder: Path, variant: str) -> tuple[str, tuple[str, ...], str]:
    """(bos, eos tokens, pad) from special_tokens_map.json, else the base model's defaults.

    M3D keeps the base tokenizer's specials and sets pad = unk only where the base has no pad
    (train.py): Llama-2 -> <unk>; Phi-3 already pads with <|endoftext|>.
    """
    bos, eos, pad = ("<s>", ("<|endoftext|>",), "<|endoftext|>") if variant == "phi3" else ("<s>", ("</s>",), "<unk>")
    stm = folder / "special_tokens_map.json"
    if stm.exists():
        try:
            data = json.loads(stm.read_text())
        except ValueError:
            data = {}

        def text(v: Any) -> str | None:
            return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None

        bos = text(data.get("bos_token")) or bos
        eos = (text(data.get("eos_token")),) if text(data.get("eos_token")) else eos
        pad = text(data.get("pad_token")) or text(data.get("unk_token")) or pad
    return bos, eos, pad  # type: ignore[return-value]


def _setting(hf: dict[str, Any], key: str, notes: list[str]) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    notes.append(f"config.json has no {key}; using M3D's training default {M3D_DEFAULTS[key]!r}")
    return M3D_DEFAULTS[key]


def m3d_config(hf: dict[str, Any], shapes: Shapes, folder: Path, notes: list[str]) -> MedVLMConfig:
    """MedVLMConfig of an M3D-LaMed folder: config.json fields + shapes read from the shard headers."""
    variant = MODEL_TYPES.get(hf.get("model_type", ""))
    if variant is None:  # detected by key names: tell Phi-3 from Llama by the fused attention weight
        variant = "phi3" if "model.layers.0.self_attn.qkv_proj.weight" in shapes else "llama2"
        notes.append(f"config.json model_type {hf.get('model_type')!r} is not M3D's; read as {variant} by its keys")
    settings = {k: _setting(hf, k, notes) for k in M3D_DEFAULTS}
    if "vit3d" not in str(settings["vision_tower"]).lower():
        raise EdgeVLMError(f"M3D vision_tower {settings['vision_tower']!r} is not supported (only vit3d)", folder)
    for key, allowed in SUPPORTED.items():
        if settings[key] not in allowed:
            raise EdgeVLMError(f"M3D config {key}={settings[key]!r} is not supported by edgevlm "
                               f"(supported: {', '.join(map(repr, allowed))})", folder)
    vision = vision_config(shapes, VIT_PREFIX, settings["image_size"], settings["patch_size"],
                           settings["image_channel"], folder)
    if hf.get("hidden_act", "silu") != "silu":
        raise EdgeVLMError(f"decoder hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU needs silu)", folder)
    if "model.embed_tokens.weight" not in shapes:
        raise EdgeVLMError("no decoder embedding (model.embed_tokens.weight) in the checkpoint", folder)
    try:
        dim = int(hf["hidden_size"])
        n_heads = int(hf["num_attention_heads"])
        n_layers = int(hf["num_hidden_layers"])
        intermediate = int(hf["intermediate_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise EdgeVLMError(f"config.json lacks a decoder field: {e}", folder) from None
    # The vocabulary is what the checkpoint really has: M3D added <im_patch>, <bx_start>, <bx_end> and [SEG]
    # to the tokenizer and resized the embedding (Phi-3: 32011 -> 32015, not Phi-3's padded 32064).
    vocab = shapes["model.embed_tokens.weight"][0]
    if hf.get("vocab_size") not in (None, vocab):
        notes.append(f"config.json says vocab_size {hf['vocab_size']} but the embedding has {vocab} rows; "
                     f"using {vocab}")
    rope_scaling = hf.get("rope_scaling")
    if isinstance(rope_scaling, dict):
        rope_scaling = dict(rope_scaling)
        if "original_max_position_embeddings" in hf:  # HF Phi-3 keeps it beside, not inside, rope_scaling
            rope_scaling.setdefault("original_max_position_embeddings", hf["original_max_position_embeddings"])
    tied = bool(hf.get("tie_word_embeddings", False))
    try:
        decoder = DecoderConfig(
            vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), intermediate_size=intermediate,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling, max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            fused_qkv=variant == "phi3", fused_gate_up=variant == "phi3", tie_embeddings=tied,
        )
        bos, eos, pad = _special_tokens(folder, variant)
        return MedVLMConfig(
            name=f"{NAME}-{variant}",
            vision=vision,
            projector=ProjectorConfig(kind="spp", pool=(int(settings["proj_pooling_size"]),) * 3),
            decoder=decoder,
            # M3D's layout: tokenizer(image_tokens + question) = [BOS] + 256 <im_patch> + question; their
            # benchmark decodes greedily for at most 256 new tokens.
            prompt=PromptConfig(template="{question}", image_token="<im_patch>", bos_token=bos, eos_tokens=eos,
                                pad_token=pad, default_question=DEFAULT_QUESTION, max_new_tokens=256,
                                do_sample=False),
            preprocess="m3d-lamed",
        )
    except ValueError as e:
        raise EdgeVLMError(f"M3D config: {e}", folder) from None


def _tokenizer(folder: Path, notes: list[str]) -> str | None:
    tok = folder / "tokenizer.json"
    if tok.exists():
        return tok.read_text()
    if (folder / "tokenizer.model").exists():
        # M3D saved its tokenizer with use_fast=False: only the sentencepiece model. edgevlm reads
        # tokenizer.json and never downloads, so the conversion is a one-time offline step.
        notes.append(
            "tokenizer: only a sentencepiece tokenizer.model is here and edgevlm reads tokenizer.json (it never "
            "downloads one). Convert it once, offline, where transformers + sentencepiece are installed: "
            f"python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{folder}', "
            f"use_fast=True).save_pretrained('{folder}')\" (this writes tokenizer.json with <im_patch> and [SEG])."
        )
    else:
        notes.append("tokenizer: the folder has no tokenizer.json; add the model's tokenizer.json before `infer`")
    return None


def _expected_shapes(module: torch.nn.Module, prefix: str = "") -> Shapes:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------- plans


def plan(path: str | Path) -> ImportPlan:
    """Read an M3D-LaMed checkpoint's config and headers (no weights) and build the checked key map."""
    path = Path(path)
    if path.is_dir():
        return _plan_folder(path)
    if path.is_file():
        return _plan_vision_file(path)
    raise EdgeVLMError("no such file or folder", path)


def _plan_folder(folder: Path) -> ImportPlan:
    notes: list[str] = []
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise EdgeVLMError("not an M3D-LaMed folder: no config.json (LamedPhi3Config / LamedConfig)", folder)
    try:
        hf = json.loads(cfg_file.read_text())
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise EdgeVLMError(f"unreadable config.json ({e})", cfg_file) from None
    files = shard_files(folder)
    if not files:
        raise EdgeVLMError("no *.safetensors weights in the folder (M3D's .bin shards: re-save as safetensors)",
                           folder)
    shapes = safetensors_shapes(files)
    if VIT_PREFIX + PATCH_KEY not in shapes:
        raise EdgeVLMError(f"not an M3D-LaMed checkpoint: no {VIT_PREFIX + PATCH_KEY}", folder)
    cfg = m3d_config(hf, shapes, folder, notes)
    key_map = {**vision_key_map(cfg.vision.depth, cfg.vision.qkv_bias, VIT_PREFIX), **projector_key_map(),
               **decoder_key_map(cfg.decoder.n_layers, cfg.decoder.fused_qkv, cfg.decoder.tie_embeddings)}
    dropped = split_keys(list(shapes), key_map, _droppable(VIT_PREFIX), folder, "M3D-LaMed checkpoint")
    with torch.device("meta"):
        expected = _expected_shapes(MedVLM(cfg))
    check_key_map(key_map, shapes, expected, folder, "M3D-LaMed checkpoint",
                  optional=frozenset({"decoder.lm_head.weight"}) if cfg.decoder.tie_embeddings else frozenset())
    result = ImportPlan(NAME, folder, cfg, cfg.vision, key_map, dropped, _tokenizer(folder, notes), notes,
                        stream_safetensors(files))
    announce(result)
    return result


def _plan_vision_file(path: Path) -> ImportPlan:
    """pretrained_ViT.bin (or the same keys as .safetensors): M3D's ViT alone, on M3D's default geometry."""
    notes: list[str] = []
    if path.suffix == ".safetensors":
        shapes = safetensors_shapes([path])
        stream = stream_safetensors([path])
    else:
        shapes = {k: tuple(v.shape) for k, v in _torch_state(path, mmap=True).items()}
        stream = _stream_torch(path)
    if PATCH_KEY not in shapes:
        raise EdgeVLMError(f"not an M3D-LaMed vision tower: no {PATCH_KEY}", path)
    vision = vision_config(shapes, "", M3D_DEFAULTS["image_size"], M3D_DEFAULTS["patch_size"],
                           M3D_DEFAULTS["image_channel"], path)
    geometry = f"input 1x{'x'.join(map(str, vision.image_size))}, patch {'x'.join(map(str, vision.patch_size))}"
    notes.append(f"vision tower only: geometry assumed from M3D's defaults ({geometry}); no projector or decoder")
    key_map = vision_key_map(vision.depth, vision.qkv_bias, "")
    dropped = split_keys(list(shapes), key_map, _droppable(""), path, "M3D-LaMed vision tower")
    with torch.device("meta"):
        expected = _expected_shapes(VisionEncoder3D(vision), "vision.")
    check_key_map(key_map, shapes, expected, path, "M3D-LaMed vision tower")
    result = ImportPlan(NAME, path, None, vision, key_map, dropped, None, notes, stream)
    announce(result)
    return result


def _stream_torch(path: Path) -> Callable[[ImportPlan], Iterator[tuple[str, torch.Tensor]]]:
    def stream(plan: ImportPlan) -> Iterator[tuple[str, torch.Tensor]]:
        # mmap (private, copy-on-write, as safetensors' tensors): pages are read as each tensor is used or
        # cast, not all up front; popping hands each tensor over so none is held here twice.
        state = _torch_state(path, mmap=True)
        for name in list(state):
            tensor = state.pop(name)
            target = plan.key_map.get(name)
            if target is not None:
                yield target, tensor

    return stream


# ----------------------------------------------------------------------------------------- loading


def load_m3d(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MedVLM, ImportPlan]:
    """An M3D-LaMed folder as a MedVLM in eval mode (CPU, `dtype`), streamed one tensor at a time."""
    from edgevlm.checkpoint import build_model, load_state

    p = plan(path)
    if p.config is None:
        raise EdgeVLMError("this is M3D-LaMed's vision tower alone (no decoder); load it with "
                           "edgevlm.importers.m3d.load_m3d_vision, or pass the full M3D-LaMed folder", p.path)
    model = build_model(p.config, "meta")
    load_state(model, p.tensors(), p.path, dtype)
    return model.eval(), p


def load_m3d_vision(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[VisionEncoder3D, ImportPlan]:
    """Only the ViT (from pretrained_ViT.bin or a full M3D folder) as a VisionEncoder3D in eval mode."""
    p = plan(path)
    with torch.device("meta"):
        encoder = VisionEncoder3D(p.vision)
    # Only the vision keys are read: from a full 16 GB folder that is the ViT's few hundred MB.
    vision_only = dataclasses.replace(p, key_map={k: t for k, t in p.key_map.items() if t.startswith("vision.")})
    state = {}
    for name, tensor in vision_only.tensors():
        state[name[len("vision."):]] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing = sorted(set(encoder.state_dict()) - set(state))
    if missing:
        raise EdgeVLMError(f"M3D vision tower is missing {len(missing)} key(s): {', '.join(missing[:6])}", p.path)
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval(), p
