"""Model configs: dataclasses that round-trip through JSON, plus named presets.

One `MedVLMConfig` describes a whole model (vision encoder, projector, decoder, prompt layout). It is
stored inside every checkpoint and bundle, so it must stay plain data: ints, floats, strings, tuples.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

Triple = tuple[int, int, int]


def _as_triple(value: Any) -> Triple:
    t = tuple(int(v) for v in value)
    if len(t) != 3:
        raise ValueError(f"expected 3 values (d, h, w), got {value!r}")
    return t  # type: ignore[return-value]


@dataclass
class VisionConfig:
    image_size: Triple = (32, 256, 256)  # (D, H, W) of the preprocessed volume
    patch_size: Triple = (4, 16, 16)  # (pd, ph, pw)
    in_channels: int = 1
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = False
    pos_embed: str = "learned"  # "learned": one (N, dim) table; "factorized": d + h + w tables summed
    cls_token: bool = True
    final_norm: bool = True
    norm_eps: float = 1e-5
    attention: str = "dense"  # "dense" | "sparse3d"
    sparse_radius: int = 1  # neighbourhood radius in grid cells, for "sparse3d"
    sparse_block: int = 64  # tokens per attention block, for "sparse3d"
    foreground_threshold: float | None = None  # normalized intensity above which a patch is "not air"

    def __post_init__(self) -> None:
        self.image_size = _as_triple(self.image_size)
        self.patch_size = _as_triple(self.patch_size)
        for size, patch, axis in zip(self.image_size, self.patch_size, "DHW", strict=True):
            if size % patch:
                raise ValueError(f"vision image_size {axis}={size} is not a multiple of patch {patch}")
        if self.dim % self.heads:
            raise ValueError(f"vision dim {self.dim} is not divisible by heads {self.heads}")
        if self.pos_embed not in ("learned", "factorized"):
            raise ValueError(f"vision pos_embed must be 'learned' or 'factorized', got {self.pos_embed!r}")
        if self.attention not in ("dense", "sparse3d"):
            raise ValueError(f"vision attention must be 'dense' or 'sparse3d', got {self.attention!r}")

    @property
    def grid(self) -> Triple:
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size, strict=True))  # type: ignore

    @property
    def num_patches(self) -> int:
        d, h, w = self.grid
        return d * h * w

    @property
    def patch_dim(self) -> int:
        pd, ph, pw = self.patch_size
        return pd * ph * pw * self.in_channels


@dataclass
class ProjectorConfig:
    kind: str = "spp"  # "spp": 3D avg-pool over the token grid + MLP (M3D-LaMed); "mlp": MLP per token
    pool: Triple = (2, 2, 2)  # spp pooling kernel = stride over (d, h, w)
    hidden_dim: int | None = None  # None: the decoder width, as M3D-LaMed
    # RMSNorm on the visual tokens. Off for M3D-LaMed (it has none); on for models trained from scratch,
    # where without it the projector output drifts to a large constant "soft prompt" and the vision
    # encoder's gradient vanishes behind it.
    output_norm: bool = False
    # A learned (num_visual_tokens, decoder_dim) table added to the visual tokens, zero at the start. Off for
    # M3D-LaMed. Why: the decoder sees visual tokens only through attention, and a one-layer decoder's query
    # is the current text token alone, so it reads the image as content-weighted means that lose WHERE the
    # content was (the side of an effusion). The table writes each token's place into its content, so the
    # same mean over the fluid-bearing tokens also says which side they are on.
    pos_embed: bool = False

    def __post_init__(self) -> None:
        self.pool = _as_triple(self.pool)
        if self.kind not in ("spp", "mlp"):
            raise ValueError(f"projector kind must be 'spp' or 'mlp', got {self.kind!r}")


@dataclass
class DecoderConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (= n_heads)
    intermediate_size: int | None = None  # None: Llama's rule from dim
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope_scaling: {"rope_type": "linear", "factor": f} | {"rope_type": "llama3", ...}
    # | {"rope_type": "longrope", "short_factor": [...], "long_factor": [...],
    #    "original_max_position_embeddings": n}
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    qkv_bias: bool = False  # Qwen2: bias on q, k, v
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.intermediate_size is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.intermediate_size = 256 * ((hidden + 255) // 256)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"decoder n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"decoder head_dim {self.head_dim} must be even for RoPE")


@dataclass
class PromptConfig:
    """How a prompt is laid out around the visual tokens, and the generation defaults.

    Layout (as M3D-LaMed): [BOS] + num_visual_tokens image placeholders + template(question).
    """

    template: str = "{question}"
    image_token: str = "<im_patch>"
    bos_token: str | None = "<s>"
    eos_tokens: tuple[str, ...] = ("</s>",)
    pad_token: str = "<pad>"
    default_question: str = "Write the radiology report for this CT."
    max_new_tokens: int = 256
    do_sample: bool = False
    # Operating points of a structured report's decisions, set after training on calibration studies
    # (`edgevlm operating-points`), not learned: {key: (decision token, threshold)}. When the generated text
    # ends with a key that starts a line ("Lung mass:"), the decision token (" none") is picked iff its
    # probability is at least the threshold, otherwise the likeliest other token. Why: greedy compares the
    # decision token with each other token alone, and an answer whose first token is spread over many values
    # ("60 mm", "45 mm", ...) loses to " none" at P(none) = 0.3; the decision belongs to P(none) against
    # P(anything else).
    decisions: dict[str, tuple[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.eos_tokens = tuple(self.eos_tokens)
        self.decisions = {str(k): (str(v[0]), float(v[1])) for k, v in self.decisions.items()}
        for key, (_, p) in self.decisions.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"decisions[{key!r}] threshold {p} is not a probability")


@dataclass
class MedVLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    preprocess: str | dict = "m3d-lamed"  # a named recipe or the recipe itself (edgevlm.preprocess)
    name: str = "medvlm"

    @property
    def num_visual_tokens(self) -> int:
        d, h, w = self.vision.grid
        if self.projector.kind == "mlp":
            return d * h * w
        pd, ph, pw = self.projector.pool
        if d % pd or h % ph or w % pw:
            raise ValueError(f"spp pool {self.projector.pool} does not divide the token grid {self.vision.grid}")
        return (d // pd) * (h // ph) * (w // pw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MedVLMConfig:
        parts = {"vision": VisionConfig, "projector": ProjectorConfig, "decoder": DecoderConfig,
                 "prompt": PromptConfig}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MedVLMConfig fields: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name in parts:
                part = parts[name]
                part_fields = {f.name for f in fields(part)}
                extra = set(value) - part_fields
                if extra:
                    raise ValueError(f"unknown {name} config fields: {sorted(extra)}")
                kwargs[name] = part(**value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> MedVLMConfig:
        return cls.from_dict(json.loads(text))


def m3d_lamed_phi3() -> MedVLMConfig:
    """M3D-LaMed-Phi-3-4B shapes (facts in shared/MODELS.md): ViT-B on 32x256x256, spp to 256 tokens."""
    return MedVLMConfig(
        name="m3d-lamed-phi3",
        vision=VisionConfig(),
        projector=ProjectorConfig(kind="spp", pool=(2, 2, 2)),
        decoder=DecoderConfig(
            vocab_size=32015, dim=3072, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=8192,
            rope_theta=10000.0, max_seq_len=4096, fused_qkv=True, fused_gate_up=True, norm_eps=1e-5,
        ),
        prompt=PromptConfig(template="{question}", max_new_tokens=256),
        preprocess="m3d-lamed",
    )


def m3d_lamed_llama2() -> MedVLMConfig:
    cfg = m3d_lamed_phi3()
    cfg.name = "m3d-lamed-llama2"
    cfg.decoder = DecoderConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, intermediate_size=11008,
                                max_seq_len=4096, norm_eps=1e-5)
    return cfg


def demo_tiny() -> MedVLMConfig:
    """The embedded demo model's shape: trains on 2 CPU cores in minutes."""
    return MedVLMConfig(
        name="demo-tiny",
        vision=VisionConfig(image_size=(32, 128, 128), patch_size=(4, 16, 16), dim=192, depth=4, heads=3,
                            mlp_dim=768, qkv_bias=True, cls_token=True),
        projector=ProjectorConfig(kind="spp", pool=(2, 2, 2), output_norm=True),
        decoder=DecoderConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                              intermediate_size=704, max_seq_len=512, tie_embeddings=True),
        # The synthetic reports run to 194 tokens (p90 164) with this tokenizer: 224 never cuts one short.
        prompt=PromptConfig(template="{question}", max_new_tokens=224),
        preprocess="demo-chest",
    )


