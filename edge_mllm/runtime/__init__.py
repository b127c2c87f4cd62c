"""One ``generate()`` over every runtime: a model folder runs in PyTorch eager (``Pipeline``); an
exported bundle runs in its own runtime — ExecuTorch (``executorch.runtime``), ONNX Runtime, or
llama.cpp (llama-cpp-python) — with the bundle's tokenizer, chat template and image preprocessing.

    runtime = edge_mllm.runtime.load("bundles/onnx-q4")   # or a model folder, or None: the default
    runtime.generate("What colour is the circle?", ["scene.png"], max_new_tokens=16).text
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edge_mllm.errors import CheckpointError
from edge_mllm.export import FORMATS
from edge_mllm.runtime.bundle import MANIFEST, BundleRuntime, read_manifest

__all__ = ["BundleRuntime", "is_bundle", "load"]


def is_bundle(path: str | Path | None) -> bool:
    """Whether ``path`` is an exported bundle (a folder with ``manifest.json``)."""
    return path is not None and (Path(path) / MANIFEST).is_file()


def load(path: str | Path | None = None, *, threads: int | None = None):
    """A model folder / file (``None``: the embedded default) → ``Pipeline``; a bundle → its format's
    :class:`BundleRuntime`. Both answer ``generate(prompt, images, max_new_tokens=…)``.

    ``threads``: CPU threads for the runtime (default: the runtime's own choice)."""
    if not is_bundle(path):
        import torch

        from edge_mllm.checkpoint import load_model
        from edge_mllm.pipeline import Pipeline

        if threads:
            torch.set_num_threads(threads)
        return Pipeline(load_model(path))
    manifest = read_manifest(path)
    package = FORMATS.get(manifest.get("format"))
    if package is None:
        raise CheckpointError(f"{path}: unknown bundle format {manifest.get('format')!r}; "
                              f"this edge-mllm reads {', '.join(FORMATS)}")
    runtime = importlib.import_module(f"edge_mllm.export.{package}.runtime").RUNTIME
    return runtime(path, manifest, **({"threads": threads} if threads else {}))
