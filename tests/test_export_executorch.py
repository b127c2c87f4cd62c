"""ExecuTorch bundles, run in ExecuTorch's own runtime (the pip wheel): fp32 logits equal PyTorch's,
4-bit greedy tokens agree with the PyTorch model carrying the same codes, ExecuTorch's C++
``MultimodalRunner`` drives the bundle with an image, mobile targets lower, bad input leaves nothing.

Exports take about a minute each on two cores, so each bundle is built once per module.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch.runtime", reason="executorch is not installed")

from edge_mllm.export.bundle import MANIFEST, backend, export_bundle  # noqa: E402
from edge_mllm.export.executorch import program as et_program  # noqa: E402
from edge_mllm.export.executorch.bundle import ExecuTorchBackend  # noqa: E402
from edge_mllm.export.executorch.quantize import (  # noqa: E402
    CodesLinear,
    input_outliers,
    input_peaks,
    two_digit_steps,
    xnnpack_int4,
)
from edge_mllm.export.executorch.runtime import ExecuTorchRunner, multimodal_runner  # noqa: E402
from edge_mllm.quant.groupwise import quantize_rtn  # noqa: E402

from edge_mllm.checkpoint import load_model  # noqa: E402
from edge_mllm.errors import ConfigError, ContextLengthError, EdgeMLLMError, OutputError, QuantError  # noqa: E402
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX  # noqa: E402
from edge_mllm.pipeline import Pipeline  # noqa: E402

QUESTION = "describe the image."


def prompt_ids(pipe: Pipeline) -> list[int]:
    return pipe.tokenizer.encode_with_images(pipe.render_prompt(QUESTION, 1))


def reference_logits(pipe: Pipeline, ids: list[int], images: list, tokens: list[int]) -> list[torch.Tensor]:
    """PyTorch logits after the prompt and after each of ``tokens`` (teacher forcing)."""
    model = pipe.model
    lm = model.language_model
    with torch.inference_mode():
        embeds = model.embed_prompt(ids, pipe.encode_images(images))
        n = embeds.shape[1]
        lm.setup_cache(1, n + len(tokens))
        try:
            out = [lm(embeds, torch.arange(n))[0, -1]]
            for i, tok in enumerate(tokens[:-1]):
                out.append(lm(lm.embed(torch.tensor([[tok]])), torch.tensor([n + i]))[0, -1])
        finally:
            lm.clear_cache()
    return out


def runtime_logits(runner: ExecuTorchRunner, ids: list[int], images: list, tokens: list[int]) -> list[torch.Tensor]:
    """The bundle's logits for the same teacher-forced sequence, through executorch.runtime."""
    embeds = runner.embed_prompt(ids, images)
    out = [runner.decode(embeds, 0)]
    for i, tok in enumerate(tokens[:-1]):
        out.append(runner.decode(runner.embed_tokens([tok]), embeds.shape[0] + i))
    return out


@pytest.fixture(scope="module")
def fp32_bundle(mobilevlm_v2, tmp_path_factory):
    """(loaded model, fp32 XNNPACK bundle) of the tiny MobileVLM V2 (LDPv2 projector)."""
    loaded = load_model(mobilevlm_v2.path)
    out = export_bundle(loaded, "executorch", tmp_path_factory.mktemp("et") / "fp32", progress=False)
    return loaded, out


@pytest.fixture(scope="module", params=["rtn-w4-g32", "rtn-w4-g32-min-dq"])
def q4_bundle(request, llama_folder, tmp_path_factory):
    """(PyTorch model carrying 4-bit codes — symmetric, or float-minimum — and its bundle) of the tiny
    text-only Llama: the 4-bit codes are all in the decoder (the vision encoder is fp32 either way,
    checked above), and a quantized decoder is the slowest part of an export."""
    loaded = load_model(llama_folder[0])
    out = export_bundle(loaded, "executorch", tmp_path_factory.mktemp("et") / "q4", quant=request.param,
                        progress=False)
    return loaded, out  # export_bundle quantized ``loaded`` in place: its weights are the codes' values


# ----------------------------------------------------------------------------------------------
# fp32