def demo_small() -> MedVLMConfig:
    """The demo student (`edgevlm distill` from demo-tiny): half the ViT depth with sparse3d attention over
    foreground blocks, the teacher's 64 visual tokens, and ONE decoder layer of the teacher's shape.

    Why one layer: on a CPU, greedy decoding of this size is bound by per-layer dispatch, not width.
    Measured (torch, 2 threads, fp32): 0.50-0.75 ms per layer per token at widths 128-256, so a 2-layer x
    192 decoder at 1.25 ms/token (2.8x the teacher's 3.5 ms) falls short of 3x end to end once the fixed
    preprocess cost is added; 1 layer x 256 at 0.90 ms/token (3.9x) leaves room for it. Keeping the teacher's layer
    shape lets the student start from the teacher's last layer, embeddings and head unchanged."""
    return MedVLMConfig(
        name="demo-small",
        vision=VisionConfig(image_size=(32, 128, 128), patch_size=(4, 16, 16), dim=192, depth=2, heads=3,
                            mlp_dim=768, qkv_bias=True, cls_token=True, attention="sparse3d", sparse_radius=1,
                            sparse_block=64, foreground_threshold=0.05),
        projector=ProjectorConfig(kind="spp", pool=(2, 2, 2), output_norm=True),
        decoder=DecoderConfig(vocab_size=2048, dim=256, n_layers=1, n_heads=4, n_kv_heads=2,
                              intermediate_size=704, max_seq_len=512, tie_embeddings=True),
        prompt=PromptConfig(template="{question}", max_new_tokens=224),
        preprocess="demo-chest",
    )


PRESETS = {
    "m3d-lamed-phi3": m3d_lamed_phi3,
    "m3d-lamed-llama2": m3d_lamed_llama2,
    "demo-tiny": demo_tiny,
    "demo-small": demo_small,
}
