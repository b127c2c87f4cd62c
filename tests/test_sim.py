"""Device profiles and the roofline simulator: math on hand-checked cases, profile sources, errors, CLI.

Nothing here loads a model or touches the network; the host measurement takes about a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_mllm.config import MLLMConfig, ProjectorConfig, TextConfig, VisionConfig
from edge_mllm.errors import ConfigError
from edge_mllm.sim.backends import BACKENDS, Backend, Efficiency, get_backend
from edge_mllm.sim.formats import F32, WeightFormat, WeightPlan, bundle_weight_plan, weight_plan
from edge_mllm.sim.predict import MIB, Scenario, simulate
from edge_mllm.sim.profiles import ISA, Cluster, DeviceProfile, device_names, get_device, load_data
from edge_mllm.sim.shapes import ModelShape, shape_from_config, shape_from_hf_config

ROOT = Path(__file__).resolve().parents[1]
INT8_4BIT = WeightFormat("4-bit", 4, "int8")  # exactly half a byte per weight: easy arithmetic


def toy_device(peak_gbs: float = 10.0, budget_gb: float = 1.0) -> DeviceProfile:
    """4 cores at 1 GHz with one 128-bit pipe and dotprod: 32 int8 GOPS per core, 128 in all."""
    return DeviceProfile(
        key="toy", name="toy", vendor="test", reference_device="none",
        clusters=(Cluster("toy-core", 4, 1.0, 1.0),), isa=ISA(dotprod=True, i8mm=False, sve=False),
        memory_type="LPDDR5", peak_gbs=peak_gbs, ram_gb=2 * budget_gb, app_budget_gb=budget_gb,
        gpu=None, npu=None, data={"memory": {"peak_gbs": {"value": peak_gbs, "source": "test"}}},
    )


TOY_BACKEND = Backend("toy", "cpu", "gguf", compute=0.5, bandwidth=0.5, kv_bytes=2, overhead_mib=10,
                      calibration="test")


def toy_shape(block: int = 100_000_000, vocab: int = 1000, hidden: int = 1000, kv: int = 0) -> ModelShape:
    return ModelShape(name="toy", hidden=hidden, ffn=hidden, heads=1, vocab=vocab, tied_embeddings=True,
                      block_params=(block,), kv_values_per_token=kv, attention_flops_per_pair=0, max_context=4096)


TOY_PLAN = WeightPlan("4-bit", INT8_4BIT, INT8_4BIT, None, F32)


def tiny_mllm_config(image_size: int = 56, width: int = 64, ffn: int = 128, layers: int = 2) -> MLLMConfig:
    """A 2-layer LLaMA behind a CLIP tower (14 px patches) and LDPv2."""
    return MLLMConfig(text=TextConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4),
                      vision=VisionConfig(image_size=image_size, patch_size=14, hidden_size=width,
                                          intermediate_size=ffn,
                                          num_hidden_layers=layers, num_attention_heads=4),
                      projector=ProjectorConfig(type="ldpv2"))


def test_decode_is_bandwidth_bound_bytes_over_attainable_bandwidth():
    # 1e8 block weights + 1e6 LM-head weights at 4 bits = 50.5 MB per token; 10 GB/s x 0.5 = 5 GB/s
    # → 99.0 tok/s. Compute would allow 128e9 x 0.5 / 2.02e8 FLOPs = 317 tok/s on 4 threads.
    p = simulate(toy_shape(), TOY_PLAN, toy_device(), TOY_BACKEND, Scenario(prompt_tokens=10, images=0, threads=4))
    assert p.decode_bound == "memory"
    assert p.decode_tok_s == pytest.approx(5e9 / 50.5e6)


def test_decode_turns_compute_bound_on_one_thread():
    # 1 thread: 32e9 x 0.5 = 16e9 op/s for 2.02e8 FLOPs → 79.2 tok/s, below the 99 tok/s bandwidth bound
    p = simulate(toy_shape(), TOY_PLAN, toy_device(), TOY_BACKEND, Scenario(prompt_tokens=10, images=0, threads=1))
    assert p.decode_bound == "compute"
    assert p.decode_tok_s == pytest.approx(16e9 / 2.02e8)


def test_prefill_is_compute_bound_flops_over_attainable_compute():
    # 100 tokens x 2e8 FLOPs + one LM-head row (2e6) = 2.0002e10 FLOPs at 64e9 op/s (4 threads x 32 x 0.5)
    p = simulate(toy_shape(), TOY_PLAN, toy_device(), TOY_BACKEND, Scenario(prompt_tokens=100, images=0, threads=4))
    seconds = 2.0002e10 / 64e9
    assert p.prefill_tok_s == pytest.approx(100 / seconds)
    assert p.ttft_s == pytest.approx(seconds)
    assert p.vision_encode_s is None


def test_prefill_counts_causal_attention_and_the_kv_cache():
    shape = toy_shape(kv=1000)
    shape = ModelShape(**{**shape.__dict__, "attention_flops_per_pair": 1000})
    p = simulate(shape, TOY_PLAN, toy_device(), TOY_BACKEND, Scenario(prompt_tokens=100, images=0, threads=4))
    flops = 100 * 2e8 + 1000 * 100 * 101 / 2 + 2e6
    assert p.prefill_tok_s == pytest.approx(100 / (flops / 64e9))
    assert p.memory.kv_cache_mib == pytest.approx(1000 * 4096 * 2 / MIB)  # positions x values x 2 bytes


def test_memory_fit_sums_weights_kv_activations_and_overhead():
    shape = toy_shape()
    p = simulate(shape, TOY_PLAN, toy_device(budget_gb=1.0), TOY_BACKEND, Scenario(prompt_tokens=10, images=0))
    weights = (1e8 + 1e6) * 0.5  # tied: the embedding is stored once
    assert p.memory.weights_mib == pytest.approx(weights / MIB)
    m = p.memory
    assert m.peak_mib == pytest.approx(m.weights_mib + m.kv_cache_mib + m.activations_mib + 10)
    assert m.fits and m.budget_mib == pytest.approx(1e9 / MIB)
    small = simulate(shape, TOY_PLAN, toy_device(budget_gb=0.05), TOY_BACKEND, Scenario(prompt_tokens=10, images=0))
    assert not small.memory.fits


def test_vision_encode_adds_to_ttft_and_image_tokens_to_prefill():
    config = tiny_mllm_config()
    shape = shape_from_config(config, "tiny")
    assert shape.vision.image_tokens == 4  # a 4x4 grid pooled 2x2
    p = simulate(shape, TOY_PLAN, toy_device(), TOY_BACKEND, Scenario(prompt_tokens=10, images=2))
    assert p.prefill_tokens == 10 + 2 * 4
    assert p.ttft_s == pytest.approx(2 * p.vision_encode_s + p.prefill_tokens / p.prefill_tok_s)


def test_core_ml_runs_vision_on_the_neural_engine_and_the_decoder_on_xnnpack():
    config = tiny_mllm_config(image_size=336, width=256, ffn=1024, layers=6)
    shape = shape_from_config(config, "tiny", max_context=512)
    plan = weight_plan("8da4w", "executorch", shape.tied_embeddings)
    a17 = get_device("apple-a17-pro")
    scenario = Scenario(prompt_tokens=20, threads=2)
    coreml = simulate(shape, plan, a17, BACKENDS["executorch-coreml"], scenario)
    xnnpack = simulate(shape, plan, a17, BACKENDS["executorch-xnnpack"], scenario)
    assert (coreml.backend, coreml.decoder_backend, coreml.threads) == ("executorch-coreml", "executorch-xnnpack", 2)
    # the decoder is XNNPACK's either way: same decode, same KV cache
    assert coreml.decode_tok_s == pytest.approx(xnnpack.decode_tok_s)
    assert coreml.memory.kv_cache_mib == pytest.approx(xnnpack.memory.kv_cache_mib)
    # vision: fp16 on the Neural Engine (35 TOPS int8 → 17.5 TFLOPS fp16, an estimate) at the assumed factor,
    # its weights converted to fp16
    ane = 17.5e12 * BACKENDS["executorch-coreml"].compute
    assert coreml.vision_encode_s == pytest.approx(max(shape.vision.flops / ane,
                                                       shape.vision.params * 2 / (a17.peak_gbs * 1e9 * 0.53)))
    assert coreml.attainable_compute_gops["vision fp16"] == pytest.approx(ane / 1e9)
    assert coreml.vision_encode_s < xnnpack.vision_encode_s
    assert xnnpack.memory.weights_mib - coreml.memory.weights_mib == pytest.approx(shape.vision.params * 2 / MIB)
    said = " ".join(coreml.notes)
    assert "vision encoder in fp16 on the Apple Neural Engine (16-core), prefill and decode on executorch-xnnpack" \
        in said
    assert "fp16 peak is an estimate" in said
    with pytest.raises(ConfigError, match="--threads must be 1..6"):
        simulate(shape, plan, a17, BACKENDS["executorch-coreml"], Scenario(threads=7))


def test_mobilevlm_shape_matches_published_parameter_counts():
    config = MLLMConfig(text=TextConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                        num_hidden_layers=24, num_attention_heads=16),
                        vision=VisionConfig(), projector=ProjectorConfig(type="ldp"))
    shape = shape_from_config(config, "MobileVLM-1.7B")
    # llama.cpp's log: "model params 1.36 B"; MobileVLM notes: LDP for width 2048 has ~18.94M params
    assert sum(shape.block_params) + 2 * shape.embedding_params == pytest.approx(1.36e9, rel=0.01)
    ldp = shape.vision.params - (3 * 14 * 14 * 1024 + 23 * (4 * 1024**2 + 2 * 1024 * 4096))
    assert ldp == pytest.approx(18.94e6, rel=0.01)
    assert shape.vision.image_tokens == 144


def test_llava_config_without_vision_config_gets_transformers_default_tower():
    from transformers import LlavaConfig

    text = {"model_type": "llama", "vocab_size": 32064, "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 2, "num_attention_heads": 4}
    implicit = shape_from_hf_config({"model_type": "llava", "text_config": text}, "llava")
    explicit = shape_from_hf_config(
        {"model_type": "llava", "text_config": text, "vision_config": LlavaConfig().vision_config.to_dict()}, "llava")
    assert implicit.vision is not None
    assert implicit.vision == explicit.vision
    assert implicit.vision.image_tokens == (336 // 14) ** 2


def test_hybrid_config_only_full_attention_layers_cache_keys_and_values():
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 100, "layer_types": ["linear_attention"] * 3 + ["full_attention"],
           "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 8,
           "linear_value_head_dim": 8, "tie_word_embeddings": True}
    shape = shape_from_hf_config({"text_config": cfg}, "hybrid")
    assert shape.kv_values_per_token == 2 * 1 * 2 * 16
    assert shape.recurrent_state_values == 3 * (2 * 8 * 8 + 3 * (2 * 2 * 8 + 2 * 8))
    assert len(shape.block_params) == 4


@pytest.mark.parametrize("quant,family,bits", [
    ("q4_0", "gguf", 4.5), ("q8_0", "gguf", 8.5), ("awq-w4-g32", "gguf", 4.5), ("rtn-w4-g32-min", "gguf", 5.0),
    ("awq-w4-g32", "onnx", 5.0), ("rtn-w4-g32-asym", "onnx", 5.125), ("rtn-w4-g32-min", "onnx", 6.0),
    ("8da4w-g128", "executorch", 4.25), ("8da4w", "executorch", 5.0), ("ort-int4-g64", "onnx", 4.5),
])
def test_weight_plans_count_scales_per_group(quant, family, bits):
    assert weight_plan(quant, family, tied=True).blocks.bits == pytest.approx(bits)


def test_mixed_schemes_keep_edge_blocks_and_embedding_at_8_bits():
    plan = weight_plan("gptq-w4-g32-mixed", "gguf", tied=False)
    assert plan.edge_blocks.bits == plan.embedding.bits == plan.lm_head.bits == pytest.approx(8.5)
    assert weight_plan(None, "gguf", tied=True).blocks.compute == "fp16"
    assert weight_plan(None, "executorch", tied=True).vision is F32


def test_two_digit_activations_read_the_4bit_weights_twice():
    """An ExecuTorch bundle with two-digit activations holds each 4-bit GEMM's codes twice (high and
    low digit): its decoder blocks and LM head read twice the bytes; 8-bit parts and other formats do not."""
    one = bundle_weight_plan({"quantization": "rtn-w4-g32-mixed", "executorch": {}}, "executorch", tied=True)
    two = bundle_weight_plan({"quantization": "rtn-w4-g32-mixed", "executorch": {"two_digit_activations": True}},
                             "executorch", tied=True)
    assert two.blocks.bits == 2 * one.blocks.bits and "two-digit" in two.blocks.name
    assert two.edge_blocks == one.edge_blocks and two.lm_head.bits == one.embedding.bits  # the 8-bit parts
    four = weight_plan("rtn-w4-g32", "executorch", tied=True, two_digit_activations=True)
    assert four.lm_head.bits == 2 * weight_plan("rtn-w4-g32", "executorch", tied=True).embedding.bits
    assert weight_plan("rtn-w4-g32", "gguf", tied=True, two_digit_activations=True) == weight_plan(
        "rtn-w4-g32", "gguf", tied=True)


def test_every_profile_loads_and_every_number_has_a_source():
    data = load_data()
    sources = data["sources"]

    def walk(node, path):
        if isinstance(node, dict):
            if "value" in node:
                assert node.get("source") in sources, f"{path}: source {node.get('source')!r} is not in sources"
                assert sources[node["source"]].strip(), path
                if node.get("estimate"):
                    assert "estimate" in sources[node["source"]] or "derived" in sources[node["source"]], path
                return
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
        else:
            # a bare number anywhere in a profile would be a number without its source (flags are not numbers)
            assert isinstance(node, bool) or not isinstance(node, int | float), f"{path}: bare {node!r}"

    walk(data["core_types"], "core_types")
    walk(data["devices"], "devices")
    names = device_names()
    assert len(names) >= 10 and names[-1] == "host"
    for name in names[:-1]:
        device = get_device(name)
        assert device.peak_gbs > 0 and device.app_budget_gb < device.ram_gb
        assert device.cpu_gops("int8", device.big_cores) > device.cpu_gops("fp32", device.big_cores) > 0
    for needed in ("snapdragon-888", "snapdragon-8-gen-1", "snapdragon-8-gen-2", "snapdragon-8-gen-3",
                   "snapdragon-8-elite", "dimensity-9300", "tensor-g3", "apple-a17-pro", "jetson-agx-orin"):
        assert needed in names


def test_host_is_measured():
    host = get_device("host")
    assert host.cores >= 1 and host.peak_gbs > 0.1 and 0 < host.app_budget_gb <= host.ram_gb
    assert host.cpu_gops("fp32", 1) > 0.1
    assert host.data["memory"]["peak_gbs"]["source"].startswith("measured")


def test_host_cpu_peak_is_the_phones_arithmetic(monkeypatch):
    """Clock x SIMD pipes x operations per pipe, as for phones, so phone-fitted factors apply; a
    machine without a readable clock falls back to the measured matmul rate."""
    from edge_mllm.sim import host as host_module

    flags = {"fma", "avx", "avx2"}  # an AVX2 x86 core: 2 FMA pipes x 256 bits = 4 128-bit pipes
    monkeypatch.setattr(host_module, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(host_module, "_clock_ghz", lambda: (3.0, "test"))
    host_module.host_profile.cache_clear()
    try:
        host = host_module.host_profile()
        assert host.cpu_gops("fp32", 1) == pytest.approx(8 * 4 * 3.0)
        assert host.cpu_gops("fp16", 1) == host.cpu_gops("fp32", 1)  # no AVX512-FP16: converted to fp32
        assert host.cpu_gops("int8", 1) == pytest.approx(16 * 4 * 3.0)  # vpmaddubsw, no VNNI
        flags |= {"avx512f", "avx512_vnni"}
        host_module.host_profile.cache_clear()
        assert host_module.host_profile().cpu_gops("int8", 2) == pytest.approx(2 * 32 * 8 * 3.0)
        monkeypatch.setattr(host_module, "_clock_ghz", lambda: None)
        host_module.host_profile.cache_clear()
        fallback = host_module.host_profile()
        measured = fallback.data["cpu"][0]["fp32_gflops_per_core"]["value"]
        assert fallback.cpu_gops("fp32", 1) == pytest.approx(measured, abs=0.01)
    finally:
        host_module.host_profile.cache_clear()


def test_unknown_device_and_backend_list_the_valid_names():
    with pytest.raises(ConfigError, match="snapdragon-8-gen-3.*host"):
        get_device("pixel-99")
    with pytest.raises(ConfigError, match="llama.cpp.*executorch-xnnpack"):
        get_backend("tflite")


def test_backends_refuse_devices_they_do_not_run_on():
    shape = toy_shape()
    with pytest.raises(ConfigError, match="apple"):
        simulate(shape, TOY_PLAN, get_device("snapdragon-8-gen-3"), BACKENDS["executorch-coreml"])
    with pytest.raises(ConfigError, match="NVIDIA"):
        simulate(shape, TOY_PLAN, get_device("snapdragon-8-gen-3"), BACKENDS["llama.cpp-cuda"])
    with pytest.raises(ConfigError, match="no published NPU"):
        simulate(shape, TOY_PLAN, get_device("snapdragon-8-gen-3"), BACKENDS["executorch-qnn"])
    with pytest.raises(ConfigError, match="--threads must be 1..8"):
        simulate(shape, TOY_PLAN, get_device("snapdragon-888"), BACKENDS["llama.cpp"], Scenario(threads=9))


def test_cpu_backends_use_the_factors_of_the_devices_architecture():
    x86 = dataclasses.replace(toy_device(), cpu_arch="x86_64")
    both = dataclasses.replace(TOY_BACKEND, x86_64=Efficiency(compute=0.25, bandwidth=0.2, overhead_mib=30,
                                                               calibration="x86 test"))
    scenario = Scenario(prompt_tokens=10, images=0, threads=4)
    arm = simulate(toy_shape(), TOY_PLAN, toy_device(), both, scenario)
    assert arm.decode_tok_s == pytest.approx(10e9 * 0.5 / 50.5e6) and arm.memory.overhead_mib == 10
    on_x86 = simulate(toy_shape(), TOY_PLAN, x86, both, scenario)
    assert on_x86.decode_tok_s == pytest.approx(10e9 * 0.2 / 50.5e6) and on_x86.memory.overhead_mib == 30
    assert on_x86.attainable_compute_gops["int8"] == pytest.approx(128 * 0.25)
    assert not any("assumed" in note for note in on_x86.notes)
    # no x86 set: the arm64 factors, said to be assumed
    fallback = simulate(toy_shape(), TOY_PLAN, x86, TOY_BACKEND, scenario)
    assert fallback.decode_tok_s == pytest.approx(arm.decode_tok_s)
    assert any("not calibrated on x86_64" in note for note in fallback.notes)
    assert both.on(x86).on(x86) == both.on(x86)


def test_host_fit_recovers_the_factors_a_run_was_made_with(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sim_validation

    x86 = dataclasses.replace(toy_device(), cpu_arch="x86_64")
    truth = Efficiency(compute=0.3, bandwidth=0.4, overhead_mib=50, calibration="truth")
    monkeypatch.setitem(sim_validation.BACKENDS, "toy", dataclasses.replace(TOY_BACKEND, x86_64=truth))
    scenario = Scenario(prompt_tokens=100, images=0, threads=4)
    made = simulate(toy_shape(), TOY_PLAN, x86, sim_validation.BACKENDS["toy"], scenario)
    monkeypatch.setitem(sim_validation.BACKENDS, "toy", TOY_BACKEND)  # start the fit from the arm64 factors
    measured = {"prefill_tok_s": made.prefill_tok_s, "decode_tok_s": made.decode_tok_s,
                "peak_mib": made.memory.peak_mib}
    rows = [sim_validation.Row("toy run", toy_shape(), TOY_PLAN, x86, "toy", scenario, measured, "test",
                               role="host, fit")]
    fitted = sim_validation.fit(rows)["toy (x86_64)"]
    assert fitted == pytest.approx({"compute": 0.3, "bandwidth": 0.4, "overhead_mib": 50})
    assert "toy" not in sim_validation.fit(rows)  # the arm64 factors are not touched by x86 rows


def test_published_rows_are_within_30_percent(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sim_validation

    table = sim_validation.results(sim_validation.ROWS)
    published = [r for r in table if r["set"] == "published"]
    assert len(published) == 13
    assert all(r["within"] for r in published), [(r["row"], r["metric"], r["ratio"]) for r in published]


# --- CLI -----------------------------------------------------------------------------------------

HYBRID_CONFIG = {"model_type": "qwen3_5_text", "hidden_size": 2048, "intermediate_size": 6144,
                 "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "vocab_size": 248320,
                 "tie_word_embeddings": True, "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6,
                 "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128,
                 "linear_value_head_dim": 128, "max_position_embeddings": 32768}


def edge_mllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_mllm.cli", *args], capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())


def test_cli_simulate_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HYBRID_CONFIG))
    proc = edge_mllm("simulate", "--config", str(tmp_path / "config.json"), "--quant", "q4_k_m",
                     "--device", "snapdragon-8-gen-2", "--threads", "5", "--prompt-tokens", "200", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["device"] == "snapdragon-8-gen-2" and out["backend"] == "llama.cpp" and out["threads"] == 5
    assert out["images"] == 0 and out["prefill_tokens"] == 200
    assert out["decode_tok_s"] > 0 and out["memory"]["fits"] is True


def test_cli_simulate_bundle(tmp_path):
    config = tiny_mllm_config()
    manifest = {"format": "executorch", "quantization": "8da4w", "model": config.to_dict(), "max_seq_len": 256}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    proc = edge_mllm("simulate", str(tmp_path), "--device", "apple-a17-pro", "--prompt-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    assert "executorch-xnnpack" in proc.stdout and "vision encode" in proc.stdout and "fits" in proc.stdout
    proc = edge_mllm("simulate", str(tmp_path), "--device", "apple-a17-pro", "--backend", "llama.cpp")
    assert proc.returncode == 2 and "runs gguf bundles, not this executorch bundle" in proc.stderr
    (tmp_path / "manifest.json").write_text("{not json")
    proc = edge_mllm("simulate", str(tmp_path), "--device", "apple-a17-pro")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


def test_cli_usage_errors_list_valid_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HYBRID_CONFIG))
    proc = edge_mllm("simulate", "--config", str(tmp_path), "--quant", "q4_0", "--device", "iphone-99")
    assert proc.returncode == 2 and "apple-a17-pro" in proc.stderr and "Traceback" not in proc.stderr
    proc = edge_mllm("simulate", "--config", str(tmp_path), "--quant", "q4_0", "--device", "host", "--backend", "x")
    assert proc.returncode == 2 and "executorch-xnnpack" in proc.stderr
    proc = edge_mllm("simulate", "--config", str(tmp_path), "--quant", "q9_9", "--device", "tensor-g3")
    assert proc.returncode == 2 and "q4_k_m" in proc.stderr
    proc = edge_mllm("simulate", "--device", "tensor-g3")
    assert proc.returncode == 2 and "BUNDLE" in proc.stderr
    proc = edge_mllm("simulate", "--config", str(tmp_path), "--quant", "q4_0", "--device", "tensor-g3", "--images", "2")
    assert proc.returncode == 2 and "has no vision encoder: it takes no images" in proc.stderr
    proc = edge_mllm("simulate", "--config", str(tmp_path), "--quant", "q4_0", "--device", "tensor-g3",
                     "--context", "40000")
    assert proc.returncode == 2 and "past" in proc.stderr and "32768 positions" in proc.stderr


def test_cli_devices_json():
    proc = edge_mllm("devices", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["devices"]) >= 10 and "host" in out["devices"] and out["sources"]
    assert out["devices"]["snapdragon-888"]["npu"]["int8_tops"] == {"value": 26, "source": "sd888-npu"}
