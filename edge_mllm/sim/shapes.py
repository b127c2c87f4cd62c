"""Model shapes for the simulator: weight counts, FLOPs and cache sizes, from an edge-mllm config, a
bundle's ``manifest.json`` or a Hugging Face ``config.json``.

Counts are of matmul weights (what dominates bytes and FLOPs); norms, biases and position tables are
left out. A FLOP is a multiply or an add (a multiply-accumulate is 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_mllm.config import MLLMConfig, VisionConfig
from edge_mllm.errors import ConfigError


@dataclass(frozen=True)
class VisionShape:
    """A ViT plus its projector, for one image."""

    params: int  # matmul weights of the layers that run, patch embedding and projector
    flops: float
    tokens: int  # sequence length through the ViT
    width: int
    ffn: int
    heads: int
    image_tokens: int  # what the projector hands the LLM


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only LLM (optionally with a vision encoder), as the roofline model sees it."""

    name: str
    hidden: int
    ffn: int
    heads: int
    vocab: int
    tied_embeddings: bool
    block_params: tuple[int, ...]  # matmul weights per decoder block
    kv_values_per_token: int  # K and V values cached per position, all layers
    attention_flops_per_pair: int  # one query attending one cached position, all layers
    max_context: int
    recurrent_state_values: int = 0  # fixed state of linear-attention layers (hybrid models)
    recurrent_flops_per_token: int = 0
    vision: VisionShape | None = None

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def llm_flops_per_token(self) -> float:
        """Blocks only: the LM head runs once per step (prefill keeps the last position's logits)."""
        return 2 * sum(self.block_params) + self.recurrent_flops_per_token


