"""What ``edge-mllm bench`` runs: an exported bundle (in its own runtime) or a model folder (PyTorch
eager), resolved before any slow work so a bad path fails first."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge_mllm.errors import CheckpointError
from edge_mllm.runtime.bundle import MANIFEST, read_manifest

DEFAULT = "default"  # the embedded default model, by name
EAGER = "pytorch"
# The runtime each export format runs in (edge_mllm.sim.backends.FORMAT_BACKENDS names the same ones).
RUNTIMES = {"gguf": "llama.cpp", "onnx": "onnxruntime", "executorch": "executorch"}


@dataclass(frozen=True)
class Subject:
    """One benchmarked thing. ``path`` None: the embedded default model."""

    name: str
    path: Path | None
    format: str  # a manifest format (gguf, onnx, executorch[-delegate]) or "pytorch"
    quantization: str | None
    manifest: dict | None  # bundles only
    size_bytes: int | None  # artifact bytes (the manifest's files; a model folder's files)

    @property
    def is_bundle(self) -> bool:
        return self.manifest is not None

    @property
    def runtime(self) -> str:
        """The runtime that executes it (``llama.cpp`` marks the anchor rows)."""
        return EAGER if not self.is_bundle else RUNTIMES.get(self.format.split("-")[0], self.format)

    @property
    def has_vision(self) -> bool:
        if self.manifest is not None:
            return bool(self.manifest.get("image_preprocessing"))
        return True  # checked again once the model is loaded

    @property
    def load_path(self) -> str | None:
        return None if self.path is None else str(self.path)


def bundle_size(manifest: dict) -> int:
    """Artifact bytes of a bundle: the sizes its manifest lists (tokenizer included)."""
    return sum(int(f["size"]) for f in manifest.get("files", ()))


def resolve(arg: str) -> Subject:
    """A command-line argument → a subject. Raises CheckpointError (one line) for a path that is
    neither a bundle nor a model."""
    if arg == DEFAULT:
        return Subject(DEFAULT, None, EAGER, None, None, None)
    path = Path(arg).expanduser()
    if not path.exists():
        raise CheckpointError(f"{arg}: no such bundle or model")
    path = path.resolve()  # the report's paths must not depend on the directory it was run from
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        if "format" not in manifest or "files" not in manifest:
            raise CheckpointError(f"{path / MANIFEST} is not an edge-mllm bundle manifest (no format / files)")
        return Subject(path.name, path, manifest["format"], manifest.get("quantization"), manifest,
                       bundle_size(manifest))
    from edge_mllm.checkpoint import detect_layout

    try:
        detect_layout(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{arg} is not an exported bundle (no {MANIFEST}) nor a model: {exc}") from None
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    quant = None
    report = path / "quant_report.json" if path.is_dir() else None
    if report is not None and report.is_file():
        quant = json.loads(report.read_text()).get("scheme")
    return Subject(path.name, path, EAGER, quant, None, size)


def resolve_all(args: list[str]) -> list[Subject]:
    """Every argument resolved; repeated names get a ``#2``… suffix so rows stay distinct."""
    subjects, seen = [], {}
    for arg in args:
        s = resolve(arg)
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s = Subject(f"{s.name}#{seen[s.name]}", s.path, s.format, s.quantization, s.manifest, s.size_bytes)
        subjects.append(s)
    return subjects