def test_bundle_has_the_runner_methods_and_metadata(fp32_bundle):
    loaded, out = fp32_bundle
    manifest = json.loads((out / MANIFEST).read_text())
    info = manifest["executorch"]
    assert manifest["format"] == "executorch" and info["backend"] == "xnnpack"
    assert {f["path"] for f in manifest["files"]} >= {"model.pte", "tokenizer/tokenizer.json"}
    runner = ExecuTorchRunner(out)
    names = runner.program.method_names
    assert {"vision_encoder", "token_embedding", "text_decoder"} <= names
    metadata = {name: runner.method(name).execute([]) for name in info["metadata_methods"]}
    text = loaded.model.config.text
    assert metadata["get_max_seq_len"] == [text.max_position_embeddings] == [info["max_seq_len"]]
    assert manifest["max_seq_len"] == info["max_seq_len"]  # what info / simulate report: the .pte's KV cache
    assert metadata["get_max_context_len"] == [text.max_position_embeddings]
    assert metadata["get_eos_ids"] == list(loaded.tokenizer.stop_token_ids())
    assert metadata["get_bos_id"] == [loaded.tokenizer.bos_token_id]
    assert metadata["use_kv_cache"] == [True] and metadata["get_vocab_size"] == [text.vocab_size]
    assert info["delegates"]["vision_encoder"]["XnnpackBackend"] >= 1
    assert info["delegates"]["text_decoder"]["XnnpackBackend"] >= 1
    assert info["quantization"]["linears"] == "fp32"


def test_fused_vision_encoder_reads_uint8_rgb_in_one_xnnpack_delegate(fp32_bundle, test_image):
    """The default vision method is the fused encoder: uint8 RGB in (what ``make_image_input`` of a
    uint8 tensor and Android's ``prefillImages(int[])`` give), one XNNPACK partition, and nothing
    outside it but the input's cast to float."""
    loaded, out = fp32_bundle
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["image_preprocessing"]["vision_input"] == "rgb_uint8"
    assert manifest["executorch"]["methods"]["vision_encoder"]["inputs"][0]["dtype"] == "uint8"
    assert manifest["executorch"]["delegates"]["vision_encoder"] == {"XnnpackBackend": 1}
    assert et_program.non_delegated_ops((out / "model.pte").read_bytes())["vision_encoder"] == [
        "dim_order_ops::_to_dim_order_copy"]
    runner, pipe = ExecuTorchRunner(out), Pipeline(loaded)
    rgb = pipe.image_processor.rgb(test_image)
    got = runner.method("vision_encoder").execute([rgb[None]])[0][0]
    with torch.inference_mode():
        ref = loaded.model.encode_images(pipe.image_processor(test_image)[None])[0]
    assert torch.allclose(got, ref, atol=1e-4, rtol=0)


