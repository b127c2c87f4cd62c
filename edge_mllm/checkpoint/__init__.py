"""Checkpoint I/O: one loader per layout, picked by looking at what is on disk.

A registry in the style of llama.cpp's converters: each entry says how to recognise its layout and
how to load it. ``load_model(None)`` is the embedded default model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.checkpoint.gguf import find_gguf, load_gguf
from edge_mllm.checkpoint.hf import is_hf_llama, is_llava_family, load_hf_llama, load_llava_family
from edge_mllm.checkpoint.native import is_native, load_native, save_native
from edge_mllm.errors import CheckpointError
from edge_mllm.export import MANIFEST


@dataclass(frozen=True)
class Layout:
    name: str
    matches: Callable[[Path], bool]
    load: Callable[[Path], LoadedModel]


def _load_gguf_folder(path: Path) -> LoadedModel:
    """A llama GGUF (or the folder holding one); a llama.cpp ``mmproj`` beside it is not a vision tower
    our model reads, which the config's notes say (``info``, and the error for an image)."""
    loaded = load_gguf(find_gguf(path))
    if path.is_dir() and any(path.glob("mmproj*.gguf")):
        loaded.model.config.notes["mmproj"] = (
            "the mmproj*.gguf beside it is not read: it runs in llama.cpp, as part of an exported GGUF bundle "
            "(a folder with its manifest.json)")
    return loaded


LAYOUTS = (
    Layout("edge-mllm", is_native, load_native),
    Layout("gguf", lambda p: find_gguf(p) is not None, _load_gguf_folder),
    Layout("llava/mobilevlm", is_llava_family, load_llava_family),
    Layout("hf-llama", is_hf_llama, load_hf_llama),
)


def detect_layout(path: Path) -> Layout:
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    if (path / MANIFEST).is_file():  # its model.gguf would load, without the vision tower in mmproj.gguf
        raise CheckpointError(f"{path} is an exported bundle, not a model: `run`, `eval` and `bench` take it; "
                              "export from the model it was made from")
    for layout in LAYOUTS:
        if layout.matches(path):
            return layout
    what = "file" if path.is_file() else "folder"
    raise CheckpointError(
        f"unrecognised model {what} {path}: expected an edge-mllm folder, a llama GGUF, a LLaVA/MobileVLM "
        "folder or a Hugging Face LlamaForCausalLM folder"
    )


def load_model(path: str | Path | None = None) -> LoadedModel:
    """Load a model from ``path`` (any supported layout), or the embedded default when None."""
    if path is None:
        from edge_mllm.default import load_default

        return load_default()
    path = Path(path).expanduser()
    return detect_layout(path).load(path)


__all__ = ["LoadedModel", "LAYOUTS", "detect_layout", "load_model", "save_native"]
