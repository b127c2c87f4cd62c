"""Model configuration: vision encoder → connector → LLaMA-family language model.

Field names follow the Hugging Face configs they are read from (CLIPVisionConfig, LlamaConfig,
MobileVLM's ``mm_*`` keys) so that a reader of either can find their way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edge_mllm.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PROJECTOR_TYPES = ("mlp2x_gelu", "ldp", "ldpv2", "query")
# What the default recipe trains: MobileVLM's projectors, which every export format and llama.cpp's clip take
# on a 24x24 grid. Here, not in the recipe, so that the CLI offers them without importing torch.
RECIPE_PROJECTORS = ("ldpv2", "ldp")
# Which teacher blocks a distilled student keeps (distill.student.select_layers); the CLI offers them too.
LAYER_SELECTIONS = ("ends", "front", "even")
ASPECT_MODES = ("pad", "crop")


def check_sizes(config: object, where: str, names: tuple[str, ...]) -> None:
    """Raise unless each named field of ``config`` is a whole number ≥ 1 (configs read from JSON can
    hold 22.5, "2048", null, true or -1, which would otherwise fail later as arithmetic errors)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where} {name} must be a positive integer, not {value!r}")


@dataclass
class VisionConfig:
    """A CLIP-style ViT (CLIPVisionConfig names) plus which layer's features feed the connector."""

    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Index into HF's hidden_states tuple (embeddings output first): -2 is MobileVLM/LLaVA's choice.
    select_layer: int = -2
    # "patch" drops the CLS token (MobileVLM, LLaVA); "cls_patch" keeps it.
    select_feature: str = "patch"
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        check_sizes(self, "vision", ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
                                     "num_hidden_layers", "num_attention_heads"))
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("vision hidden_size must be divisible by num_attention_heads")
        if self.hidden_act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh"):
            raise ConfigError(f"unsupported vision hidden_act {self.hidden_act!r}")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"unsupported select_feature {self.select_feature!r}")
        _ = self.num_layers_computed  # raises on an out-of-range select_layer

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_layers_computed(self) -> int:
        """Encoder layers that run: HF ``hidden_states[k]`` is the output after k layers."""
        n = self.num_hidden_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        if not 0 <= n <= self.num_hidden_layers:
            raise ConfigError(f"select_layer {self.select_layer} is outside a {self.num_hidden_layers}-layer encoder")
        return n

    @property
    def num_feature_tokens(self) -> int:
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)


@dataclass
class ProjectorConfig:
    """The connector between vision features and LLM embeddings."""

    type: str = "ldpv2"
    num_queries: int = 64  # query connector only
    num_heads: int = 8  # query connector only

    def __post_init__(self) -> None:
        if self.type not in PROJECTOR_TYPES:
            raise ConfigError(f"unknown projector type {self.type!r}; choose one of {', '.join(PROJECTOR_TYPES)}")


@dataclass
class TextConfig:
    """A LLaMA-family decoder (LlamaConfig names)."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_sizes(self, "LLM", ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings"))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("hidden_size must be divisible by num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        else:
            check_sizes(self, "LLM", ("head_dim",))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")


@dataclass
class MLLMConfig:
    """A whole model. ``vision`` and ``projector`` are None for a text-only LLM."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = None
    projector: ProjectorConfig | None = None
    # How images are squared before the CLIP resize/crop: MobileVLM/LLaVA "pad", or CLIP's "crop".
    image_aspect_ratio: str = "pad"
    # Free-form provenance shown by `edge-mllm info` (e.g. that a vision tower is untrained).
    notes: dict[str, str] = field(default_factory=dict)
    # The quantization scheme whose grid the LLM's decoder linears were trained on (quantization-aware
    # LoRA, e.g. "rtn-w4-g32-min"): exporting with it keeps those weights exactly, so exports default to it.
    weight_grid: str | None = None

    def __post_init__(self) -> None:
        if (self.vision is None) != (self.projector is None):
            raise ConfigError("a model needs both a vision encoder and a projector, or neither")
        if self.image_aspect_ratio not in ASPECT_MODES:
            raise ConfigError(f"image_aspect_ratio must be one of {ASPECT_MODES}")
        if self.projector is not None and self.projector.type in ("ldp", "ldpv2"):
            if self.vision.grid_size % 2 or self.vision.select_feature != "patch":
                raise ConfigError(
                    f"{self.projector.type} needs an even patch grid of patch tokens only "
                    f"(got {self.vision.grid_size}x{self.vision.grid_size}, {self.vision.select_feature})"
                )

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MLLMConfig:
        try:
            return cls(
                text=TextConfig(**data["text"]),
                vision=VisionConfig(**data["vision"]) if data.get("vision") else None,
                projector=ProjectorConfig(**data["projector"]) if data.get("projector") else None,
                image_aspect_ratio=data.get("image_aspect_ratio", "pad"),
                notes=dict(data.get("notes", {})),
                weight_grid=data.get("weight_grid"),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"invalid edge-mllm config: {exc}") from exc
