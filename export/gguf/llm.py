"""Language model → llama.cpp GGUF (architecture ``llama``), and llama.cpp's own quantizer.

``write_llama_gguf`` writes what ``convert_hf_to_gguf.py`` would write for the same Hugging Face
Llama: the ``llama.*`` hyperparameters, a GPT-2-style BPE vocabulary rebuilt from our tokenizer, and
the weights under llama.cpp's tensor names with the Q/K rows permuted for GGML's rope. Only the
language model is written; a vision tower and projector belong in a separate mmproj file.

``llamacpp_quantize`` calls ``llama_model_quantize`` from llama-cpp-python for the types gguf-py
cannot produce in numpy (the K-quants, IQ types).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
    quant_shape_from_byte_shape,
)
from gguf.quants import quantize

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.checkpoint.gguf import TENSOR_NAMES
from edge_mllm.errors import CheckpointError, ConfigError, QuantError
from edge_mllm.model.llama import LlamaForCausalLM
from edge_mllm.tokenizer import Tokenizer
from edge_mllm.train.lora import LoRALinear

logger = logging.getLogger(__name__)

# float_type → (GGML type of the matrices, general.file_type). All of these gguf-py packs in numpy.
FLOAT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (GGMLQuantizationType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
# Hugging Face parameter pattern → llama.cpp tensor pattern (``{}`` is the block index).
HF_TO_GGUF = {hf: name for name, hf in TENSOR_NAMES.items()}
# Attention biases (Llama configs with attention_bias=True): llama.cpp's llama graph reads them if present.
HF_TO_GGUF.update(
    {
        f"model.layers.{{}}.self_attn.{proj}.bias": f"blk.{{}}.attn_{name}.bias"
        for proj, name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "output"))
    }
)
GPT2_PRE = "gpt-2"  # llama.cpp spells it with a hyphen; "gpt2" is the tokenizer *model* name
DIGITS_PRE = "smollm"  # llama.cpp's name for "each digit alone, then the GPT-2 regex" (SmolLM, StarCoder)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's ``permute``: HF rotate-half rope rows → GGML's interleaved pairs.

    Only rows move, so it applies unchanged to packed quantized rows ``[rows, bytes_per_row]``.
    Inverse of :func:`edge_mllm.checkpoint.gguf.unpermute_qk`.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_name: str) -> str:
    """The llama.cpp name of a Hugging Face Llama parameter (``model.layers.3.mlp.up_proj.weight`` →
    ``blk.3.ffn_up.weight``)."""
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers.") and len(parts) > 3:
        block = parts[2]
        pattern = ".".join([*parts[:2], "{}", *parts[3:]])
        if pattern in HF_TO_GGUF:
            return HF_TO_GGUF[pattern].format(block)
    elif hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    raise ConfigError(f"parameter {hf_name!r} has no llama.cpp tensor name")


def _llm_tensors(lm: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """HF-named fp32 CPU tensors to write, in module order; LoRA updates folded into their linears."""
    lora = {name for name, module in lm.named_modules() if isinstance(module, LoRALinear)}
    state: dict[str, torch.Tensor] = {}
    for name, module in lm.named_modules():
        if name in lora:  # written merged; the model itself is left untouched
            state[f"{name}.weight"] = module.base.weight + module.delta().to(module.base.weight.dtype)
            if module.base.bias is not None:
                state[f"{name}.bias"] = module.base.bias
        elif name.rpartition(".")[0] not in lora:  # a LoRA's wrapped linear was merged just above
            state.update(module.named_parameters(prefix=name, recurse=False))
    if lm.config.tie_word_embeddings:
        del state["lm_head.weight"]  # llama.cpp reuses token_embd when output.weight is absent
    return {k: v.detach().float().cpu() for k, v in state.items()}


def _pre_tokenizer_parts(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer")
    if pre is None:
        return []
    return list(pre["pretokenizers"]) if pre["type"] == "Sequence" else [pre]


def _detect_pre_tokenizer(spec: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the two split rules we can recognise from tokenizer.json.

    convert_hf_to_gguf identifies pre-tokenizers by hashing the tokenization of a test string against
    a table of known models; here the structure is matched instead, so it also works for tokenizers
    that were themselves rebuilt from GGUF metadata.
    """
    parts = _pre_tokenizer_parts(spec)
    if spec.get("normalizer") is None and parts:
        last = parts[-1]
        gpt2_regex = last["type"] == "ByteLevel" and last.get("use_regex", True) and not last.get("add_prefix_space")
        if gpt2_regex and len(parts) == 1:
            return GPT2_PRE
        if gpt2_regex and len(parts) == 2 and parts[0] == {"type": "Digits", "individual_digits": True}:
            return DIGITS_PRE
    raise ConfigError(
        "cannot tell which llama.cpp pre-tokenizer matches this tokenizer's normalizer/pre-tokenizer; "
        "pass pre_tokenizer= (llama.cpp's tokenizer.ggml.pre name, e.g. 'gpt-2', 'smollm', 'llama-bpe')"
    )


