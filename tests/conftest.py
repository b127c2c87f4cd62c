"""Shared fixtures: tiny checkpoints in the real Hugging Face / MobileVLM / LLaVA layouts.

Everything is created with transformers (``save_pretrained``) or by writing the tensor names the
original projects use, into pytest's tmp folders: no download, seconds per build.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

IMAGE_SIZE = 56  # 56 / 14 → a 4x4 patch grid (even, as LDP/LDPv2 need)
PATCH_SIZE = 14
CLIP_HIDDEN = 32
CLIP_LAYERS = 3
LLM_HIDDEN = 64
LLM_VOCAB = 320
LLM_CONTEXT = 256

# Text the tiny BPE is trained on: includes the Vicuna system prompt so chat prompts stay short.
TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: describe the image. ASSISTANT: a cat sitting on a red mat.",
    "The quick brown fox jumps over the lazy dog.",
    "What is in this picture? There is a dog, a tree and a blue sky.",
    "Describe the scene in detail, please.",
]


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


_quiet_transformers()


def pytest_configure(config):
    # Our MobileVLM/LLaVA configs carry 4.x's "rope_scaling": null, as the released ones do.
    config.addinivalue_line("filterwarnings", "ignore:`rope_scaling` is deprecated:FutureWarning")


# ----------------------------------------------------------------------------------------------
# builders


def build_tokenizer():
    """A byte-level BPE (vocab ~300) with <unk>=0, <s>=1, </s>=2 that prepends <s>, as a
    transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) <= LLM_VOCAB
    return tok


