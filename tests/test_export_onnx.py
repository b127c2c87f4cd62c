"""ONNX bundles run in onnxruntime as the PyTorch model does: fp32 graphs within 1e-3 of PyTorch's
logits and the same greedy answer to an image prompt; 4-bit graphs made of MatMulNBits /
GatherBlockQuantized holding our own codes, matching the PyTorch model that carries the same codes;
genai_config.json in onnxruntime-genai's layout; byte-identical re-exports; clear errors that leave
nothing behind."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
import torch
from conftest import with_middle_block
from edge_mllm.export.bundle import export_bundle
from edge_mllm.export.onnx import graphs
from edge_mllm.export.onnx.bundle import codes_by_name
from edge_mllm.export.onnx.nbits import pack_nbits, stack_rows
from edge_mllm.export.onnx.runtime import OnnxRunner
from edge_mllm.quant.groupwise import quantize_rtn
from edge_mllm.quant.quantize import quantize_model
from edge_mllm.quant.scheme import QuantScheme

from edge_mllm.checkpoint import load_model
from edge_mllm.errors import EdgeMLLMError, QuantError
from edge_mllm.generate import GenerationConfig, generate
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX
from edge_mllm.pipeline import Pipeline

# Measured on the tiny fixtures (fp32 CPU): fp32 graphs 3e-6, 4-bit graphs at accuracy_level 1 6e-6
# (max |Δlogit|, logits of magnitude ~4); the tolerance leaves room for other CPUs' kernels.
LOGITS_ATOL = 1e-3
PROMPT_IDS = [1, 5, IMAGE_TOKEN_INDEX, 9, 40, 77, 3]


def pixels(loaded, n: int = 1, seed: int = 0) -> torch.Tensor:
    size = loaded.model.config.vision.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def torch_logits(loaded, inputs_embeds: torch.Tensor) -> np.ndarray:
    lm = loaded.model.language_model
    lm.clear_cache()
    with torch.no_grad():
        return lm(inputs_embeds).numpy()


def torch_greedy(loaded, token_ids: list[int], pixel_values: torch.Tensor | None, n: int) -> list[int]:
    """PyTorch's greedy continuation of ``n`` tokens, stop tokens ignored."""
    with torch.no_grad():
        features = None if pixel_values is None else loaded.model.encode_images(pixel_values)
        embeds = loaded.model.embed_prompt(token_ids, features)
    return generate(loaded.model.language_model, embeds, GenerationConfig(n)).token_ids


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def quantized_copy(loaded, scheme_name: str):
    """A copy of ``loaded`` quantized in place by ``scheme_name`` (random calibration sequences)."""
    loaded = copy.deepcopy(loaded)
    scheme = QuantScheme.parse(scheme_name)
    embed = loaded.model.language_model.embed
    calibration = [embed(torch.randint(3, 300, (1, 32), generator=torch.Generator().manual_seed(s))).detach()
                   for s in range(4)]
    result = quantize_model(loaded.model, scheme, calibration if scheme.needs_calibration else None, progress=False)
    loaded.quantization = result.weights()
    return loaded