def _add_tokenizer(
    writer: GGUFWriter, tokenizer: Tokenizer, vocab_size: int, pre_tokenizer: str | None, chat_template: str | None
) -> None:
    """``tokenizer.ggml.*`` for a byte-level BPE, laid out as convert_hf_to_gguf's ``get_vocab_base``."""
    hf = tokenizer.hf
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export needs a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE" or not any(p["type"] == "ByteLevel" for p in _pre_tokenizer_parts(spec)):
        raise ConfigError(
            f"GGUF export supports byte-level BPE tokenizers (llama.cpp 'gpt2'); this one is a "
            f"{spec['model']['type']} model without a ByteLevel pre-tokenizer"
        )
    vocab = hf.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = hf.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer or _detect_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (
        ("bos", hf.bos_token_id), ("eos", hf.eos_token_id), ("unknown", hf.unk_token_id), ("padding", hf.pad_token_id)
    ):
        if token_id is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", token_id)
    # Read off the tokenizer's behaviour (its post-processor), which is what llama.cpp must reproduce.
    with_special, plain = hf("a").input_ids, hf("a", add_special_tokens=False).input_ids
    writer.add_add_bos_token(len(with_special) > len(plain) and with_special[0] == hf.bos_token_id)
    writer.add_add_eos_token(len(with_special) > len(plain) and with_special[-1] == hf.eos_token_id)
    if chat_template is None and isinstance(tokenizer.chat_template, str):
        chat_template = tokenizer.chat_template
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _add_hparams(writer: GGUFWriter, lm: LlamaForCausalLM) -> None:
    c = lm.config
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim != c.hidden_size // c.num_attention_heads:  # llama.cpp assumes n_embd / n_head otherwise
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_vocab_size(c.vocab_size)


