"""GGUF LLM loading: a tiny Llama written the way llama.cpp's converter writes it (gguf-py, Q/K rows
permuted) loads back to transformers' logits; damaged and foreign GGUFs fail with a clear error."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import build_llama

from edge_mllm.checkpoint import load_model
from edge_mllm.checkpoint.gguf import load_gguf
from edge_mllm.default import smollm2_gguf_path
from edge_mllm.errors import CheckpointError, EdgeMLLMError
from edge_mllm.pipeline import Pipeline


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (HF rotate-half rows → GGML interleaved rope rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, hf_model, hf_tokenizer, weight_type=gguf.GGMLQuantizationType.F32) -> None:
    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    # Tokenizer: a byte-level BPE vocabulary, padded to the embedding rows like real converters do.
    vocab = hf_tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(c.vocab_size - len(tokens))]
    special = set(hf_tokenizer.all_special_tokens)
    merges = json.loads(hf_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 5 if t.startswith("[PAD") else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(hf_tokenizer.bos_token_id)
    writer.add_eos_token_id(hf_tokenizer.eos_token_id)
    writer.add_add_bos_token(True)
    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_block = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for name, tensor in hf_model.state_dict().items():
        data = tensor.float().numpy()
        if name.startswith("model.layers."):
            block, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gguf_name = f"blk.{block}.{per_block[rest]}.weight"
            if rest == "self_attn.q_proj":
                data = permute(data, c.num_attention_heads)
            elif rest == "self_attn.k_proj":
                data = permute(data, c.num_key_value_heads)
        else:
            gguf_name = names[name]
        if data.ndim == 2 and weight_type != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, weight_type), raw_dtype=weight_type)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer):
    hf = build_llama(None, save=False, intermediate_size=128)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(path, hf, tokenizer)
    return path, hf


def test_gguf_llama_matches_transformers(tiny_gguf, tokenizer):
    path, hf = tiny_gguf
    loaded = load_model(path)
    ids = tokenizer("the cat sat on the mat").input_ids
    assert loaded.tokenizer.encode("the cat sat on the mat") == ids
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits
        got = loaded.model.language_model(loaded.model.language_model.embed(torch.tensor([ids])))
    assert (got - expected).abs().max() <= 1e-4
    text = loaded.model.config.text
    assert (text.num_attention_heads, text.num_key_value_heads, text.rope_theta) == (4, 2, 50000.0)


def test_gguf_q8_0_weights_dequantize_close(tmp_path, tokenizer):
    hf = build_llama(None, save=False)
    path = tmp_path / "q8.gguf"
    write_llama_gguf(path, hf, tokenizer, gguf.GGMLQuantizationType.Q8_0)
    ours = load_gguf(path, progress=False).model.language_model
    # Q8_0 keeps every weight within half a quantization step of the original, plus the
    # error from storing the block scale as fp16 (up to 127 steps * 2^-11 relative).
    for name, param in ours.state_dict().items():
        reference = hf.state_dict()[name]
        if reference.ndim == 2:
            step = reference.abs().reshape(reference.shape[0], -1, 32).amax(-1) / 127
            err = (param - reference).abs().reshape(reference.shape[0], -1, 32).amax(-1)
            assert (err <= step * (0.5 + 127 / 2048) + 1e-6).all(), name


def test_folder_with_one_gguf_loads(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    (tmp_path / "model.gguf").write_bytes(path.read_bytes())
    (tmp_path / "mmproj-model-f16.gguf").write_bytes(b"GGUF")  # mmproj files are not the LLM
    loaded = load_model(tmp_path)
    assert loaded.model.config.text.num_hidden_layers == 2
    # ... and a user who expects it to see is told why it does not
    assert "mmproj*.gguf beside it is not read" in loaded.model.config.notes["mmproj"]
    with pytest.raises(EdgeMLLMError, match="no vision encoder: it cannot take images .the mmproj"):
        Pipeline(loaded).encode_images([np.zeros((8, 8, 3), np.uint8)])


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(bad)


def test_truncated_real_gguf(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(cut)


def test_non_llama_gguf_is_refused(tmp_path):
    path = tmp_path / "clip.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_tensor("v.patch_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError):
        load_model(path)