def test_int8_vision_runs_xnnpack_int8_gemms(fp32_bundle, tmp_path, test_image):
    """--int8-vision: the fused vision method's linears as int8 weights with int8 dynamic activations
    (XNNPACK's qd8-f32-qc8w), still one delegate: the program shrinks by ~3 bytes per linear weight, and
    the tokens the runtime computes move from the fp32 reference by a small, nonzero error (~1% here)."""
    loaded, fp32_out = fp32_bundle
    out = export_bundle(loaded, "executorch", tmp_path / "int8", int8_vision=True, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["executorch"]["quantization"]["vision"].startswith("linears: int8 weights per output channel")
    assert manifest["executorch"]["delegates"]["vision_encoder"] == {"XnnpackBackend": 1}
    pte = (out / "model.pte").read_bytes()
    assert et_program.non_delegated_ops(pte)["vision_encoder"] == ["dim_order_ops::_to_dim_order_copy"]
    vision = [m for name, m in loaded.model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.startswith("language_model")]
    saved = (fp32_out / "model.pte").stat().st_size - len(pte)
    assert saved > 0.8 * 3 * sum(m.weight.numel() for m in vision), saved

    runner, pipe = ExecuTorchRunner(out), Pipeline(loaded)
    got = runner.method("vision_encoder").execute([pipe.image_processor.rgb(test_image)[None]])[0][0]
    with torch.inference_mode():
        ref = loaded.model.encode_images(pipe.image_processor(test_image)[None])[0]
    error = float((got - ref).norm() / ref.norm())
    assert 0 < error < 0.03, error


def test_fp32_logits_and_greedy_tokens_match_pytorch(fp32_bundle, test_image):
    loaded, out = fp32_bundle
    pipe, runner = Pipeline(loaded), ExecuTorchRunner(out)
    ids = prompt_ids(pipe)

    pixels = pipe.image_processor(test_image)
    with torch.inference_mode():
        ref_image = loaded.model.encode_images(pixels[None])[0]
    assert torch.allclose(runner.encode_image(test_image), ref_image, atol=1e-4, rtol=0)

    ref = pipe.generate(QUESTION, [test_image], max_new_tokens=32)
    got = runner.generate(ids, [test_image], max_new_tokens=32)
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert got.prompt_tokens == ref.prompt_tokens and got.finish_reason == ref.finish_reason

    # logits at every step of a 32-token continuation (stop tokens ignored: a fixed length)
    tokens = runner.generate(ids, [test_image], max_new_tokens=32, stop_token_ids=()).token_ids
    expected = reference_logits(pipe, ids, [test_image], tokens)
    actual = runtime_logits(runner, ids, [test_image], tokens)
    worst = max(float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True))
    assert worst < 1e-3, worst
    assert [int(e.argmax()) for e in expected] == tokens


def id_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A tokenizer.json whose token i decodes to "<i>": what ExecuTorch's C++ runner generates can be
    read back as ids exactly (the tiny random model emits byte fragments that are not UTF-8, which the
    runner's Python callback cannot pass, and pads its vocabulary past the real tokenizer's)."""
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True, exist_ok=True)
    Tokenizer(models.BPE(vocab={f"<{i}>": i for i in range(vocab_size)}, merges=[])).save(str(folder / "ids.json"))
    return folder / "ids.json"


def test_multimodal_runner_generates_with_an_image(fp32_bundle, test_image, tmp_path):
    from executorch.extension.llm.runner import GenerationConfig, make_image_input, make_token_input

    loaded, out = fp32_bundle
    pipe = Pipeline(loaded)
    ids = prompt_ids(pipe)
    k = ids.index(IMAGE_TOKEN_INDEX)
    n = 16
    ref = pipe.generate(QUESTION, [test_image], max_new_tokens=n)

    runner = multimodal_runner(out, tokenizer=id_tokenizer(tmp_path, loaded.model.config.text.vocab_size))
    pieces, stats = [], []
    inputs = [make_token_input(ids[:k]), make_image_input(pipe.image_processor.rgb(test_image)),
              make_token_input(ids[k + 1:])]
    runner.generate(inputs, GenerationConfig(max_new_tokens=n, temperature=0.0, echo=False),
                    pieces.append, stats.append)
    generated = [int(i) for i in re.findall(r"<(\d+)>", "".join(pieces))]
    stop = set(loaded.tokenizer.stop_token_ids())
    cut = next((i for i, t in enumerate(generated) if t in stop), len(generated))
    assert generated[:cut] == ref.token_ids
    assert stats and stats[0].num_prompt_tokens == loaded.model.prompt_length(ids)

    # with the bundle's own tokenizer the runner loads, reads the metadata and encodes text itself
    runner = multimodal_runner(out)
    runner.generate([make_token_input(ids[:k]), make_image_input(pipe.image_processor.rgb(test_image)),
                     make_token_input(ids[k + 1:])], GenerationConfig(max_new_tokens=1, temperature=0.0, echo=False),
                    None, stats.append)
    assert stats[-1].num_prompt_tokens == loaded.model.prompt_length(ids)


def test_runner_errors_are_clear(fp32_bundle, test_image):
    _, out = fp32_bundle
    runner = ExecuTorchRunner(out)
    with pytest.raises(EdgeMLLMError, match="placeholder"):
        runner.generate([1, 5, IMAGE_TOKEN_INDEX], [], max_new_tokens=2)
    with pytest.raises(ContextLengthError, match="context of"):
        runner.generate([1, 5, IMAGE_TOKEN_INDEX], [test_image], max_new_tokens=runner.max_seq_len)


# ----------------------------------------------------------------------------------------------
# 4-bit


@pytest.mark.parametrize("form", ["symmetric", "asymmetric", "float-min"])
def test_our_4bit_codes_become_exact_xnnpack_weights(form):
    """XNNPACK takes only positive group scales and no zero points; the rewrite keeps the weights."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 96, generator=g)
    w[2, :32] = 0  # an all-zero group: scale 0
    w[3, 32:64] = 0.5  # a constant group: scale 0 (with a float minimum: the minimum)
    qt = quantize_rtn(w, 4, 32, form == "symmetric", float_min=form == "float-min")
    weight, offsets = xnnpack_int4(qt)
    assert bool((weight.scale > 0).all()) and int(weight.qdata.min()) >= -8 and int(weight.qdata.max()) <= 7
    assert bool((weight.zero_point == 0).all())
    rebuilt = weight.dequantize() + offsets.repeat_interleave(32, dim=1)
    assert torch.equal(rebuilt, qt.dequantize())
    linear = torch.nn.Linear(96, 24, bias=False)
    x = torch.randn(5, 96, generator=g)
    y = CodesLinear(linear, qt)(x)  # with int8 dynamic activation quantization, as XNNPACK runs it
    assert float((y - x @ qt.dequantize().T).abs().max()) < 0.05 * float((x @ qt.dequantize().T).abs().max())