def _encode(name: str, data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """Pack one fp32 tensor: 1-D tensors (norms, biases) stay F32, as llama.cpp expects; a matrix
    whose rows are not whole quantization blocks falls back to F16, as convert_hf_to_gguf does."""
    if data.ndim == 1:
        return data, GGMLQuantizationType.F32
    block = GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        logger.warning("%s: %d columns are not a multiple of %s's block of %d; writing F16",
                       name, data.shape[-1], qtype.name, block)
        qtype = GGMLQuantizationType.F16
    return quantize(data, qtype), qtype


def _check_raw(name: str, data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> None:
    if data.dtype != np.uint8 or data.ndim != 2:
        raise QuantError(f"raw tensor {name}: expected uint8 [rows, bytes_per_row] block data, got {data.dtype} "
                         f"{list(data.shape)}")
    try:
        unpacked = tuple(quant_shape_from_byte_shape(data.shape, qtype))
    except ValueError as exc:
        raise QuantError(f"raw tensor {name}: {exc}") from exc
    if unpacked != shape:
        raise QuantError(f"raw tensor {name}: {qtype.name} data of {list(data.shape)} bytes holds {list(unpacked)}, "
                         f"the parameter is {list(shape)}")


@contextmanager
def _temp_sibling(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path`` that replaces it on success (same filesystem, so the rename is
    atomic); removed on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_llama_gguf(
    loaded: LoadedModel,
    path: Path,
    *,
    float_type: str = "f16",
    raw_tensors: Mapping[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
    pre_tokenizer: str | None = None,
    name: str = "edge-mllm",
    chat_template: str | None = None,
    progress: bool = False,
) -> Path:
    """Write the language model of ``loaded`` as a llama.cpp GGUF (architecture ``llama``).

    Args:
        loaded: the model and its tokenizer; the tokenizer must be a byte-level BPE (llama.cpp "gpt2").
        path: output file, written atomically (a temporary sibling renamed into place).
        float_type: type of the weight matrices, one of ``FLOAT_TYPES`` (norms and biases stay F32).
        raw_tensors: Hugging Face parameter name → (uint8 ``[rows, bytes_per_row]`` data in GGML block
            layout, its type), written as given instead of ``float_type`` (e.g. our own 4-bit quantizers'
            output). Q/K rows are permuted like the float weights.
        pre_tokenizer: llama.cpp's ``tokenizer.ggml.pre`` name. None recognises plain GPT-2 byte-level
            BPE ("gpt-2") and digit-splitting BPE such as SmolLM2's ("smollm") from the tokenizer's
            structure; anything else must be named, as nothing in a tokenizer (least of all one rebuilt
            from a GGUF) says which of llama.cpp's pre-tokenizer regexes it corresponds to.
        name: ``general.name``.
        chat_template: Jinja ``tokenizer.chat_template``; None writes the tokenizer's own (if any).
        progress: show a progress bar while the tensors are written.

    Returns:
        ``path``. The same inputs always give a byte-identical file.
    """
    if float_type not in FLOAT_TYPES:
        raise QuantError(f"unsupported float_type {float_type!r}; choose one of {', '.join(FLOAT_TYPES)}")
    qtype, file_type = FLOAT_TYPES[float_type]
    lm = loaded.model.language_model
    if not isinstance(lm, LlamaForCausalLM):
        raise ConfigError(f"GGUF export supports Llama language models, not {type(lm).__name__}")
    c = lm.config
    tensors = _llm_tensors(lm)
    raw = dict(raw_tensors or {})
    unknown = sorted(raw.keys() - tensors.keys())
    if unknown:
        raise QuantError(f"raw tensors {unknown} are not parameters written to the GGUF (tied lm_head? typo?)")

    path = Path(path)
    with _temp_sibling(path) as tmp:
        writer = GGUFWriter(tmp, "llama")
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        _add_hparams(writer, lm)
        _add_tokenizer(writer, loaded.tokenizer, c.vocab_size, pre_tokenizer, chat_template)
        for hf_name, tensor in tensors.items():
            gguf_name = gguf_tensor_name(hf_name)
            if hf_name in raw:
                data, tensor_type = raw[hf_name]
                data = np.asarray(data)
                _check_raw(hf_name, data, tensor_type, tuple(tensor.shape))
            else:
                data, tensor_type = _encode(gguf_name, tensor.numpy(), qtype)
            if ".attn_q." in gguf_name:
                data = permute_qk(data, c.num_attention_heads)
            elif ".attn_k." in gguf_name:
                data = permute_qk(data, c.num_key_value_heads)
            writer.add_tensor(gguf_name, np.ascontiguousarray(data), raw_dtype=tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    return path


def llamacpp_ftypes() -> dict[str, int]:
    """llama.cpp's quantization types by lower-case name (``"q4_k_m"`` → ``LLAMA_FTYPE_MOSTLY_Q4_K_M``)."""
    import llama_cpp  # loads the compiled library: only when quantizing

    out = {}
    for attr in dir(llama_cpp):
        for prefix in ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"):
            if attr.startswith(prefix):
                out[attr[len(prefix) :].lower()] = getattr(llama_cpp, attr)
    return out


GGML_LOG_WARN, GGML_LOG_ERROR, GGML_LOG_CONT = 3, 4, 5  # ggml.h's ggml_log_level (DEBUG=1, INFO=2)


@contextmanager
def _llama_log(warnings: list[str], errors: list[str]) -> Iterator[None]:
    """Collect llama.cpp's warning and error lines instead of printing its log to stderr."""
    import llama_cpp
    import llama_cpp._logger  # the callback llama-cpp-python installs at import; restored afterwards

    chunks: dict[int, list[str]] = {GGML_LOG_WARN: [], GGML_LOG_ERROR: []}
    last = [0]

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        last[0] = last[0] if level == GGML_LOG_CONT else level
        if last[0] in chunks:  # messages arrive in pieces: join, then split into lines
            chunks[last[0]].append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
        warnings += "".join(chunks[GGML_LOG_WARN]).splitlines()
        errors += "".join(chunks[GGML_LOG_ERROR]).splitlines()


def llamacpp_quantize(src: Path, dst: Path, ftype: str, *, nthread: int = 2) -> Path:
    """Quantize a GGUF with llama.cpp's own ``llama_model_quantize`` (any of ``llamacpp_ftypes()``,
    e.g. ``"q4_k_m"``, ``"q4_0"``, ``"q8_0"``, ``"q5_k_m"``).

    llama.cpp picks per-tensor types itself: the ``_m``/``_s`` mixes keep some tensors at higher
    precision (``output.weight`` is q6_K even for "q4_0"), and a matrix whose rows are not whole blocks
    of the target type (256 values for K-quants, 32 for the others) silently gets a fallback type
    (q4_K → q5_0, q5_K → q5_1, q6_K → q8_0, q2_K → q4_0, IQ types → iq4_nl; F16 when even 32 does not
    divide the row), so small models need 256·k-wide matrices for real K-quants. The low-bit IQ types
    need an importance matrix, which this does not pass: llama.cpp refuses them. ``dst`` is written
    atomically; llama.cpp's warnings (fallbacks included) are logged, and its error message is raised
    as a :class:`QuantError`.
    """
    import llama_cpp

    types = llamacpp_ftypes()
    key = ftype.lower()
    if key not in types:
        raise QuantError(f"unknown llama.cpp quantization type {ftype!r}; choose one of {', '.join(sorted(types))}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CheckpointError(f"GGUF not found: {src}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[key]
    params.nthread = nthread
    warnings: list[str] = []
    errors: list[str] = []
    with _temp_sibling(dst) as tmp:
        with _llama_log(warnings, errors):
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        for line in warnings:  # e.g. K-quant fallbacks: the file is not entirely of the type asked for
            logger.warning("llama.cpp: %s", line.strip())
        if rc != 0:
            detail = " / ".join(line.strip() for line in errors if line.strip(" =")) or f"return code {rc}"
            raise QuantError(f"llama.cpp could not quantize {src} to {ftype}: {detail}")
    return dst
