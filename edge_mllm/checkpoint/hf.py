"""Hugging Face folders: ``LlamaForCausalLM``, CLIP vision towers, and the LLaVA-1.5 / MobileVLM V1/V2
layout (a Llama checkpoint plus ``mm_*`` config keys, ``model.mm_projector.*`` and, for V2,
``model.vision_tower.vision_tower.*`` tensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.checkpoint.weights import has_weights, load_into, read_json, read_weights, select
from edge_mllm.config import CLIP_MEAN, CLIP_STD, MLLMConfig, ProjectorConfig, TextConfig, VisionConfig
from edge_mllm.errors import CheckpointError
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.tokenizer import Tokenizer

# Hub names MobileVLM/LLaVA configs refer to, mapped to their CLIPVisionConfig: never downloaded.
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(image_size=336, patch_size=14, hidden_size=1024,
                                              intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "openai/clip-vit-large-patch14": dict(image_size=224, patch_size=14, hidden_size=1024,
                                          intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "openai/clip-vit-base-patch16": dict(image_size=224, patch_size=16, hidden_size=768,
                                         intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "openai/clip-vit-base-patch32": dict(image_size=224, patch_size=32, hidden_size=768,
                                         intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}
# MobileVLM's projector names → ours.
PROJECTOR_NAMES = {"ldpnet": "ldp", "ldpnetv2": "ldpv2", "mlp2x_gelu": "mlp2x_gelu", "ldp": "ldp", "ldpv2": "ldpv2"}
# CLIPVisionConfig defaults, for keys a config.json leaves out.
CLIP_VISION_DEFAULTS = dict(image_size=224, patch_size=32, num_channels=3, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12, layer_norm_eps=1e-5, hidden_act="quick_gelu")


def text_config_from_hf(cfg: dict[str, Any]) -> TextConfig:
    """LlamaConfig dict (transformers 4.x or 5.x) → TextConfig."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise CheckpointError(f"unsupported RoPE scaling {rope_type!r}")
    try:
        return TextConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
        )
    except KeyError as exc:
        raise CheckpointError(f"LLM config is missing {exc}") from exc


def vision_config_from_hf(cfg: dict[str, Any], select_layer: int = -2, select_feature: str = "patch") -> VisionConfig:
    """CLIPConfig / CLIPVisionConfig dict → VisionConfig."""
    cfg = cfg.get("vision_config", cfg)
    values = {k: cfg.get(k, default) for k, default in CLIP_VISION_DEFAULTS.items()}
    return VisionConfig(**values, select_layer=select_layer, select_feature=select_feature,
                        image_mean=CLIP_MEAN, image_std=CLIP_STD)


def clip_vision_state(state: dict) -> dict:
    """A CLIP checkpoint's vision tensors, unprefixed: CLIPModel (and CLIPVisionModel saved by
    transformers 4.x) keep them under ``vision_model.``; transformers 5 saves CLIPVisionModel without it."""
    return select(state, "vision_model.") or state


def is_clip_folder(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.is_file() and read_json(cfg).get("model_type") in ("clip", "clip_vision_model")


def resolve_vision_tower(name: str, checkpoint: Path) -> tuple[dict[str, Any], Path | None]:
    """``mm_vision_tower`` → (CLIP config dict, local folder or None). A local folder may be relative
    to the checkpoint or absolute; known hub names map to built-in configs."""
    for candidate in (checkpoint / name, Path(name).expanduser()):
        if (candidate / "config.json").is_file():
            return read_json(candidate / "config.json"), candidate
    if name in KNOWN_VISION_TOWERS:
        return dict(KNOWN_VISION_TOWERS[name]), None
    raise CheckpointError(
        f"vision tower {name!r} is neither a local folder with a CLIP config.json nor a known model "
        f"({', '.join(KNOWN_VISION_TOWERS)}); nothing is downloaded"
    )


def is_hf_llama(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    data = read_json(cfg)
    return data.get("model_type") == "llama" and "mm_projector_type" not in data and "mm_vision_tower" not in data


def is_llava_family(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.is_file() and "mm_vision_tower" in read_json(cfg)


def load_hf_llama(folder: Path) -> LoadedModel:
    """A text-only ``LlamaForCausalLM`` folder."""
    cfg = read_json(folder / "config.json")
    model = MultimodalLM.empty(MLLMConfig(text=text_config_from_hf(cfg)))
    load_into(model.language_model, read_weights(folder), f"LLM checkpoint {folder}")
    tokenizer = Tokenizer.from_folder(folder)
    return LoadedModel(model, tokenizer, "tokenizer" if tokenizer.chat_template else "vicuna_v1")


def load_llava_family(folder: Path) -> LoadedModel:
    """LLaVA-1.5 (original layout) and MobileVLM V1/V2 checkpoints."""
    cfg = read_json(folder / "config.json")
    projector_type = cfg.get("mm_projector_type", "linear")
    if projector_type not in PROJECTOR_NAMES:
        supported = ", ".join(PROJECTOR_NAMES)
        raise CheckpointError(f"unsupported mm_projector_type {projector_type!r} (supported: {supported})")
    vision_cfg, vision_folder = resolve_vision_tower(cfg["mm_vision_tower"], folder)
    vision = vision_config_from_hf(
        vision_cfg, cfg.get("mm_vision_select_layer", -2), cfg.get("mm_vision_select_feature", "patch")
    )
    if cfg.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise CheckpointError(f"mm_hidden_size {cfg['mm_hidden_size']} != vision tower width {vision.hidden_size}")
    config = MLLMConfig(
        text=text_config_from_hf(cfg),
        vision=vision,
        projector=ProjectorConfig(type=PROJECTOR_NAMES[projector_type]),
        image_aspect_ratio="pad" if cfg.get("image_aspect_ratio") == "pad" else "crop",
    )
    model = MultimodalLM.empty(config)
    state = read_weights(folder)
    source = f"checkpoint {folder}"
    llm_state = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector.", "model.vision_tower."))}
    load_into(model.language_model, llm_state, source)
    load_into(model.mm_projector, select(state, "model.mm_projector."), source)
    # V2 stores the (frozen) CLIP inside the checkpoint; V1 and LLaVA load it from mm_vision_tower.
    tower = select(state, "model.vision_tower.vision_tower.vision_model.")
    if not tower:
        if vision_folder is None or not has_weights(vision_folder):
            raise CheckpointError(
                f"no vision tower weights: {folder} has no model.vision_tower.* tensors and "
                f"{cfg['mm_vision_tower']!r} is not a local folder with weights"
            )
        tower = clip_vision_state(read_weights(vision_folder))
        source = f"vision tower {vision_folder}"
    load_into(model.vision_tower, tower, source)
    return LoadedModel(model, Tokenizer.from_folder(folder), "vicuna_v1")


def load_clip_vision(folder: Path, select_layer: int = -2, select_feature: str = "patch"):
    """A CLIP folder (CLIPModel or CLIPVisionModel) → our vision tower with its weights."""
    from edge_mllm.model.vision import CLIPVisionTower

    tower = CLIPVisionTower(vision_config_from_hf(read_json(folder / "config.json"), select_layer, select_feature))
    load_into(tower, clip_vision_state(read_weights(folder)), f"CLIP checkpoint {folder}")
    return tower
