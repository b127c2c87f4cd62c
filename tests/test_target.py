"""``edge-mllm export --target DEVICE``: the picks per device profile (format, quantization, threads,
max context), explicit --format/--quant overriding them, the plan recorded in the manifest without
touching its file list, and the prediction printed. Exports are the tiny LLaVA as GGUF / ONNX (and one
ExecuTorch export with the phone picks)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edge_mllm.checkpoint import load_model
from edge_mllm.cli import main
from edge_mllm.config import MLLMConfig
from edge_mllm.errors import EdgeMLLMError
from edge_mllm.fsutil import sha256
from edge_mllm.sim.profiles import get_device
from edge_mllm.sim.target import DEFAULT_SCHEME, EXECUTORCH_SCHEME, plan_target


def no_sdk(fmt: str) -> str:
    return f"no SDK for {fmt} here"


def every_sdk(_fmt: str) -> None:
    return None


@pytest.fixture(scope="module")
def config(llava):
    return load_model(llava.path).model.config


def test_snapdragon_picks_xnnpack_8da4w_codes_without_qnn_and_qnn_with_it(config):
    device = get_device("snapdragon-8-gen-3")
    plan = plan_target(device, config, "m", available=no_sdk)
    assert (plan.format, plan.backend, plan.quant) == ("executorch", "executorch-xnnpack", EXECUTORCH_SCHEME)
    assert plan.threads == 6 and plan.threads == device.big_cores  # 1 X4 + 5 A720, not the A520s
    assert plan.max_context == config.text.max_position_embeddings  # 256: fits easily
    assert "QNN" in plan.reasons["format"] and "SmoothQuant" in plan.reasons["quant"]
    # the user's choices win: a given scheme or format keeps its own codes
    assert plan_target(device, config, "m", quant=DEFAULT_SCHEME, available=no_sdk).quant == DEFAULT_SCHEME
    assert plan_target(device, config, "m", fmt="gguf", available=no_sdk).quant == DEFAULT_SCHEME
    assert plan_target(device, config, "m", quantized="gptq-w4-g32", available=no_sdk).quant is None
    assert plan_target(device, config, "m", available=every_sdk).format == "executorch-qnn"
    # a model trained on a 4-bit grid (quantization-aware LoRA) exports on that grid, unless told otherwise
    trained = dataclasses.replace(config, weight_grid="rtn-w4-g32-min")
    plan = plan_target(device, trained, "m", available=no_sdk)
    assert plan.quant == "rtn-w4-g32-min" and "trained on" in plan.reasons["quant"]
    assert "fp32" in plan.reasons["quant"]  # ExecuTorch: all 4-bit, and why
    # GGUF and ONNX (float activations): the grid, with the embedding and first/last blocks at 8 bits
    for fmt in ("gguf", "onnx"):
        plan = plan_target(device, trained, "m", fmt=fmt, available=no_sdk)
        assert plan.quant == "rtn-w4-g32-min-mixed" and "trained on" in plan.reasons["quant"]
        assert "8 bits" in plan.reasons["quant"] and "fp32" not in plan.reasons["quant"]
    jetson = plan_target(get_device("jetson-agx-orin"), trained, "m", available=no_sdk)
    assert (jetson.format, jetson.quant) == ("gguf", "rtn-w4-g32-min-mixed")
    mixed_grid = dataclasses.replace(config, weight_grid="rtn-w4-g32-min-mixed")
    assert plan_target(device, mixed_grid, "m", fmt="gguf", available=no_sdk).quant == "rtn-w4-g32-min-mixed"
    assert plan_target(device, trained, "m", fmt="gguf", quant="rtn-w4-g32-min",
                       available=no_sdk).quant == "rtn-w4-g32-min"  # given: kept
    assert plan_target(device, trained, "m", quant=DEFAULT_SCHEME, available=no_sdk).quant == DEFAULT_SCHEME
    assert MLLMConfig.from_dict(trained.to_dict()).weight_grid == "rtn-w4-g32-min"


def test_other_devices(config):
    assert plan_target(get_device("apple-a17-pro"), config, "m", available=every_sdk).format == "executorch-coreml"
    apple = plan_target(get_device("apple-a17-pro"), config, "m", available=no_sdk)
    assert apple.format == "executorch" and "Core ML cannot be lowered here" in apple.reasons["format"]
    jetson = plan_target(get_device("jetson-agx-orin"), config, "m", available=no_sdk)
    assert (jetson.format, jetson.backend, jetson.threads) == ("gguf", "llama.cpp", 12)
    host = get_device("host")
    plan = plan_target(host, config, "m", available=no_sdk)
    assert plan.threads == host.cores and host.cpu_arch in plan.reasons["format"]


def test_cpu_devices_get_the_runtime_predicted_to_decode_faster_on_their_architecture(config):
    # arm64 (published phone rows): XNNPACK reaches twice llama.cpp's share of the bandwidth;
    # x86-64 (bundle runs on this project's host): llama.cpp's kernels decode faster than XNNPACK's
    tensor = get_device("tensor-g3")
    plan = plan_target(tensor, config, "m", available=no_sdk)
    assert (plan.format, plan.backend) == ("executorch", "executorch-xnnpack")
    assert "arm64 CPU: the simulator predicts the faster decode for executorch-xnnpack" in plan.reasons["format"]
    x86 = plan_target(dataclasses.replace(tensor, cpu_arch="x86_64"), config, "m", available=no_sdk)
    assert (x86.format, x86.backend) == ("gguf", "llama.cpp")
    assert "x86_64 CPU: the simulator predicts the faster decode for llama.cpp" in x86.reasons["format"]
    # a quantization only one format has decides the format
    k_quant = plan_target(tensor, config, "m", quant="q4_k_m", available=no_sdk)
    assert k_quant.format == "gguf" and "executorch cannot take this quantization" in k_quant.reasons["format"]


def test_explicit_choices_and_a_quantized_model_win(config):
    device = get_device("tensor-g3")
    plan = plan_target(device, config, "m", fmt="gguf", quant="q8_0", available=no_sdk)
    assert (plan.format, plan.quant) == ("gguf", "q8_0") and plan.reasons["format"] == "given (--format)"
    plan = plan_target(device, config, "m", quantized="awq-w4-g32", available=no_sdk)
    assert plan.quant is None and "awq-w4-g32" in plan.reasons["quant"]


def test_context_halves_until_the_memory_fits(config):
    roomy = plan_target(get_device("snapdragon-888"), config, "m", available=no_sdk)
    from edge_mllm.sim.target import predict_for

    def peak(ctx):
        return predict_for(config, "m", "executorch", DEFAULT_SCHEME, get_device("snapdragon-888"), 4, ctx).memory
    # a budget between the 128- and 256-position peaks: the plan must settle on 128
    budget_mib = (peak(128).peak_mib + peak(256).peak_mib) / 2
    tight = dataclasses.replace(get_device("snapdragon-888"), app_budget_gb=budget_mib * 2**20 / 1e9)
    assert roomy.max_context == 256
    assert plan_target(tight, config, "m", available=no_sdk).max_context == 128
    tiny = dataclasses.replace(tight, app_budget_gb=1e-3)
    with pytest.raises(EdgeMLLMError, match="does not fit"):
        plan_target(tiny, config, "m", available=no_sdk)


def test_two_digit_activations_are_predicted_slower_and_larger(config):
    from edge_mllm.sim.target import predict_for

    device = get_device("tensor-g3")
    one, two = (predict_for(config, "m", "executorch", DEFAULT_SCHEME, device, 4, 256, two_digit_activations=digits)
                for digits in (False, True))
    assert two.decode_tok_s < one.decode_tok_s and two.memory.peak_mib > one.memory.peak_mib
    assert two.prefill_tok_s < one.prefill_tok_s  # the GEMMs' reduction is twice as long


def test_cli_export_target_records_the_plan_and_prints_the_prediction(llava, tmp_path, capsys):
    out = tmp_path / "sd8g3"
    code = main(["export", str(llava.path), "--target", "snapdragon-8-gen-3", "--format", "gguf", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    target = manifest["target"]
    assert (target["device"], target["format"], target["quant"], target["threads"]) == \
        ("snapdragon-8-gen-3", "gguf", DEFAULT_SCHEME, 6)
    assert manifest["quantization"] == DEFAULT_SCHEME and manifest["format"] == "gguf"
    assert target["prediction"]["decode_tok_s"] > 0 and target["prediction"]["fits"] is True
    # the file list still describes exactly the files, byte for byte
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(listed) == on_disk
    assert all(sha256(out / p) == f["sha256"] for p, f in listed.items())
    assert "llama.cpp" in captured.out and "decode" in captured.out and "app budget" in captured.out
    assert "format       gguf: given (--format)" in captured.out


def test_cli_export_target_json_onnx_host(llava, tmp_path, capsys):
    out = tmp_path / "host"
    code = main(["export", str(llava.path), "--target", "host", "--format", "onnx", "--quant", "rtn-w8-g32",
                 "-o", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads(captured.out)
    assert manifest["target"]["backend"] == "onnxruntime" and manifest["target"]["quant"] == "rtn-w8-g32"
    assert manifest["target"]["threads"] == get_device("host").cores


def test_cli_export_usage_errors(llava, tmp_path, capsys):
    assert main(["export", str(llava.path), "--target", "iphone-99", "-o", str(tmp_path / "x")]) == 2
    assert "snapdragon-8-gen-3" in capsys.readouterr().err
    assert main(["export", str(llava.path), "-o", str(tmp_path / "x")]) == 2
    assert "--target" in capsys.readouterr().err


def test_cli_export_max_context_caps_the_bundle_not_the_model(llava, tmp_path, capsys):
    """--max-context is an exporter option: the bundle's context (manifest, llama.cpp's n_ctx in the
    GGUF) is capped; the loaded model keeps its own; with --target it wins over the plan's."""
    from edge_mllm.export.bundle import export_bundle
    from gguf import GGUFReader

    loaded = load_model(llava.path)
    own = loaded.model.config.text.max_position_embeddings
    out = export_bundle(loaded, "gguf", tmp_path / "capped", max_context=64, progress=False)
    assert json.loads((out / "manifest.json").read_text())["max_seq_len"] == 64
    field = GGUFReader(out / "model.gguf").get_field("llama.context_length")
    assert int(field.parts[field.data[0]][0]) == 64
    assert loaded.model.config.text.max_position_embeddings == own  # left as it was
    assert export_bundle(loaded, "gguf", tmp_path / "roomy", max_context=10 * own, progress=False) and \
        json.loads((tmp_path / "roomy" / "manifest.json").read_text())["max_seq_len"] == own  # never raised

    out = tmp_path / "target"
    assert main(["export", str(llava.path), "--target", "snapdragon-8-gen-3", "--format", "gguf",
                 "--max-context", "96", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["max_seq_len"] == manifest["target"]["max_context"] == 96
    assert "given (--max-context)" in capsys.readouterr().out
    assert main(["export", str(llava.path), "--format", "gguf", "--max-context", "0", "-o", str(tmp_path / "z")]) == 2


@pytest.mark.slow
def test_cli_export_target_phone_gets_smoothed_codes_in_executorch(llava, tmp_path, capsys):
    pytest.importorskip("executorch.runtime", reason="executorch is not installed")
    out = tmp_path / "tensor"
    assert main(["export", str(llava.path), "--target", "tensor-g3", "--two-digit-activations", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "executorch" and manifest["quantization"] == EXECUTORCH_SCHEME
    assert manifest["executorch"]["two_digit_activations"] is True
    assert manifest["executorch"]["quantization"]["source"] == EXECUTORCH_SCHEME
    assert "SmoothQuant" in manifest["target"]["reasons"]["quant"]
    assert f"quant        {EXECUTORCH_SCHEME}: our 4-bit codes" in capsys.readouterr().out
