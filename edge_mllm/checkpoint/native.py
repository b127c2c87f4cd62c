"""edge-mllm's own checkpoint folder: ``config.json`` + ``model.safetensors`` + tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from edge_mllm import __version__
from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.checkpoint.weights import load_into, read_json, read_weights
from edge_mllm.config import MLLMConfig
from edge_mllm.fsutil import atomic_output_dir
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.quant.storage import QuantizedWeights
from edge_mllm.tokenizer import Tokenizer

FORMAT_KEY = "edge_mllm_format"
FORMAT_VERSION = 1


def is_native(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.is_file() and FORMAT_KEY in read_json(cfg)


def save_native(loaded: LoadedModel, folder: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``loaded`` to ``folder`` atomically (an earlier checkpoint there is replaced only on
    success; any other non-empty folder is refused).

    A quantized model's weights are stored as their codes (see ``edge_mllm.quant.storage``).
    ``extra_files``: file name → text written alongside (a report, say), inside the same atomic write."""
    model = loaded.model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.text.tie_word_embeddings:
        state.pop("language_model.lm_head.weight")  # shares the embedding's storage
    config = {
        FORMAT_KEY: FORMAT_VERSION,
        "edge_mllm_version": __version__,
        "chat_template": loaded.chat_template,
        "model": model.config.to_dict(),
    }
    if loaded.quantization is not None:
        for name in loaded.quantization.tensors:
            del state[name]
        state.update(loaded.quantization.state())
        config["quantization"] = loaded.quantization.layout()
    with atomic_output_dir(folder, is_native) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        loaded.tokenizer.save(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


def load_native(folder: Path) -> LoadedModel:
    cfg = read_json(folder / "config.json")
    model = MultimodalLM.empty(MLLMConfig.from_dict(cfg["model"]))
    state = read_weights(folder)
    quantization = None
    if "quantization" in cfg:
        quantization = QuantizedWeights.from_state(cfg["quantization"], state, f"checkpoint {folder}")
        state.update(quantization.dequantized_state())
    load_into(model, state, f"checkpoint {folder}")
    return LoadedModel(model, Tokenizer.from_folder(folder), cfg.get("chat_template", "tokenizer"), quantization)