def test_outlier_channels_skip_the_int8_rounding_and_keep_the_weights():
    """Two input channels 500× the rest set every token's int8 step; computed in fp32 beside the 4-bit
    GEMM they no longer do: the output error drops, and the weights are the codes' exactly."""
    g = torch.Generator().manual_seed(0)
    qt = quantize_rtn(torch.randn(24, 96, generator=g), 4, 32, False, float_min=True)
    linear = torch.nn.Linear(96, 24, bias=False)
    x = torch.randn(7, 96, generator=g)
    x[:, [3, 40]] *= 500
    exact = x @ qt.dequantize().T
    error = {}
    for name, outliers in (("int8", None), ("outliers fp32", torch.tensor([3, 40]))):
        codes = CodesLinear(linear, qt, outliers)
        error[name] = float((codes(x) - exact).norm() / exact.norm())
    assert error["outliers fp32"] < 0.1 * error["int8"], error
    keep = codes.int8_channels.bool()
    assert (~keep).nonzero().flatten().tolist() == [3, 40]
    # the side path: 3 group sums then the 2 outlier channels, times the offsets then their columns
    assert torch.equal(codes.side_inputs(x)[:, 3:], x[:, [3, 40]])
    offsets, columns = codes.side_weights.weight[:, :3], codes.side_weights.weight[:, 3:]
    assert torch.equal(codes.linear.weight.dequantize()[:, ~keep], columns)
    rebuilt = codes.linear.weight.dequantize() + offsets.repeat_interleave(32, dim=1)
    assert torch.equal(rebuilt, qt.dequantize())