def op_counts(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def prompt_logits_error(loaded, runner: OnnxRunner, ids: list[int], px: torch.Tensor) -> float:
    """Max |Δ| between the bundle's logits for the prompt (with its image) and the PyTorch model's."""
    got = runner.embed(ids, runner.encode_images(px.numpy()))
    logits, _ = runner.forward(got, runner.empty_cache())
    with torch.no_grad():
        embeds = loaded.model.embed_prompt(ids, loaded.model.encode_images(px))
    return float(np.abs(logits - torch_logits(loaded, embeds)).max())


def assert_cached_steps_match_pytorch(runner: OnnxRunner, loaded, embeds: torch.Tensor) -> None:
    """Prefill, then one cached step and a cached chunk of 3; batch 2 (rows of the same length) and
    one cached step (each row's rotary positions go on): each against the whole sequence in PyTorch."""
    full = torch.cat([embeds, torch.randn(1, 4, embeds.shape[2], generator=torch.Generator().manual_seed(1))], 1)
    reference = torch_logits(loaded, full)
    t = embeds.shape[1]
    logits, past = runner.forward(full[:, :t].numpy(), runner.empty_cache())
    step, past = runner.forward(full[:, t : t + 1].numpy(), past)
    chunk, past = runner.forward(full[:, t + 1 :].numpy(), past)
    got = np.concatenate([logits, step, chunk], axis=1)
    assert np.abs(got - reference).max() < LOGITS_ATOL
    assert past[0].shape[2] == t + 4
    batch = torch.cat([full[:, : t + 1], full[:, 1 : t + 2]])
    logits, past = runner.forward(batch[:, :t].numpy(), runner.empty_cache(2))
    step, _ = runner.forward(batch[:, t:].numpy(), past)
    got = np.concatenate([logits, step], axis=1)
    assert np.abs(got - torch_logits(loaded, batch)).max() < LOGITS_ATOL
    with pytest.raises(EdgeMLLMError, match="one token per step"):  # GQA refuses a batch's cached chunk
        runner.forward(np.concatenate([batch[:, t:].numpy()] * 2, axis=1), past)


@pytest.fixture(scope="module")
def tiny(mobilevlm_v2):
    return load_model(mobilevlm_v2.path)


@pytest.fixture(scope="module")
def float_bundle(tiny, tmp_path_factory):
    return export_bundle(copy.deepcopy(tiny), "onnx", tmp_path_factory.mktemp("onnx") / "fp32", progress=False)


@pytest.fixture(scope="module", params=["rtn-w4-g32", "gptq-w4-g32", "gptq-w4-g32-min"])
def quantized(request, tiny, tmp_path_factory):
    """(quantized model, its bundle: MatMulNBits at accuracy_level 1, the default) per 4-bit scheme."""
    loaded = quantized_copy(tiny, request.param)
    out = export_bundle(copy.deepcopy(loaded), "onnx", tmp_path_factory.mktemp("onnx") / request.param,
                        progress=False)
    return loaded, out


# ----------------------------------------------------------------------------------------------
# fp32


def test_bundle_files_manifest_and_genai_config(float_bundle, tiny):
    names = {p.name for p in float_bundle.iterdir()}
    assert {"vision.onnx", "vision.onnx.data", "embedding.onnx", "embedding.onnx.data", "decoder.onnx",
            "decoder.onnx.data", "genai_config.json", "manifest.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names  # at the root, where GenAI looks for them
    manifest = json.loads((float_bundle / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["quantization"] is None
    assert manifest["onnx"]["decoder"] == "decoder.onnx" and manifest["onnx"]["weights"] == "float32"
    listed = {f["path"]: f["size"] for f in manifest["files"]}
    assert listed["decoder.onnx.data"] == (float_bundle / "decoder.onnx.data").stat().st_size

    genai = json.loads((float_bundle / "genai_config.json").read_text())
    model, text = genai["model"], tiny.model.config.text
    assert model["type"] == "phi3v"
    assert (model["context_length"], model["vocab_size"]) == (text.max_position_embeddings, text.vocab_size)
    assert model["bos_token_id"] == 1 and model["eos_token_id"] == 2
    dec = model["decoder"]
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"]) == (
        text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.head_dim)
    assert genai["search"]["past_present_share_buffer"] is False
    # the graphs' inputs and outputs are the ones genai_config names, with symbolic batch/sequence axes
    decoder = onnx.load(str(float_bundle / "decoder.onnx"), load_external_data=False)
    inputs = [i.name for i in decoder.graph.input]
    assert inputs == ["inputs_embeds", *[dec["inputs"]["past_key_names"] % 0, dec["inputs"]["past_value_names"] % 0],
                      "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in decoder.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*decoder.graph.input, *decoder.graph.output]}
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.1.value"] == ["batch_size", 2, "total_sequence_length", 16]
    assert dims["logits"] == ["batch_size", "sequence_length", text.vocab_size]
    embedding = onnx.load(str(float_bundle / "embedding.onnx"), load_external_data=False)
    assert [i.name for i in embedding.graph.input] == [model["embedding"]["inputs"]["input_ids"],
                                                       model["embedding"]["inputs"]["image_features"]]
    vision = onnx.load(str(float_bundle / "vision.onnx"), load_external_data=False)
    assert [i.name for i in vision.graph.input] == ["pixel_values"]
    assert [o.name for o in vision.graph.output] == [model["vision"]["outputs"]["image_features"]]


def test_fp32_graphs_match_pytorch(float_bundle, tiny):
    runner = OnnxRunner(float_bundle)
    px = pixels(tiny, 2)
    with torch.no_grad():
        features = tiny.model.encode_images(px)
        embeds = tiny.model.embed_prompt(PROMPT_IDS + [IMAGE_TOKEN_INDEX, 8], features)
    got_features = runner.encode_images(px.numpy())
    np.testing.assert_allclose(got_features, features.numpy(), atol=1e-4)
    got_embeds = runner.embed(PROMPT_IDS + [IMAGE_TOKEN_INDEX, 8], got_features)
    np.testing.assert_allclose(got_embeds, embeds.numpy(), atol=1e-5)

    assert_cached_steps_match_pytorch(runner, tiny, embeds)


def genai_agreement(bundle, token_ids: list[int], expected: list[int], stop_token_ids: Sequence[int],
                    pixel_values: torch.Tensor | None = None) -> float:
    """Share of PyTorch's greedy tokens ``expected`` (up to its first stop token) that ONNX Runtime
    GenAI's own loop repeats position for position; a longer or shorter answer counts its extra
    positions as misses."""
    end = next((i + 1 for i, t in enumerate(expected) if t in stop_token_ids), len(expected))
    expected = expected[:end]
    tokens = genai_greedy(bundle, token_ids, len(expected), pixel_values)
    return sum(x == y for x, y in zip(tokens, expected, strict=False)) / max(len(tokens), len(expected))


def genai_greedy(bundle, token_ids: list[int], n: int, pixel_values: torch.Tensor | None = None) -> list[int]:
    """ONNX Runtime GenAI's own greedy continuation of up to ``n`` tokens, ending at a stop token, loading
    the bundle from its genai_config.json: the embedding and decoder graphs in genai's loop, and with
    ``pixel_values`` (normalised) its ``phi3v`` pipeline's vision graph too, fed as an app feeds it
    (genai_config.py): the ids with each image placeholder expanded to one negative id per image token,
    the pixels as vision.onnx reads them, and ``num_image_tokens``, the count genai sizes the image
    features by (without it genai skips the vision graph)."""
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    runner = OnnxRunner(bundle)
    per_image = 0 if pixel_values is None else runner.image_token_count
    ids = [t for tok in token_ids for t in ([tok] * per_image if tok == IMAGE_TOKEN_INDEX else [tok])]
    # no min_length: genai meets it by masking the stop tokens' logits, which changes the answer
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    if pixel_values is None:
        generator.append_tokens(np.array([ids], dtype=np.int32))
    else:
        inputs = og.NamedTensors()
        inputs["input_ids"] = np.array([ids], dtype=np.int32)
        inputs["pixel_values"] = np.ascontiguousarray(runner.vision_pixels(pixel_values).numpy(), dtype=np.float32)
        inputs["num_image_tokens"] = np.array([per_image] * pixel_values.shape[0], dtype=np.int64)
        generator.set_inputs(inputs)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


TEXT_IDS = [1, 5, 9, 40, 77, 3]


def test_onnxruntime_genai_runs_the_fp32_bundle_as_pytorch(float_bundle, tiny):
    import onnxruntime_genai as og

    stops = tiny.tokenizer.stop_token_ids()
    assert genai_agreement(float_bundle, TEXT_IDS, torch_greedy(tiny, TEXT_IDS, None, 16), stops) == 1
    # with two images: GenAI runs vision.onnx, and the embedding places each image's rows
    px = pixels(tiny, 2)
    ids = PROMPT_IDS + [IMAGE_TOKEN_INDEX, 8]
    assert genai_agreement(float_bundle, ids, torch_greedy(tiny, ids, px, 16), stops, px) == 1
    # GenAI's tokenizer reads the bundle's tokenizer files and splits text as ours does (without the
    # BOS ours prepends)
    tokenizer, text = og.Tokenizer(og.Model(str(float_bundle))), "a red circle left of the blue square"
    assert list(tokenizer.encode(text)) == tiny.tokenizer.encode(text, add_special_tokens=False)


def test_fp32_bundle_answers_an_image_prompt_as_pytorch(float_bundle, tiny, test_image):
    expected = Pipeline(copy.deepcopy(tiny)).generate("What is in the picture?", [test_image], max_new_tokens=24)
    got = OnnxRunner(float_bundle).generate("What is in the picture?", [test_image], max_new_tokens=24)
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert got.prompt_tokens == expected.prompt_tokens and got.finish_reason == expected.finish_reason


def test_llava_exports(llava, tmp_path):
    loaded = load_model(llava.path)
    out = export_bundle(loaded, "onnx", tmp_path / "llava", progress=False)
    px = pixels(loaded)
    tokens = OnnxRunner(out).generate(PROMPT_IDS, px, max_new_tokens=16, stop_token_ids=()).token_ids
    assert tokens == torch_greedy(loaded, PROMPT_IDS, px, 16)


def test_tied_text_only_model_shares_its_codes(hf_builders, tmp_path):
    hf_builders.llama(tmp_path / "llama", tie_word_embeddings=True)
    loaded = quantized_copy(load_model(tmp_path / "llama"), "rtn-w4-g32")
    out = export_bundle(loaded, "onnx", tmp_path / "bundle", progress=False)
    assert not (out / "vision.onnx").exists()
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert genai["type"] == "decoder-pipeline" and "vision" not in genai
    # the LM head's MatMulNBits and the embedding's GatherBlockQuantized carry the same packed codes
    qweight = "language_model.model.embed_tokens.weight.qweight"
    (head,) = [i for i in onnx.load(str(out / "decoder.onnx")).graph.initializer if i.name.endswith(".qweight")
               and "layers" not in i.name]
    (table,) = [i for i in onnx.load(str(out / "embedding.onnx")).graph.initializer if i.name == qweight]
    assert np.array_equal(onnx.numpy_helper.to_array(head).reshape(-1), onnx.numpy_helper.to_array(table).reshape(-1))
    ids = [1, 5, 9, 40, 77]
    tokens = OnnxRunner(out).generate(ids, max_new_tokens=32, stop_token_ids=()).token_ids
    assert agreement(tokens, torch_greedy(loaded, ids, None, 32)) >= 0.95


# ----------------------------------------------------------------------------------------------
# 4-bit


def test_4bit_graphs_hold_our_codes(quantized):
    loaded, out = quantized
    text = loaded.model.config.text
    decoder_ops = op_counts(out / "decoder.onnx")
    # 7 linears per block + the LM head, all MatMulNBits, those of one input stacked (Q/K/V, gate/up):
    # 4 per block; attention one GroupQueryAttention per block; the only float MatMuls left are, for
    # float-minimum codes, each MatMulNBits' two small ones that add its blocks' offsets
    kernels = 4 * text.num_hidden_layers + 1
    with_mins = loaded.quantization.scheme.endswith("-min")
    assert decoder_ops["MatMulNBits"] == kernels and decoder_ops["GroupQueryAttention"] == text.num_hidden_layers
    assert decoder_ops.get("MatMul", 0) == (2 * kernels if with_mins else 0)
    # gate/up is split after its kernel; Q/K/V go to GroupQueryAttention packed, unsplit
    assert decoder_ops["Split"] == text.num_hidden_layers
    # RoPE is inside GroupQueryAttention (do_rotary), not rotate-half's slices and negations around it
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    rotary = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}.get("do_rotary") for n in gqa]
    assert rotary == [1] * text.num_hidden_layers and "Neg" not in decoder_ops
    # and every layer reads the same seqlens_k / total_sequence_length, computed once per step
    assert len({(n.input[5], n.input[6]) for n in gqa}) == 1
    assert all(n.input[1] == n.input[2] == "" for n in gqa)  # packed QKV in the query input
    embedding = onnx.load(str(out / "embedding.onnx"), load_external_data=False)
    assert op_counts(out / "embedding.onnx")["GatherBlockQuantized"] == 1
    assert "language_model.model.embed_tokens.weight" not in {i.name for i in embedding.graph.initializer}

    decoder = onnx.load(str(out / "decoder.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in decoder.graph.initializer}
    codes = codes_by_name(loaded.model, loaded.quantization)
    name = "language_model.model.layers.1.mlp.down_proj.weight"
    packed = pack_nbits(codes[name])
    assert np.array_equal(inits[f"{name}.qweight"].reshape(-1), packed.data.reshape(-1))
    assert np.array_equal(inits[f"{name}.scales"], packed.scales)
    node = next(n for n in decoder.graph.node if f"{name}.qweight" in n.input)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": 128, "N": 64, "bits": 4, "block_size": 32, "accuracy_level": 1}
    assert not any(n.endswith("proj.weight") or n.endswith("lm_head.weight") for n in inits)  # no float copy left
    # no zero-point input (float ones leave ONNX Runtime's fast kernels): the graph holds the weight
    # exactly, by the default zero point 8, plus each block's offset for float-minimum codes
    assert len(node.input) == 3
    nibbles = np.stack([inits[f"{name}.qweight"] & 15, inits[f"{name}.qweight"] >> 4], -1).reshape(64, 4, 32)
    weight = (nibbles.astype(np.float32) - 8) * inits[f"{name}.scales"][..., None]
    if with_mins:
        weight += inits[f"{name}.offsets"].T[..., None]
    assert np.allclose(weight.reshape(64, 128), codes[name].dequantize().numpy(), rtol=0, atol=1e-6)
    # a stacked kernel holds its linears' codes in order, rows after rows
    attn = "language_model.model.layers.0.self_attn."
    stacked = stack_rows([pack_nbits(codes[f"{attn}{p}_proj.weight"]) for p in "qkv"])
    assert np.array_equal(inits[f"{attn}q_proj+k_proj+v_proj.weight.qweight"].reshape(-1), stacked.data.reshape(-1))
    assert np.array_equal(inits[f"{attn}q_proj+k_proj+v_proj.weight.scales"], stacked.scales)
    assert stacked.rows == (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_dim


def test_4bit_logits_and_greedy_tokens_match_the_quantized_pytorch_model(quantized):
    loaded, out = quantized
    runner = OnnxRunner(out)
    px = pixels(loaded)
    assert prompt_logits_error(loaded, runner, PROMPT_IDS, px) < LOGITS_ATOL
    with torch.no_grad():  # stacked Q/K/V, packed into GroupQueryAttention, through its cached paths
        embeds = loaded.model.embed_prompt(PROMPT_IDS, loaded.model.encode_images(px))
    assert_cached_steps_match_pytorch(runner, loaded, embeds)
    expected = torch_greedy(loaded, PROMPT_IDS, px, 32)
    tokens = runner.generate(PROMPT_IDS, px, max_new_tokens=32, stop_token_ids=()).token_ids
    assert agreement(tokens, expected) >= 0.95
    # ONNX Runtime GenAI's own loop on the 4-bit graphs (stacked MatMulNBits, packed-QKV attention)
    assert genai_agreement(out, PROMPT_IDS, expected, loaded.tokenizer.stop_token_ids(), px) >= 0.95


def test_asymmetric_and_8bit_codes_and_onnxruntime_native_quantization(tiny, tmp_path):
    loaded = quantized_copy(tiny, "rtn-w8-g32-asym")
    out = export_bundle(loaded, "onnx", tmp_path / "w8", progress=False)
    embedding = onnx.load(str(out / "embedding.onnx"), load_external_data=False)
    node = next(n for n in embedding.graph.node if n.op_type == "GatherBlockQuantized")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert len(node.input) == 4 and (attrs["bits"], attrs["block_size"]) == (8, 32)  # with zero points
    px = pixels(loaded)
    tokens = OnnxRunner(out).generate(PROMPT_IDS, px, max_new_tokens=16, stop_token_ids=()).token_ids
    assert agreement(tokens, torch_greedy(loaded, PROMPT_IDS, px, 16)) >= 0.95

    native = export_bundle(copy.deepcopy(tiny), "onnx", tmp_path / "ort", quant="ort-int4", progress=False)
    manifest = json.loads((native / "manifest.json").read_text())
    assert manifest["quantization"] == "ort-int4" and manifest["onnx"]["weights"] == "onnxruntime MatMulNBitsQuantizer"
    assert manifest["onnx"]["operators"]["decoder"] == {"MatMulNBits": 15, "GroupQueryAttention": 2}
    assert manifest["onnx"]["operators"]["embedding"] == {"GatherBlockQuantized": 1}
    OnnxRunner(native).generate(PROMPT_IDS, px, max_new_tokens=4)


def test_mixed_codes_run_in_onnxruntime(tiny, tmp_path):
    # rtn-w4-g32-min-mixed (export --target's ONNX pick for a grid-trained model): 8-bit first and last
    # blocks and embedding, 4-bit blocks with float minimums between, as PyTorch computes them
    loaded = quantized_copy(with_middle_block(tiny), "rtn-w4-g32-min-mixed")
    out = export_bundle(copy.deepcopy(loaded), "onnx", tmp_path / "mixed", progress=False)
    decoder = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    bits = [next(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "bits")
            for n in decoder.graph.node if n.op_type == "MatMulNBits"]
    assert bits.count(4) == 4 and bits.count(8) == 9  # 4 kernels a block (Q/K/V, gate/up stacked), the LM head
    px = pixels(loaded)
    tokens = OnnxRunner(out).generate(PROMPT_IDS, px, max_new_tokens=16, stop_token_ids=()).token_ids
    assert agreement(tokens, torch_greedy(loaded, PROMPT_IDS, px, 16)) >= 0.95


def test_export_is_deterministic(tiny, tmp_path):
    loaded = quantized_copy(tiny, "rtn-w4-g32")
    first = export_bundle(copy.deepcopy(loaded), "onnx", tmp_path / "a", progress=False)
    second = export_bundle(loaded, "onnx", tmp_path / "b", progress=False)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["quantization"] == "rtn-w4-g32" and manifest["onnx"]["accuracy_level"] == 1


# ----------------------------------------------------------------------------------------------
# errors


def test_bad_input_is_a_clear_error_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    with pytest.raises(QuantError, match="unknown quantization scheme"):
        export_bundle(copy.deepcopy(tiny), "onnx", tmp_path / "a", quant="int3")
    assert not (tmp_path / "a").exists()

    # codes in groups of 8: ONNX Runtime's block-quantized operators need blocks of at least 16
    loaded = quantized_copy(tiny, "rtn-w4-g32")
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    loaded.quantization.tensors[name] = quantize_rtn(dict(loaded.model.named_parameters())[name], 4, 8)
    with pytest.raises(QuantError, match=r"up_proj\.weight.*groups of 8"):
        export_bundle(loaded, "onnx", tmp_path / "b")
    assert not (tmp_path / "b").exists()

    # a failure half-way (after vision.onnx is written) leaves nothing either
    def fail(model):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(graphs, "export_decoder", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_bundle(copy.deepcopy(tiny), "onnx", tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# the default model


@pytest.fixture(scope="module")
def default_model():
    from edge_mllm.default import load_default

    return load_default(progress=False)


@pytest.mark.slow
def test_default_model_fp32_and_4bit_bundles(default_model, tmp_path, test_image):
    pipe = Pipeline(default_model)
    ids = pipe.tokenizer.encode_with_images(pipe.render_prompt("Describe the image.", 1))
    px = torch.stack([pipe.image_processor(test_image)])

    out = export_bundle(default_model, "onnx", tmp_path / "fp32", progress=False)
    runner = OnnxRunner(out)
    assert prompt_logits_error(default_model, runner, ids, px) < LOGITS_ATOL
    assert runner.generate(ids, px, max_new_tokens=16).token_ids == pipe.generate(
        "Describe the image.", [test_image], max_new_tokens=16).token_ids
    del runner
    # ONNX Runtime GenAI, image included, answers as PyTorch
    stops = default_model.tokenizer.stop_token_ids()
    assert genai_agreement(out, ids, torch_greedy(default_model, ids, px, 16), stops, px) == 1

    out = export_bundle(default_model, "onnx", tmp_path / "w4", quant="rtn-w4-g32", progress=False)
    assert op_counts(out / "decoder.onnx")["MatMulNBits"] == 4 * 30 + 1
    expected = torch_greedy(default_model, ids, px, 32)  # the model now carries the 4-bit codes
    tokens = OnnxRunner(out).generate(ids, px, max_new_tokens=32, stop_token_ids=()).token_ids
    assert agreement(tokens, expected) >= 0.95


@pytest.mark.slow
def test_default_model_on_its_own_4bit_grid(tmp_path, test_image):
    """rtn-w4-g32-min (the Q4_1 grid the default's LoRA was trained on): every decoder matrix exactly,
    through MatMulNBits' integer (default) zero point and the blocks' offsets beside it."""
    from edge_mllm.default import load_default

    loaded = load_default(progress=False)
    pipe = Pipeline(loaded)
    ids = pipe.tokenizer.encode_with_images(pipe.render_prompt("Describe the image.", 1))
    px = torch.stack([pipe.image_processor(test_image)])
    out = export_bundle(loaded, "onnx", tmp_path / "grid", quant="rtn-w4-g32-min", progress=False)
    decoder = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    nbits = [n for n in decoder.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 30 + 1 and all(len(n.input) == 3 for n in nbits)
    runner = OnnxRunner(out)
    assert prompt_logits_error(loaded, runner, ids, px) < LOGITS_ATOL
    tokens = runner.generate(ids, px, max_new_tokens=32, stop_token_ids=()).token_ids
    expected = torch_greedy(loaded, ids, px, 32)
    assert agreement(tokens, expected) >= 0.95
    assert genai_agreement(out, ids, expected, loaded.tokenizer.stop_token_ids(), px) >= 0.95