def vision_shape(vision: VisionConfig, projector: str, text_hidden: int, num_queries: int = 64) -> VisionShape:
    """FLOPs and weights of a CLIP ViT (the layers up to the selected one) and its projector."""
    d, f, p = vision.hidden_size, vision.intermediate_size, vision.patch_size
    patches, tokens = vision.num_patches, vision.num_patches + 1  # the CLS token is always in the sequence
    layers = vision.num_layers_computed
    patch_params = 3 * p * p * d
    layer_params = 4 * d * d + 2 * d * f
    flops = 2 * patches * patch_params + layers * (2 * tokens * layer_params + 4 * tokens * tokens * d)
    feats, t = vision.num_feature_tokens, text_hidden
    mlp = d * t + t * t
    if projector == "mlp2x_gelu":
        proj_params, proj_flops, out = mlp, 2 * feats * mlp, feats
    elif projector == "ldp":
        # MLP per token, then two MobileNetV3 blocks (depthwise 3x3 + SE + pointwise): stride 1 on the
        # full grid, stride 2 down to a quarter of the positions.
        out = feats // 4
        block = 9 * t + 2 * t * (t // 4) + t * t
        proj_params = mlp + 2 * block
        proj_flops = 2 * feats * mlp + 2 * (feats * (9 * t + t * t) + out * (9 * t + t * t))
    elif projector == "ldpv2":
        # MLP per token, 2x2 average pool, depthwise PEG on the pooled grid.
        out = feats // 4
        proj_params, proj_flops = mlp + 9 * t, 2 * feats * mlp + 2 * out * 9 * t
    elif projector == "query":
        out = num_queries
        proj_params = d * t + 6 * t * t
        proj_flops = 2 * feats * d * t + 4 * feats * t * t + 6 * out * t * t + 4 * out * feats * t
    else:
        raise ConfigError(f"unknown projector type {projector!r}")
    return VisionShape(params=patch_params + layers * layer_params + proj_params, flops=float(flops + proj_flops),
                       tokens=tokens, width=d, ffn=f, heads=vision.num_attention_heads, image_tokens=out)


def shape_from_config(config: MLLMConfig, name: str, max_context: int | None = None) -> ModelShape:
    """The shape of an edge-mllm model (LLaMA-family decoder, optional CLIP tower + projector)."""
    text = config.text
    q_dim, kv_dim = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    block = text.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * text.hidden_size * text.intermediate_size
    vision = None
    if config.vision is not None:
        projector = config.projector
        vision = vision_shape(config.vision, projector.type, text.hidden_size, projector.num_queries)
    return ModelShape(
        name=name, hidden=text.hidden_size, ffn=text.intermediate_size, heads=text.num_attention_heads,
        vocab=text.vocab_size, tied_embeddings=text.tie_word_embeddings,
        block_params=(block,) * text.num_hidden_layers,
        kv_values_per_token=2 * text.num_hidden_layers * kv_dim,
        attention_flops_per_pair=4 * text.num_hidden_layers * q_dim,
        max_context=max_context or text.max_position_embeddings, vision=vision,
    )


def shape_from_manifest(manifest: dict[str, Any], name: str) -> ModelShape:
    """The shape of an exported bundle, from its ``manifest.json`` (``model`` is the edge-mllm config;
    ``max_seq_len`` the KV-cache positions the runtime allocates)."""
    try:
        config = MLLMConfig.from_dict(manifest["model"])
    except KeyError as exc:
        raise ConfigError(f"{name}: manifest.json has no {exc} entry") from exc
    return shape_from_config(config, name, manifest.get("max_seq_len"))


def _hybrid_shape(cfg: dict[str, Any], name: str) -> ModelShape:
    """Qwen3.5 / Qwen3-Next text models: Gated DeltaNet (linear attention, fixed state) layers and
    gated full-attention layers (``layer_types``), each followed by a SwiGLU FFN."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    kinds = cfg["layer_types"]
    full = sum(kind == "full_attention" for kind in kinds)
    linear = len(kinds) - full
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    conv = cfg.get("linear_conv_kernel_dim", 4)
    gate = 2 if cfg.get("attn_output_gate", True) else 1  # the output gate doubles q_proj
    full_block = h * heads * head_dim * gate + 2 * h * kv_heads * head_dim + heads * head_dim * h + 3 * h * f
    # in_proj_qkvz (q, k, v, output gate z), in_proj_ba (per-head decay and write strength), out_proj
    linear_block = h * (2 * nk * dk + 2 * nv * dv) + 2 * h * nv + nv * dv * h + 3 * h * f
    blocks = tuple(full_block if kind == "full_attention" else linear_block for kind in kinds)
    return ModelShape(
        name=name, hidden=h, ffn=f, heads=heads, vocab=cfg["vocab_size"],
        tied_embeddings=cfg.get("tie_word_embeddings", False), block_params=blocks,
        kv_values_per_token=2 * full * kv_heads * head_dim,
        attention_flops_per_pair=4 * full * heads * head_dim,
        max_context=cfg.get("max_position_embeddings", 4096),
        # per head a dk x dv state (decay, delta-rule update, readout: ~6 FLOPs per entry and token)
        # plus the causal conv's last (kernel - 1) inputs
        recurrent_state_values=linear * (nv * dk * dv + (conv - 1) * (2 * nk * dk + nv * dv)),
        recurrent_flops_per_token=linear * 6 * nv * dk * dv,
    )


def shape_from_hf_config(cfg: dict[str, Any], name: str, folder: Path | None = None) -> ModelShape:
    """A Hugging Face config: LLaMA-family LLMs, LLaVA-1.5 / MobileVLM (``mm_*`` keys, the vision
    tower resolved like the checkpoint loader does, never downloaded), HF ``LlavaForConditionalGeneration``
    (``text_config`` / ``vision_config``), and Qwen3.5-style hybrid text models (``layer_types``)."""
    text = cfg.get("text_config", cfg)
    if "layer_types" in text and "linear_num_value_heads" in text:
        return _hybrid_shape(text, name)
    # The checkpoint readers bring torch along: import them only for configs that need them.
    from edge_mllm.checkpoint.hf import (
        KNOWN_VISION_TOWERS,
        PROJECTOR_NAMES,
        resolve_vision_tower,
        text_config_from_hf,
        vision_config_from_hf,
    )
    from edge_mllm.config import ProjectorConfig

    vision = projector = None
    if "mm_vision_tower" in cfg:
        vision_cfg, _ = resolve_vision_tower(cfg["mm_vision_tower"], folder or Path("."))
        vision = vision_config_from_hf(vision_cfg, cfg.get("mm_vision_select_layer", -2),
                                       cfg.get("mm_vision_select_feature", "patch"))
        kind = cfg.get("mm_projector_type", "mlp2x_gelu")
        if kind not in PROJECTOR_NAMES:
            raise ConfigError(f"unsupported mm_projector_type {kind!r} (supported: {', '.join(PROJECTOR_NAMES)})")
        projector = ProjectorConfig(type=PROJECTOR_NAMES[kind])
    elif "vision_config" in cfg or cfg.get("model_type") == "llava":
        # transformers' LlavaConfig builds CLIP ViT-L/14-336 when the config leaves vision_config out
        vision_cfg = cfg.get("vision_config") or KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14-336"]
        layer = cfg.get("vision_feature_layer", -2)
        vision = vision_config_from_hf(vision_cfg, layer if isinstance(layer, int) else layer[-1])
        projector = ProjectorConfig(type="mlp2x_gelu")
    return shape_from_config(MLLMConfig(text=text_config_from_hf(text), vision=vision, projector=projector), name)


def load_config(path: str | Path) -> tuple[ModelShape, str | None]:
    """A Hugging Face ``config.json``, or an edge-mllm checkpoint's (or a folder holding either) → its
    shape, and the scheme of the codes an edge-mllm checkpoint carries (None: floats, or a HF config)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no config file at {file}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not a JSON config: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file} is not a JSON config (not an object)")
    from edge_mllm.checkpoint.native import FORMAT_KEY  # brings torch, as the HF configs' readers do

    name = file.parent.name or file.name
    try:
        if FORMAT_KEY in cfg:
            scheme = (cfg.get("quantization") or {}).get("scheme")
            return shape_from_config(MLLMConfig.from_dict(cfg["model"]), name), scheme
        return shape_from_hf_config(cfg, name, file.parent), None
    except KeyError as exc:
        raise ConfigError(f"{file} lacks the key {exc}") from exc