def test_two_digit_activations_keep_about_15_bits_in_executorch():
    """Each input as two int8 digits (a fixed-step high digit, the per-token remainder ×128): in
    ExecuTorch's XNNPACK GEMM the linear's output error falls far below one int8 rounding's, the GEMM
    reads the codes twice (scales × step, × step / 128) and nothing runs outside the delegate."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.runtime import Runtime
    from torch.export import Dim

    g = torch.Generator().manual_seed(0)
    qt = quantize_rtn(torch.randn(48, 96, generator=g), 4, 32, False, float_min=True)
    linear = torch.nn.Linear(96, 48, bias=False)
    x = torch.randn(1, 9, 96, generator=g)
    x[..., 40] *= 300  # one outlier channel, computed in fp32 beside the GEMM
    # the weights as XNNPACK holds them (group scales in bf16; the outlier's column exact, beside the
    # GEMM), so that only the activations' rounding differs
    weight, offsets = xnnpack_int4(qt)
    scales = weight.scale.to(torch.bfloat16).float().repeat_interleave(32, dim=1)
    held = weight.qdata.float() * scales + offsets.repeat_interleave(32, dim=1)
    held[:, 40] = qt.dequantize()[:, 40]
    exact = x @ held.T
    outliers = {"l": torch.tensor([40])}
    step = two_digit_steps({"l": x.abs().reshape(-1, 96).amax(0)}, outliers)["l"]
    assert step == 2.0 ** round(torch.log2(torch.tensor(step)).item())  # a power of two
    error = {}
    for name, high_step in (("int8", None), ("two digits", step)):
        codes = CodesLinear(linear, qt, outliers["l"], high_step)
        program = torch.export.export(codes.eval(), (x,), dynamic_shapes=({1: Dim("t", min=1, max=64)},),
                                      strict=False)
        pte = et_program.lower_to_pte({"forward": program}, lambda _: [XnnpackPartitioner()], {})
        assert et_program.non_delegated_ops(pte) == {"forward": []}
        method = Runtime.get().load_program(pte).load_method("forward")
        error[name] = float((method.execute([x])[0] - exact).norm() / exact.norm())
    assert error["two digits"] < 0.05 * error["int8"], error
    q, scale = codes.linear.weight.qdata, codes.linear.weight.scale
    assert torch.equal(q[:, :96], q[:, 128:]) and not q[:, 96:128].any()
    assert torch.equal(scale[:, :3], scale[:, 4:] * 128)
    assert torch.equal(scale[:, :3] / step, xnnpack_int4(qt)[0].scale)


def test_input_outliers_finds_the_large_channels(llama_folder):
    loaded = load_model(llama_folder[0])
    _with_activation_outliers(loaded)
    lm = loaded.model.language_model
    found = input_outliers(input_peaks(lm, [lm.embed(torch.tensor([[1, 5, 9, 14, 3, 7]]))]), count=3)
    names = {name.removeprefix("model.") for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(found) == names
    for name, channels in found.items():
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert channels.tolist() == [0, 1, 2], name


def test_outlier_channels_come_from_the_quantizations_calibration_when_there_is_one(llama_folder, monkeypatch):
    """An export whose scheme calibrated (gptq, awq, -sq) finds the outlier channels on those inputs
    rather than building a second set."""
    import edge_mllm.quant.calibration as calibration
    from edge_mllm.export.bundle import quantized_weights
    from edge_mllm.quant.scheme import QuantScheme

    loaded = load_model(llama_folder[0])
    _with_activation_outliers(loaded)
    lm = loaded.model.language_model
    weights = quantized_weights(loaded, QuantScheme.parse("rtn-w4-g32"))
    target = backend("executorch")
    target.calibration = [lm.embed(torch.tensor([[1, 5, 9, 14, 3, 7]]))]
    monkeypatch.setattr(calibration, "calibration_set", lambda *a, **k: pytest.fail("built a second set"))
    target.two_digit_activations = True
    (found, steps), peaks = target.activation_plan(loaded, weights), input_peaks(lm, target.calibration)
    expected = input_outliers(peaks)
    assert found.keys() == expected.keys() and all(torch.equal(found[k], expected[k]) for k in found)
    assert steps == two_digit_steps(peaks, expected)


def test_4bit_bundle_agrees_with_the_quantized_pytorch_model(q4_bundle):
    loaded, out = q4_bundle
    manifest = json.loads((out / MANIFEST).read_text())
    info = manifest["executorch"]
    scheme = loaded.quantization.scheme
    assert manifest["quantization"] == scheme and info["quantization"]["source"] == scheme
    assert set(info["quantization"]["tensors"]) == set(loaded.quantization.tensors)  # all from their codes
    assert "vision_encoder" not in info["methods"] and info["delegates"]["text_decoder"]["XnnpackBackend"] >= 1

    pipe, runner = Pipeline(loaded), ExecuTorchRunner(out)
    prompt = "The quick brown fox"
    ids = loaded.tokenizer.encode(prompt)
    n = 32
    tokens = pipe.generate(prompt, raw=True, max_new_tokens=n).token_ids
    if len(tokens) < n:  # stopped early: continue past the stop token for a fixed-length comparison
        tokens = runner.generate(ids, max_new_tokens=n, stop_token_ids=()).token_ids
    expected = reference_logits(pipe, ids, [], tokens)
    actual = runtime_logits(runner, ids, [], tokens)
    # 8da4w quantizes activations to int8 per token: logits move a little, not a lot
    scale = max(float(e.abs().max()) for e in expected)
    worst = max(float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True))
    assert worst < 0.1 * scale
    # Greedy tokens agree, except where PyTorch's top two logits are closer than that rounding moves
    # them: the tiny random model has a few such near-ties in 32 tokens, and which of them flip changes
    # with any change to the program (int8 rounding turns 1e-8 into whole steps), so a bare 95% bound
    # would pass or fail by chance.
    flips = [e for a, e in zip(actual, expected, strict=True) if int(a.argmax()) != int(e.argmax())]
    assert all(float(e.topk(2).values.diff().abs()) < worst for e in flips), worst
    assert 1 - len(flips) / n >= 0.9, len(flips)


def _with_activation_outliers(loaded) -> None:
    """Give the decoder's norm outputs a few huge channels, as LLM activations have, keeping the float
    model exact: norm weight × 40 on those channels, the reading linears' columns ÷ 40."""
    with torch.no_grad():
        for layer in loaded.model.language_model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                norm.weight[:3] *= 40
                for lin in readers:
                    lin.weight[:, :3] /= 40