def build_clip(folder: Path, *, image_size: int = IMAGE_SIZE, num_layers: int = CLIP_LAYERS, seed: int = 0):
    """A random ``CLIPVisionModel`` saved with ``save_pretrained`` → the HF model (eval mode)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=PATCH_SIZE,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
    )
    model = CLIPVisionModel(config).eval()
    _randomize_norms(model, seed)
    model.save_pretrained(str(folder))
    return model


def build_llama(folder: Path, tokenizer=None, *, seed: int = 0, save: bool = True, **overrides):
    """A random GQA ``LlamaForCausalLM`` saved with ``save_pretrained`` (+ tokenizer) → the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=LLM_VOCAB,
        hidden_size=LLM_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=LLM_CONTEXT,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    # Default init is N(0, 0.02): logits would be nearly flat. Wider weights give a peaked, decisive
    # distribution, so greedy decoding is not decided by rounding noise.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.15 if "embed" not in name else 1.0)
    _randomize_norms(model, seed)
    if save:
        model.save_pretrained(str(folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
    return model


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights/biases default to 1/0: make them random so a swapped or missing one shows."""
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter (norm weights around 1, biases around 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(0.3 * noise)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def _legacy_llama_config(hf_llm) -> dict:
    """The LLM config as a transformers-4.x-era config.json (how MobileVLM/LLaVA checkpoints ship):
    ``rope_theta`` at the top level, no ``rope_parameters``."""
    cfg = hf_llm.config.to_dict()
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    cfg.pop("transformers_version", None)
    return cfg


@dataclass
class MLLMCheckpoint:
    """A multimodal checkpoint folder plus the reference pieces it was built from."""

    path: Path
    kind: str  # "mobilevlm_v1", "mobilevlm_v2", "llava"
    hf_llm: object  # transformers LlamaForCausalLM with the same LLM weights
    hf_clip: object  # transformers CLIPVisionModel with the same vision weights
    projector_state: dict[str, torch.Tensor]  # projector tensors, without the model.mm_projector. prefix
    config: dict = field(default_factory=dict)

    @property
    def grid(self) -> int:
        return IMAGE_SIZE // PATCH_SIZE


def build_mllm(
    folder: Path,
    tokenizer,
    kind: str,
    *,
    vision_tower: str = "relative",
    seed: int = 0,
    config_overrides: dict | None = None,
) -> MLLMCheckpoint:
    """MobileVLM V1 (``ldpnet``), MobileVLM V2 (``ldpnetv2``, CLIP inside the checkpoint) or LLaVA-1.5
    (``mlp2x_gelu``) in their original layout.

    ``vision_tower``: "relative" (``mm_vision_tower`` = "clip", inside the checkpoint folder) or
    "absolute" (a sibling folder named by its absolute path).
    """
    from safetensors.torch import save_file

    from edge_mllm.model.connectors import LDPProjector, LDPv2Projector, MLP2xGeluProjector

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip_dir = folder / "clip" if vision_tower == "relative" else folder.parent / f"{folder.name}-clip"
    hf_clip = build_clip(clip_dir, seed=seed + 1)
    hf_llm = build_llama(folder, seed=seed + 2, save=False)

    if kind == "mobilevlm_v1":
        projector, projector_type, model_type = LDPProjector(CLIP_HIDDEN, LLM_HIDDEN), "ldpnet", "mobilevlm"
    elif kind == "mobilevlm_v2":
        projector, projector_type, model_type = LDPv2Projector(CLIP_HIDDEN, LLM_HIDDEN), "ldpnetv2", "mobilevlm"
    elif kind == "llava":
        projector, projector_type, model_type = MLP2xGeluProjector(CLIP_HIDDEN, LLM_HIDDEN), "mlp2x_gelu", "llava_llama"
    else:
        raise ValueError(kind)
    _randomize(projector, seed + 3)
    projector_state = {k: v.detach().clone().contiguous() for k, v in projector.state_dict().items()}

    state = {k: v.detach().clone().contiguous() for k, v in hf_llm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v for k, v in projector_state.items()})
    if kind == "mobilevlm_v2":
        # V2 ships the frozen CLIP inside the checkpoint; mm_vision_tower holds only its config.
        clip_state = hf_clip.state_dict()
        state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v.clone().contiguous()
                      for k, v in clip_state.items()})
        for weights in clip_dir.glob("*.safetensors"):
            weights.unlink()

    config = _legacy_llama_config(hf_llm)
    config.update(
        model_type=model_type,
        architectures=["MobileLlamaForCausalLM" if model_type == "mobilevlm" else "LlavaLlamaForCausalLM"],
        mm_projector_type=projector_type,
        mm_vision_tower="clip" if vision_tower == "relative" else str(clip_dir.resolve()),
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_hidden_size=CLIP_HIDDEN,
        image_aspect_ratio="pad",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        use_mm_proj=True,
    )
    if model_type == "mobilevlm":
        config["vision_tower_type"] = "clip"
    config.update(config_overrides or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))
    return MLLMCheckpoint(folder, kind, hf_llm, hf_clip, projector_state, config)


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def chatml_tokenizer(tokenizer):
    """The tiny tokenizer with SmolLM2's ChatML turn markers and template."""
    hf = copy.deepcopy(tokenizer)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.chat_template = CHATML
    return hf


@pytest.fixture
def hf_builders(tokenizer):
    """Builders for custom checkpoints: ``hf_builders.llama(folder, **config)`` etc."""
    return SimpleNamespace(
        clip=build_clip,
        llama=lambda folder, **kw: build_llama(folder, tokenizer, **kw),
        mllm=lambda folder, kind, **kw: build_mllm(folder, tokenizer, kind, **kw),
        tokenizer=tokenizer,
        pixels=pixel_batch,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        clip_layers=CLIP_LAYERS,
        context=LLM_CONTEXT,
    )


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """(folder, HF CLIPVisionModel) of a tiny CLIP vision tower. Read-only: copy before changing."""
    folder = tmp_path_factory.mktemp("clip") / "clip"
    return folder, build_clip(folder)


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory, tokenizer):
    """(folder, HF LlamaForCausalLM) of a tiny GQA Llama + tokenizer. Read-only: copy before changing."""
    folder = tmp_path_factory.mktemp("llama") / "llama"
    return folder, build_llama(folder, tokenizer)


@pytest.fixture(scope="session")
def mobilevlm_v1(tmp_path_factory, tokenizer) -> MLLMCheckpoint:
    return build_mllm(tmp_path_factory.mktemp("v1") / "mobilevlm-v1", tokenizer, "mobilevlm_v1")


@pytest.fixture(scope="session")
def mobilevlm_v2(tmp_path_factory, tokenizer) -> MLLMCheckpoint:
    return build_mllm(tmp_path_factory.mktemp("v2") / "mobilevlm-v2", tokenizer, "mobilevlm_v2")


@pytest.fixture(scope="session")
def llava(tmp_path_factory, tokenizer) -> MLLMCheckpoint:
    return build_mllm(tmp_path_factory.mktemp("llava") / "llava", tokenizer, "llava", vision_tower="absolute")


@pytest.fixture
def copy_folder(tmp_path):
    """Copy a (session, read-only) checkpoint folder into this test's tmp_path."""

    def copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture
def test_image():
    """A non-square RGB image with structure (so padding/resizing matter)."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(40, 70, 3), dtype=np.uint8))


def pixel_batch(batch: int = 2, image_size: int = IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=gen)


def with_middle_block(loaded):
    """A copy of ``loaded`` (an edge-mllm LoadedModel) whose LLM has a third block, a copy of its last,
    between its two: a ``-mixed`` scheme then keeps a 4-bit block between its 8-bit first and last."""
    loaded = copy.deepcopy(loaded)
    lm = loaded.model.language_model
    lm.model.layers.insert(1, copy.deepcopy(lm.model.layers[1]))
    text = dataclasses.replace(loaded.model.config.text, num_hidden_layers=len(lm.model.layers))
    loaded.model.config = dataclasses.replace(loaded.model.config, text=text)
    lm.config = text
    return loaded
