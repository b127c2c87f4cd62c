"""Safe weight I/O shared by every checkpoint layout: safetensors (single or sharded) and
``torch.load(weights_only=True)`` for legacy ``.bin`` files. Never unpickles arbitrary objects."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from edge_mllm.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"missing {path.name} in {path.parent}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors or ``.bin`` file, loaded safely."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except FileNotFoundError as exc:
        raise CheckpointError(f"missing weight file {path}") from exc
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        # UnpicklingError: not a torch file, or a pickle weights_only refuses (arbitrary objects).
        raise CheckpointError(f"cannot read weights from {path} (corrupt or truncated?): {exc}") from exc


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for other formats)."""
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read metadata of {path} (corrupt or truncated?): {exc}") from exc


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES + INDEX_FILES)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face-style folder, single file or sharded."""
    for index_name in INDEX_FILES:
        index_path = folder / index_name
        if index_path.is_file():
            shards = sorted(set(read_json(index_path).get("weight_map", {}).values()))
            if not shards:
                raise CheckpointError(f"{index_path} lists no weight shards")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_weights_file(folder / shard))
            return state
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return read_weights_file(folder / name)
    raise CheckpointError(f"no weights in {folder} (expected one of {', '.join(WEIGHT_FILES + INDEX_FILES)})")


def select(state: dict[str, torch.Tensor], prefix: str, rename: Callable[[str], str] = lambda k: k) -> dict:
    """The tensors under ``prefix``, with the prefix removed (and ``rename`` applied)."""
    return {rename(k[len(prefix) :]): v for k, v in state.items() if k.startswith(prefix)}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``module``. Every parameter must be present with the right shape (extra
    tensors, such as layers past the selected vision layer, are ignored)."""
    expected = module.state_dict()
    # A tied tensor (an LM head sharing the embedding) may be absent if its twin is present.
    present = {v.data_ptr() for k, v in expected.items() if k in state}
    missing = [k for k, v in expected.items() if k not in state and v.data_ptr() not in present]
    if missing:
        shown = ", ".join(missing[:8]) + (f" … (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise CheckpointError(f"{source} is missing {len(missing)} tensor(s): {shown}")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{source} has tensors of the wrong shape: {'; '.join(wrong[:4])}")
    module.load_state_dict({k: state[k] for k in expected if k in state}, strict=False)