def _runtime_error(loaded, out) -> float:
    """Relative L2 distance of the bundle's logits from the PyTorch model's over a 16-token continuation."""
    prompt = "The quick brown fox jumps over the lazy dog because"
    pipe, runner = Pipeline(loaded), ExecuTorchRunner(out)
    ids = loaded.tokenizer.encode(prompt)
    tokens = runner.generate(ids, max_new_tokens=16, stop_token_ids=()).token_ids
    expected = torch.stack(reference_logits(pipe, ids, [], tokens))
    actual = torch.stack(runtime_logits(runner, ids, [], tokens))
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.slow
def test_outlier_channels_and_smoothquant_bring_executorch_8da4w_closer_to_pytorch(llama_folder, tmp_path,
                                                                                 monkeypatch):
    """8da4w rounds each token's activations to int8; outlier channels set the step. Keeping each
    linear's largest input channels out of the rounding (the default), or ``-sq`` codes (scales migrated
    into the weights before rounding), must each leave the bundle closer to the PyTorch model carrying
    the same codes than plain codes rounded whole; two-digit activations closer still."""
    errors = {}
    for name, scheme, channels, two_digits in (("int8", "rtn-w4-g32", 0, False), ("sq", "rtn-w4-g32-sq", 0, False),
                                               ("outliers fp32", "rtn-w4-g32", 4, False),
                                               ("two digits", "rtn-w4-g32", 4, True)):
        monkeypatch.setattr(ExecuTorchBackend, "outlier_channels", channels)
        loaded = load_model(llama_folder[0])
        _with_activation_outliers(loaded)
        out = export_bundle(loaded, "executorch", tmp_path / name, quant=scheme, progress=False,
                            two_digit_activations=two_digits)
        errors[name] = _runtime_error(loaded, out)
        info = json.loads((out / MANIFEST).read_text())["executorch"]
        assert ("int8_activations" in info["quantization"]) == bool(channels)
        assert info["two_digit_activations"] is two_digits
    assert errors["sq"] < 0.5 * errors["int8"], errors
    assert errors["outliers fp32"] < 0.5 * errors["int8"], errors
    assert errors["two digits"] < 0.5 * errors["outliers fp32"], errors


# ----------------------------------------------------------------------------------------------
# targets and bad input


def test_formats_are_registered():
    for name in ("executorch", "executorch-coreml", "executorch-vulkan", "executorch-qnn", "executorch-mediatek"):
        assert backend(name).name == name


