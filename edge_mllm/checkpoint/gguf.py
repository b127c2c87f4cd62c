"""GGUF LLMs (llama architecture): read with gguf-py, dequantize into the PyTorch model, undo
llama.cpp's Q/K row permutation, and rebuild the tokenizer and chat template from the metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RawTokenizer
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.checkpoint.weights import load_into
from edge_mllm.config import MLLMConfig, TextConfig
from edge_mllm.errors import CheckpointError
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
# llama.cpp tensor names → Hugging Face Llama names (``{}`` is the block index).
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
# Splits llama.cpp runs before its GPT-2 regex, by tokenizer.ggml.pre (src/llama-vocab.cpp).
BPE_PRE_TOKENIZERS = {
    "default": [],
    "gpt2": [],
    "gpt-2": [],  # llama.cpp's name for plain GPT-2 byte-level BPE
    "smollm": [pre_tokenizers.Digits(individual_digits=True)],
    "starcoder": [pre_tokenizers.Digits(individual_digits=True)],
}


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def find_gguf(path: Path) -> Path | None:
    """``path`` itself, or the single non-mmproj ``.gguf`` in a folder."""
    if path.is_file():
        return path if is_gguf(path) else None
    if path.is_dir():
        files = [p for p in sorted(path.glob("*.gguf")) if not p.name.startswith("mmproj")]
        if len(files) == 1 and is_gguf(files[0]):
            return files[0]
    return None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert convert_hf_to_gguf's ``permute`` (rotate-half → interleaved rope rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _text_config(reader: GGUFReader) -> TextConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"unsupported GGUF architecture {arch!r}: only 'llama' language models load")
    n_head = _field(reader, "llama.attention.head_count")
    n_embd = _field(reader, "llama.embedding_length")
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    try:
        return TextConfig(
            vocab_size=_field(reader, "llama.vocab_size", n_vocab),
            hidden_size=n_embd,
            intermediate_size=_field(reader, "llama.feed_forward_length"),
            num_hidden_layers=_field(reader, "llama.block_count"),
            num_attention_heads=n_head,
            num_key_value_heads=_field(reader, "llama.attention.head_count_kv", n_head),
            head_dim=_field(reader, "llama.rope.dimension_count", n_embd // n_head),
            max_position_embeddings=_field(reader, "llama.context_length"),
            rms_norm_eps=_field(reader, "llama.attention.layer_norm_rms_epsilon"),
            rope_theta=_field(reader, "llama.rope.freq_base", 10000.0),
            tie_word_embeddings="output.weight" not in names,
        )
    except TypeError as exc:
        raise CheckpointError(f"GGUF is missing llama metadata: {exc}") from exc


def _tokenizer(reader: GGUFReader) -> Tokenizer:
    """Rebuild a Hugging Face fast tokenizer from ``tokenizer.ggml.*``.

    Written here because transformers' GGUF converter drops llama.cpp's per-model pre-tokenizer
    (SmolLM2's digit splitting); BPE vocabularies are rebuilt with ``tokenizers`` directly.
    """
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported (BPE 'gpt2' vocabularies are)")
    if pre not in BPE_PRE_TOKENIZERS:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported ({', '.join(BPE_PRE_TOKENIZERS)})")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    raw = RawTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    # ByteLevel with use_regex applies the GPT-2 split regex llama.cpp also uses.
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [*BPE_PRE_TOKENIZERS[pre], pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    raw.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole, before BPE.
    typed = list(zip(tokens, types, strict=True))
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == 3])
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == 4])

    def token(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[idx]

    bos = token("bos")
    if bos is not None and _field(reader, "tokenizer.ggml.add_bos_token", False):
        bos_id = tokens.index(bos)
        raw.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
    return Tokenizer(hf)


def read_reader(path: Path) -> GGUFReader:
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError/IndexError/struct.error on damaged files
        raise CheckpointError(f"cannot read GGUF {path} (corrupt or truncated?): {exc}") from exc


def load_gguf(path: Path, progress: bool = True) -> LoadedModel:
    """A llama-architecture GGUF → fp32 PyTorch model, tokenizer and its chat template."""
    reader = read_reader(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise CheckpointError(f"GGUF {path} has no tokenizer (tokenizer.ggml.tokens)")
    config = _text_config(reader)
    state: dict[str, torch.Tensor] = {}
    bar = tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=None if progress else True, leave=False)
    for tensor in bar:
        parts = tensor.name.split(".")
        block = parts[1] if parts[0] == "blk" else None
        pattern = tensor.name.replace(f"blk.{block}.", "blk.{}.") if block is not None else tensor.name
        if pattern not in TENSOR_NAMES:
            continue  # e.g. rope_freqs: not used by plain llama rope
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise CheckpointError(f"cannot dequantize {tensor.name} ({tensor.tensor_type.name}): {exc}") from exc
        weight = torch.from_numpy(np.array(values, dtype=np.float32))  # copy: GGUF data is a read-only memmap
        if pattern == "blk.{}.attn_q.weight":
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif pattern == "blk.{}.attn_k.weight":
            weight = unpermute_qk(weight, config.num_key_value_heads)
        state[TENSOR_NAMES[pattern].format(block)] = weight
    model = MultimodalLM.empty(MLLMConfig(text=config))
    load_into(model.language_model, state, f"GGUF {path}")
    tokenizer = _tokenizer(reader)
    return LoadedModel(model, tokenizer, "tokenizer" if tokenizer.chat_template else "vicuna_v1")

