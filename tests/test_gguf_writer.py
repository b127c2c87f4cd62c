"""GGUF export: our writer's files run in llama.cpp (llama-cpp-python, unmodified) with the logits and
tokenization of our PyTorch model, read back through our own reader, and go through llama.cpp's
quantizer."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from edge_mllm.export.gguf.llm import llamacpp_quantize, permute_qk, write_llama_gguf
from gguf import GGMLQuantizationType, GGUFReader

from edge_mllm.checkpoint import load_model
from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.checkpoint.gguf import load_gguf
from edge_mllm.errors import ConfigError, QuantError
from edge_mllm.tokenizer import Tokenizer
from edge_mllm.train.lora import LoRALinear, apply_lora

llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\n\ntabs\tand digits 12345 ",
    "Ünïcödé — emoji 🤖 don't we'll",
    "USER: describe the image.</s>ASSISTANT:",
]
PROMPT = "A chat between a curious user and an artificial intelligence assistant. USER: what is 42?"
Q8 = GGMLQuantizationType.Q8_0


def run_llamacpp(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [T, V] for ``ids`` (F32 KV cache, so only the weights' precision differs)."""
    llm = llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def run_torch(loaded: LoadedModel, ids: list[int]) -> np.ndarray:
    lm = loaded.model.language_model
    with torch.no_grad():
        return lm(lm.embed(torch.tensor([ids])))[0].numpy()


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def field(path, key: str):
    return GGUFReader(str(path)).fields[key].contents()


@pytest.fixture(scope="module")
def tiny(llama_folder) -> LoadedModel:
    return load_model(llama_folder[0])


@pytest.fixture(scope="module")
def tiny_f32(tiny, tmp_path_factory):
    return write_llama_gguf(tiny, tmp_path_factory.mktemp("gguf-out") / "tiny-f32.gguf", float_type="f32")


@pytest.fixture
def variant(hf_builders, tmp_path) -> LoadedModel:
    """Tied embeddings, attention biases, MHA, head_dim ≠ hidden/heads, and an FFN width (80) that is
    not a multiple of 32: the paths the default tiny Llama does not take."""
    folder = tmp_path / "variant"
    hf_builders.llama(folder, tie_word_embeddings=True, attention_bias=True, num_key_value_heads=4,
                      head_dim=8, intermediate_size=80, seed=3)
    loaded = load_model(folder)
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in loaded.model.language_model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return loaded


# ----------------------------------------------------------------------------------------------
# llama.cpp runs what we write


def test_f32_logits_match_pytorch_in_llamacpp(tiny, tiny_f32):
    ids = tiny.tokenizer.encode(PROMPT)
    assert relative_error(run_llamacpp(tiny_f32, ids), run_torch(tiny, ids)) < 1e-4
    assert field(tiny_f32, "tokenizer.ggml.pre") == "gpt-2"
    assert "output.weight" in tensor_types(tiny_f32)  # untied lm_head


@pytest.mark.parametrize("text", TEXTS)
def test_llamacpp_tokenizes_like_our_tokenizer(tiny, tiny_f32, text):
    llm = llama_cpp.Llama(model_path=str(tiny_f32), vocab_only=True, verbose=False)
    try:
        theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert theirs == tiny.tokenizer.encode(text)
        assert llm.detokenize(theirs[1:], special=True).decode() == text
    finally:
        llm.close()


def test_tied_biased_mha_variant_runs_in_llamacpp(variant, tmp_path):
    path = write_llama_gguf(variant, tmp_path / "variant.gguf", float_type="f32")
    types = tensor_types(path)
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "blk.0.attn_output.bias"} <= set(types)
    assert field(path, "llama.attention.key_length") == 8
    ids = variant.tokenizer.encode(PROMPT)
    assert relative_error(run_llamacpp(path, ids), run_torch(variant, ids)) < 1e-4