def test_vendor_sdks_missing_give_clear_errors(mobilevlm_v2, tmp_path, monkeypatch):
    loaded = load_model(mobilevlm_v2.path)
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"QNN \(QAIRT\) SDK.*QNN_SDK_ROOT"):
        export_bundle(loaded, "executorch-qnn", tmp_path / "qnn", progress=False)
    if __import__("importlib").util.find_spec("mtk_converter") is None:
        with pytest.raises(ConfigError, match="NeuroPilot.*mtk_converter"):
            export_bundle(loaded, "executorch-mediatek", tmp_path / "mtk", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_float_minimum_embedding_rows_through_executorchs_op():
    """ExecuTorch's embedding op takes a float zero point: the float minimum becomes one, ≈ exact."""
    from edge_mllm.export.executorch.quantize import QuantizedEmbedding, load_quantized_ops

    load_quantized_ops()
    table = torch.randn(40, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    table[5, :32] = 0.02  # a constant group
    qt = quantize_rtn(table, 4, 32, float_min=True)
    rows = QuantizedEmbedding.from_codes(qt)(torch.tensor([[0, 5, 39]]))[0]
    expected = qt.dequantize()[[0, 5, 39]]
    step = float(qt.scales.float().max())
    assert float((rows - expected).abs().max()) < 1e-3 * step


def test_bad_input_fails_fast_and_leaves_nothing(mobilevlm_v2, tmp_path, monkeypatch):
    loaded = load_model(mobilevlm_v2.path)
    with pytest.raises(QuantError, match="unknown quantization"):
        export_bundle(loaded, "executorch", tmp_path / "a", quant="8da3w", progress=False)
    with pytest.raises(QuantError):
        export_bundle(loaded, "executorch", tmp_path / "a", quant="rtn-w3-g32", progress=False)
    for quant, why in ((None, "no 4-bit linears"), ("rtn-w8-g32", "no 4-bit linears"), ("8da4w", "torchao's own")):
        with pytest.raises(ConfigError, match=f"two-digit activations are for our 4-bit codes.*{why}"):
            export_bundle(loaded, "executorch", tmp_path / "a", quant=quant, two_digit_activations=True,
                          progress=False)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write in"):
        export_bundle(loaded, "executorch", tmp_path / "file" / "bundle", progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(et_program, "lower_to_pte", interrupted)  # after torch.export, before the .pte
    with pytest.raises(KeyboardInterrupt):
        export_bundle(loaded, "executorch", tmp_path / "b", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ----------------------------------------------------------------------------------------------
# slow: mobile targets, determinism, native quantization, the default model


def delegate_ids(out: Path, method: str) -> set[str]:
    return set(json.loads((out / MANIFEST).read_text())["executorch"]["delegates"][method])


@pytest.mark.slow
def test_coreml_and_vulkan_lowering_succeeds(llava, tmp_path):
    pytest.importorskip("coremltools", reason="the Core ML target needs coremltools")
    from PIL import Image

    loaded = load_model(llava.path)
    out = export_bundle(loaded, "executorch-coreml", tmp_path / "coreml", progress=False)
    assert "CoreMLBackend" in delegate_ids(out, "vision_encoder")
    assert "XnnpackBackend" in delegate_ids(out, "text_decoder")
    runner = ExecuTorchRunner(out)  # the pip runtime has no Core ML: text runs, an image is a clear error
    assert runner.generate("hi", max_new_tokens=2).token_ids
    with pytest.raises(EdgeMLLMError, match="vision_encoder runs on CoreMLBackend, which the installed executorch"):
        runner.generate("What is it?", [Image.new("RGB", (20, 20))], max_new_tokens=2)
    out = export_bundle(loaded, "executorch-vulkan", tmp_path / "vulkan", progress=False)
    assert "VulkanBackend" in delegate_ids(out, "vision_encoder")
    assert "VulkanBackend" in delegate_ids(out, "text_decoder")
    with pytest.raises(EdgeMLLMError, match="text_decoder runs on VulkanBackend"):
        ExecuTorchRunner(out).generate("hi", max_new_tokens=2)


@pytest.mark.slow
def test_export_is_deterministic(fp32_bundle, mobilevlm_v2, tmp_path):
    _, first = fp32_bundle
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = export_bundle(load_model(mobilevlm_v2.path), "executorch", tmp_path / "again", progress=False)
    # torch's deprecation notices from inside ExecuTorch (dozens per export) do not reach the user
    assert not [w for w in caught if any(re.search(notice, str(w.message)) for notice in et_program.LIBRARY_NOTICES)]
    assert (again / "model.pte").read_bytes() == (first / "model.pte").read_bytes()
    assert (again / MANIFEST).read_text() == (first / MANIFEST).read_text()


@pytest.mark.slow
def test_native_8da4w_matches_torchaos_model_in_pytorch(llava, tmp_path, test_image):
    """``--quant 8da4w`` is torchao's quantizer: the bundle must compute what torchao's quantized
    modules compute eagerly (comparing with the float model would measure quantization, not export)."""
    from edge_mllm.export.executorch.modules import TextDecoder, TokenEmbedding
    from edge_mllm.export.executorch.quantize import apply_native, parse_native

    loaded = load_model(llava.path)
    out = export_bundle(loaded, "executorch", tmp_path / "native", quant="8da4w", progress=False)
    assert json.loads((out / MANIFEST).read_text())["quantization"] == "8da4w"
    runner = ExecuTorchRunner(out)
    lm = loaded.model.eval().language_model
    embedding, decoder = TokenEmbedding(lm), TextDecoder(lm, runner.max_seq_len)
    apply_native(decoder, embedding, parse_native("8da4w"))

    ids = prompt_ids(Pipeline(loaded))
    text_ids = [t for t in ids if t != IMAGE_TOKEN_INDEX]
    with torch.inference_mode():  # the bundle keeps the embedding's scales in fp16
        assert torch.allclose(embedding(torch.tensor([text_ids]))[0], runner.embed_tokens(text_ids), rtol=1e-3)
    tokens = runner.generate(ids, [test_image], max_new_tokens=16, stop_token_ids=()).token_ids
    actual = runtime_logits(runner, ids, [test_image], tokens)
    embeds = runner.embed_prompt(ids, [test_image])  # the fp32 vision path is tested above
    expected = []
    with torch.inference_mode():
        expected.append(decoder(embeds.unsqueeze(0), torch.tensor([0]))[0])
        for i, tok in enumerate(tokens[:-1]):
            expected.append(decoder(embedding(torch.tensor([[tok]])), torch.tensor([embeds.shape[0] + i]))[0])
    agree = sum(int(a.argmax()) == int(e.argmax()) for a, e in zip(actual, expected, strict=True)) / len(tokens)
    assert agree >= 0.95, agree
    worst = max(float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True))
    assert worst < 0.05 * max(float(e.abs().max()) for e in expected), worst


@pytest.mark.slow
def test_default_model_bundle_matches_pytorch(tmp_path):
    from executorch.extension.llm.runner import GenerationConfig, make_image_input, make_token_input
    from PIL import Image

    loaded = load_model(None)
    pipe = Pipeline(loaded)
    image = Image.new("RGB", (336, 336), (200, 30, 30))
    out = export_bundle(loaded, "executorch", tmp_path / "default", progress=False)
    runner = ExecuTorchRunner(out)
    # the manifest states the .pte's KV cache (the model's 8192 positions are capped at 2048)
    assert json.loads((out / MANIFEST).read_text())["max_seq_len"] == runner.max_seq_len == 2048
    ids = prompt_ids(pipe)
    ref = pipe.generate(QUESTION, [image], max_new_tokens=24)
    got = runner.generate(ids, [image], max_new_tokens=24)
    assert got.token_ids == ref.token_ids

    tokens = runner.generate(ids, [image], max_new_tokens=8, stop_token_ids=()).token_ids
    expected = reference_logits(pipe, ids, [image], tokens)
    actual = runtime_logits(runner, ids, [image], tokens)
    assert max(float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True)) < 1e-3

    k = ids.index(IMAGE_TOKEN_INDEX)
    text = multimodal_runner(out).generate_text(
        [make_token_input(ids[:k]), make_image_input(pipe.image_processor.rgb(image)), make_token_input(ids[k + 1:])],
        GenerationConfig(max_new_tokens=24, temperature=0.0, echo=False),
    )
    assert text.strip().startswith(ref.text.strip()[:20])
