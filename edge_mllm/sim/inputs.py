"""Bundles as simulator inputs: a bundle's manifest gives its model, quantization and format."""

from __future__ import annotations

import json
from pathlib import Path

from edge_mllm.errors import ConfigError
from edge_mllm.export import MANIFEST
from edge_mllm.sim.backends import Backend, backend_for_format, get_backend
from edge_mllm.sim.formats import WeightPlan, bundle_weight_plan
from edge_mllm.sim.shapes import ModelShape, shape_from_manifest


class BackendMismatch(ConfigError):
    """The backend asked for does not run this bundle's format."""


def from_bundle(path: str | Path, backend: str | None = None) -> tuple[ModelShape, WeightPlan, Backend]:
    """A bundle folder (``edge-mllm export``): its model config, quantization and format."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise ConfigError(f"{path} is not a bundle: no {MANIFEST} (export one with `edge-mllm export`)")
    try:
        manifest = json.loads(file.read_text())
        fmt = manifest["format"]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
    except KeyError as exc:
        raise ConfigError(f"{file} has no {exc} entry") from exc
    runtime = get_backend(backend) if backend else backend_for_format(fmt)
    family = fmt.split("-")[0]  # executorch-coreml is an ExecuTorch program with Core ML delegates
    if runtime.family != family:
        raise BackendMismatch(f"{runtime.name} runs {runtime.family} bundles, not this {fmt} bundle")
    shape = shape_from_manifest(manifest, path.resolve().name)
    return shape, bundle_weight_plan(manifest, runtime.family, shape.tied_embeddings), runtime