@pytest.mark.parametrize(("float_type", "matrix_type", "tolerance"), [("f16", "F16", 2e-3), ("q8_0", "Q8_0", 3e-2)])
def test_f16_and_q8_0_run_close_in_llamacpp(variant, tmp_path, float_type, matrix_type, tolerance):
    path = write_llama_gguf(variant, tmp_path / f"{float_type}.gguf", float_type=float_type)
    types = tensor_types(path)
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == matrix_type
    assert types["blk.0.attn_norm.weight"] == types["blk.0.attn_q.bias"] == "F32"
    # ffn_down has 80 columns: not whole Q8_0 blocks of 32, so F16 (as convert_hf_to_gguf does).
    assert types["blk.0.ffn_down.weight"] == "F16"
    assert field(path, "general.file_type") == {"f16": 1, "q8_0": 7}[float_type]
    ids = variant.tokenizer.encode(PROMPT)
    assert relative_error(run_llamacpp(path, ids), run_torch(variant, ids)) < tolerance


def test_lora_is_written_merged(llama_folder, tmp_path):
    loaded = load_model(llama_folder[0])
    lm = loaded.model.language_model
    apply_lora(lm, rank=2, alpha=4.0)
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0.0, 0.3)
    path = write_llama_gguf(loaded, tmp_path / "lora.gguf", float_type="f32")
    assert isinstance(lm.model.layers[0].self_attn.q_proj, LoRALinear)  # the model is left as it was
    ids = loaded.tokenizer.encode(PROMPT)
    expected = run_torch(loaded, ids)
    assert relative_error(run_llamacpp(path, ids), expected) < 1e-4
    assert relative_error(run_llamacpp(path, ids), run_torch(load_model(llama_folder[0]), ids)) > 1e-2


# ----------------------------------------------------------------------------------------------
# our reader reads it back


def test_round_trip_through_our_reader(llama_folder, tmp_path):
    loaded = load_model(llama_folder[0])
    loaded.tokenizer.hf.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    path = write_llama_gguf(loaded, tmp_path / "rt.gguf", float_type="f32")
    back = load_gguf(path, progress=False)
    ours, theirs = loaded.model.language_model.state_dict(), back.model.language_model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name  # bit-exact, Q/K permutation undone
    a, b = loaded.model.config.text, back.model.config.text
    assert b.rms_norm_eps == pytest.approx(a.rms_norm_eps)  # stored as f32
    assert {**vars(b), "rms_norm_eps": 0} == {**vars(a), "rms_norm_eps": 0}
    assert back.tokenizer.chat_template == loaded.tokenizer.chat_template
    for text in TEXTS:
        assert back.tokenizer.encode(text) == loaded.tokenizer.encode(text)


def test_same_inputs_give_identical_bytes_and_no_leftovers(tiny, tmp_path):
    a = write_llama_gguf(tiny, tmp_path / "a.gguf", float_type="q8_0")
    b = write_llama_gguf(tiny, tmp_path / "b.gguf", float_type="q8_0")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]


# ----------------------------------------------------------------------------------------------
# pre-packed tensors


def test_raw_tensors_are_written_as_given(tiny, tmp_path):
    state = tiny.model.language_model.state_dict()
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
    raw = {name: (gguf.quants.quantize(state[name].numpy(), Q8), Q8) for name in names}
    path = write_llama_gguf(tiny, tmp_path / "raw.gguf", float_type="f32", raw_tensors=raw)

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    q, down = tensors["blk.0.attn_q.weight"], tensors["blk.1.ffn_down.weight"]
    assert q.tensor_type == down.tensor_type == Q8
    assert tensors["blk.0.attn_k.weight"].tensor_type == GGMLQuantizationType.F32
    assert np.array_equal(down.data, raw[names[1]][0])
    # Q/K: the packed rows move like float rows would.
    n_head = tiny.model.config.text.num_attention_heads
    assert np.array_equal(q.data, permute_qk(raw[names[0]][0], n_head))
    back = load_gguf(path, progress=False).model.language_model.state_dict()
    assert torch.equal(back[names[0]], torch.from_numpy(gguf.quants.dequantize(raw[names[0]][0], Q8)))

    ids = tiny.tokenizer.encode(PROMPT)
    assert relative_error(run_llamacpp(path, ids), run_torch(tiny, ids)) < 3e-2


