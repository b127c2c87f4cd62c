"""Calibration and held-out data for quantization, built offline from what is installed.

Text: docstrings of Python standard-library modules (plain technical English, always present, no
download), split by module into a calibration set and a disjoint held-out set. Multimodal: the
model's own domain, conversations about synthetic scenes (``edge-mllm data synth``) or any
LLaVA-format folder, turned into the inputs_embeds the LLM sees (image tokens included).
"""

from __future__ import annotations

import importlib
import inspect
import tempfile
from pathlib import Path

import torch

from edge_mllm.chat import ChatTemplate
from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.data.llava import load_conversations
from edge_mllm.data.synth import CONVERSATIONS_FILE, write_split
from edge_mllm.pipeline import Pipeline
from edge_mllm.train.examples import tokenize_conversation

TEXT_MODULES = {
    "calib": ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading", "unittest"),
    "heldout": ("asyncio", "csv", "datetime", "decimal", "fractions", "functools", "itertools", "statistics",
                "textwrap", "zipfile"),
}


def text_documents(split: str) -> list[str]:
    """Docstrings (≥ 200 characters) of the split's standard-library modules and their members."""
    docs = []
    for module_name in TEXT_MODULES[split]:
        module = importlib.import_module(module_name)
        objects = [module] + [obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj) or callable(obj)]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= 200 and doc not in docs:
                docs.append(doc)
    return docs


def text_sequences(loaded: LoadedModel, split: str, count: int, seq_len: int) -> list[torch.Tensor]:
    """``count`` token-id chunks [1, seq_len] of the split's documents (each starting at a document)."""
    tokenizer = loaded.tokenizer
    chunks: list[torch.Tensor] = []
    stream: list[int] = []
    for doc in text_documents(split):
        stream += tokenizer.encode(doc + "\n\n", add_special_tokens=False)
        while len(stream) >= seq_len and len(chunks) < count:
            chunks.append(torch.tensor([stream[:seq_len]]))
            stream = stream[seq_len:]
    if len(chunks) < count:
        raise ValueError(f"only {len(chunks)} text chunks of {seq_len} tokens in the {split} split")
    return chunks


@torch.no_grad()
def conversation_embeds(loaded: LoadedModel, data: Path, count: int) -> list[torch.Tensor]:
    """inputs_embeds [1, T, D] of the first ``count`` conversations in a LLaVA-format folder."""
    conversations = load_conversations(data / CONVERSATIONS_FILE, data)[:count]
    pipeline = Pipeline(loaded)
    template = ChatTemplate(loaded.chat_template)
    embeds = []
    for conv in conversations:
        example = tokenize_conversation(conv, loaded.tokenizer, template)
        images = pipeline.encode_images([conv.image]) if conv.image is not None else None
        embeds.append(loaded.model.embed_prompt(example.input_ids, images))
    return embeds


@torch.no_grad()
def calibration_set(
    loaded: LoadedModel, data: str | Path | None = None, text_count: int = 16, image_count: int = 16,
    seq_len: int = 256,
) -> list[torch.Tensor]:
    """Calibration inputs_embeds: ``text_count`` text chunks plus, for a model that sees,
    ``image_count`` scene conversations (from ``data``, or a synthetic val split made on the fly)."""
    embed = loaded.model.language_model.embed
    context = loaded.model.config.text.max_position_embeddings
    out = [embed(ids) for ids in text_sequences(loaded, "calib", text_count, min(seq_len, context))]
    if loaded.model.config.has_vision and image_count:
        if data is None:
            with tempfile.TemporaryDirectory() as tmp:
                folder = write_split(Path(tmp) / "calib", "val", seed=0, n=image_count)
                out += conversation_embeds(loaded, folder, image_count)
        else:
            out += conversation_embeds(loaded, Path(data), image_count)
    return [x[:, :context] for x in out]