def test_bad_raw_tensor_fails_and_leaves_the_old_file(tiny, tmp_path):
    path = write_llama_gguf(tiny, tmp_path / "m.gguf", float_type="f32")
    before = path.read_bytes()
    wrong = gguf.quants.quantize(np.zeros((32, 64), np.float32), Q8)  # q_proj is 64 × 64
    with pytest.raises(QuantError, match="holds"):
        write_llama_gguf(tiny, path, raw_tensors={"model.layers.0.self_attn.q_proj.weight": (wrong, Q8)})
    with pytest.raises(QuantError, match="not parameters"):
        write_llama_gguf(tiny, path, raw_tensors={"model.layers.9.mlp.up_proj.weight": (wrong, Q8)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ----------------------------------------------------------------------------------------------
# what we refuse


def test_unsupported_float_type(tiny, tmp_path):
    with pytest.raises(QuantError, match="float_type"):
        write_llama_gguf(tiny, tmp_path / "x.gguf", float_type="q4_k")
    assert not (tmp_path / "x.gguf").exists()


def test_non_bpe_tokenizer_is_refused(tiny, tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    words = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>"))
    with pytest.raises(ConfigError, match="byte-level BPE"):
        write_llama_gguf(LoadedModel(tiny.model, words, "vicuna_v1"), tmp_path / "x.gguf")


def test_unknown_pre_tokenizer_must_be_named(llama_folder, tmp_path):
    from tokenizers import pre_tokenizers

    loaded = load_model(llama_folder[0])
    loaded.tokenizer.hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(ConfigError, match="pre_tokenizer="):
        write_llama_gguf(loaded, tmp_path / "x.gguf")
    path = write_llama_gguf(loaded, tmp_path / "x.gguf", pre_tokenizer="llama-bpe")
    assert field(path, "tokenizer.ggml.pre") == "llama-bpe"


def test_non_llama_language_model_is_refused(tiny, tmp_path):
    model = SimpleNamespace(language_model=torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="Llama"):
        write_llama_gguf(LoadedModel(model, tiny.tokenizer, "vicuna_v1"), tmp_path / "x.gguf")


# ----------------------------------------------------------------------------------------------
# llama.cpp's quantizer


def assert_runs_its_own_weights(path, original: LoadedModel, ids: list[int]) -> None:
    """llama.cpp on a quantized file ≈ our PyTorch model on that file's dequantized weights, far closer
    than to the unquantized model. Not equal: llama.cpp also rounds activations to 8 bits for quantized
    dot products, and these random models amplify small differences."""
    got = run_llamacpp(path, ids)
    own = relative_error(got, run_torch(load_gguf(path, progress=False), ids))
    assert own < 6e-2
    assert own < relative_error(got, run_torch(original, ids)) / 4


def test_llamacpp_quantize_q4_0(tiny, tmp_path):
    src = write_llama_gguf(tiny, tmp_path / "f32.gguf", float_type="f32")
    path = llamacpp_quantize(src, tmp_path / "q4_0.gguf", "q4_0")
    types = tensor_types(path)
    assert {types[f"blk.{i}.{t}.weight"] for i in (0, 1) for t in ("attn_q", "attn_k", "ffn_up")} == {"Q4_0"}
    assert types["output_norm.weight"] == "F32"
    assert field(path, "general.file_type") == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    assert_runs_its_own_weights(path, tiny, tiny.tokenizer.encode(PROMPT))


def test_llamacpp_quantize_q4_k_m(hf_builders, tmp_path):
    # K-quants pack rows in 256-value super-blocks: every matrix needs 256·k columns.
    hf_builders.llama(tmp_path / "wide", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    loaded = load_model(tmp_path / "wide")
    src = write_llama_gguf(loaded, tmp_path / "wide-f16.gguf", float_type="f16")
    path = llamacpp_quantize(src, tmp_path / "q4_k_m.gguf", "Q4_K_M")
    types = tensor_types(path)
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == "Q4_K"
    assert set(types.values()) <= {"Q4_K", "Q6_K", "F32"}  # Q4_K_M keeps some tensors at Q6_K; no fallbacks
    assert field(path, "general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert_runs_its_own_weights(path, loaded, loaded.tokenizer.encode(PROMPT))
    with pytest.raises(QuantError, match="requires an importance matrix"):  # llama.cpp's own message
        llamacpp_quantize(src, tmp_path / "iq2.gguf", "iq2_xxs")
    assert not (tmp_path / "iq2.gguf").exists()


def test_llamacpp_k_quant_falls_back_on_narrow_rows(tiny_f32, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="edge_mllm.export.gguf.llm"):
        path = llamacpp_quantize(tiny_f32, tmp_path / "q4_k_m.gguf", "q4_k_m")
    types = tensor_types(path)
    assert "Q4_K" not in types.values()  # 64 columns: llama.cpp writes q5_0 / q8_0 instead
    assert types["blk.0.attn_q.weight"] == "Q5_0"
    assert any("falling back" in r.getMessage() for r in caplog.records)


def test_llamacpp_quantize_errors(tiny_f32, tmp_path):
    with pytest.raises(QuantError, match="unknown llama.cpp quantization type 'q4_x'"):
        llamacpp_quantize(tiny_f32, tmp_path / "out.gguf", "q4_x")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(QuantError, match="failed to load model"):  # llama.cpp's own message
        llamacpp_quantize(garbage, tmp_path / "out.gguf", "q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.gguf"]


# ----------------------------------------------------------------------------------------------
# the embedded default model


@pytest.mark.slow
@pytest.mark.llamacpp
def test_default_smollm2_f16_runs_in_llamacpp(tmp_path):
    from edge_mllm.chat import ChatTemplate, user_message
    from edge_mllm.default import load_default, smollm2_gguf_path

    loaded = load_default(progress=False)
    path = write_llama_gguf(loaded, tmp_path / "smollm2-f16.gguf", float_type="f16")
    assert field(path, "tokenizer.ggml.pre") == "smollm"  # recognised from the digit-splitting pre-tokenizer
    assert field(path, "tokenizer.chat_template") == field(smollm2_gguf_path(), "tokenizer.chat_template")

    mine = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    original = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), vocab_only=True, verbose=False)
    try:
        for text in [*TEXTS, "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n"]:
            expected = original.tokenize(text.encode(), add_bos=True, special=True)
            assert mine.tokenize(text.encode(), add_bos=True, special=True) == expected, text
            assert loaded.tokenizer.encode(text) == expected, text
    finally:
        mine.close()
        original.close()

    text = ChatTemplate("tokenizer").render([user_message("What is the capital of France?", 0)], loaded.tokenizer)
    ids = loaded.tokenizer.encode(text)
    got, expected = run_llamacpp(path, ids), run_torch(loaded, ids)
    assert relative_error(got, expected) < 1e-2  # f16 weights (2.6e-3 measured)
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("scheme", ["gptq-w4-g32", "awq-w4-g32-asym", "rtn-w8-g32"])
def test_our_quantized_codes_run_in_llamacpp_as_in_pytorch(tiny, scheme, tmp_path):
    """GPTQ / AWQ codes go into GGUF as Q4_0 / Q4_1 / Q8_0 blocks unchanged: llama.cpp computes what our
    dequantized PyTorch model computes (not what re-quantizing the floats would give)."""
    import copy

    from edge_mllm.export.gguf.blocks import llm_raw_tensors
    from edge_mllm.quant.quantize import quantize_model
    from edge_mllm.quant.scheme import QuantScheme

    quantized = copy.deepcopy(tiny)
    embed = quantized.model.language_model.embed
    calibration = [embed(torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(s))) for s in range(4)]
    result = quantize_model(quantized.model, QuantScheme.parse(scheme), calibration, progress=False)
    raw = llm_raw_tensors(result.tensors)
    path = write_llama_gguf(quantized, tmp_path / "q.gguf", float_type="f32", raw_tensors=raw)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    expected_type = {"gptq-w4-g32": "Q4_0", "awq-w4-g32-asym": "Q4_1", "rtn-w8-g32": "Q8_0"}[scheme]
    assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == expected_type

    # the weights llama.cpp reads are our dequantized weights (Q4_1 stores −d·zero_point as fp16)
    back = load_gguf(path, progress=False).model.language_model.state_dict()
    for name, param in quantized.model.language_model.state_dict().items():
        atol = 0 if expected_type != "Q4_1" else 1e-2 * float(param.abs().max())
        torch.testing.assert_close(back[name], param, rtol=0, atol=atol)
    # and it runs them: llama.cpp quantizes activations to 8 bits for its dot products, hence the tolerance
    ids = quantized.tokenizer.encode(PROMPT)
    got = run_llamacpp(path, ids)
    assert relative_error(got, run_torch(quantized, ids)) < 0.04
    if expected_type != "Q8_0":  # closer to the quantized model than to the float one
        assert relative_error(got, run_torch(quantized, ids)) < relative_error(got, run_torch(tiny, ids))
