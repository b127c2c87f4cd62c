"""Predicted vs published: ``edge-mllm simulate``'s roofline model against on-device measurements.

    python benchmarks/sim_validation.py [--fit] [--json] [--host BENCH_JSON [--host-fit NAME ...]]

Rows of set "published" are every row of ../shared/reference/published_numbers.md; the backends'
efficiency factors (edge_mllm/sim/backends.py) are fitted on them (``--fit`` prints the fit: per backend
and resource, the factor minimising the largest |log(predicted / published)|). Set "fit, notes" rows
come from the other reference notes and fit what no published row covers (onnxruntime's compute
factor, ExecuTorch's runtime memory overhead); "held out" rows, from the same notes, fit nothing.
Goal: every ratio within 0.7-1.3.

``--host BENCH_JSON`` adds rows for this host: each bundle of an ``edge-mllm bench --json`` run
predicted on the ``host`` profile (with the copy bandwidth that run measured) against what the run
measured here. Bundles named by ``--host-fit`` are set "host, fit": on an x86-64 host ``--fit`` fits
the backends' ``x86_64`` factors (and runtime overheads) on them; the others are "host, held out".

Model shapes are the published ones; where a row's source gives the model file's size, the bits per
weight are taken from it rather than from the quantization type's nominal rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edge_mllm.config import MLLMConfig, ProjectorConfig, TextConfig, VisionConfig
from edge_mllm.sim.backends import BACKENDS, Backend, Efficiency
from edge_mllm.sim.formats import F16, F32, GGUF_TYPES, WeightFormat, WeightPlan
from edge_mllm.sim.inputs import from_bundle
from edge_mllm.sim.predict import Prediction, Scenario, simulate
from edge_mllm.sim.profiles import DeviceProfile, get_device
from edge_mllm.sim.shapes import ModelShape, shape_from_config, shape_from_hf_config

TOLERANCE = 0.30
GIB = 2**30
# metric → (Prediction attribute, resource whose factor it calibrates, higher is faster)
METRICS = {
    "vision_s": ("vision_encode_s", "compute", False),
    "prefill_tok_s": ("prefill_tok_s", "compute", True),
    "ttft_s": ("ttft_s", "compute", False),
    "decode_tok_s": ("decode_tok_s", "bandwidth", True),
    "peak_mib": (None, "memory", False),
}

CLIP_L_336 = VisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                          num_hidden_layers=24, num_attention_heads=16, select_layer=-2)
# ../shared/reference/published_numbers.md and mobilevlm.md: MobileLLaMA-1.4B + CLIP ViT-L/14-336 + LDP
MOBILEVLM_17B = shape_from_config(MLLMConfig(
    text=TextConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                    num_attention_heads=16, max_position_embeddings=2048),
    vision=CLIP_L_336, projector=ProjectorConfig(type="ldp")), "MobileVLM-1.7B")
# published_numbers.md: Llama 3.2 1B (tied embeddings); Llama 3.2 3B / Llama 3 8B from their HF configs
LLAMA32_1B = shape_from_config(MLLMConfig(text=TextConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True)), "Llama 3.2 1B")
LLAMA32_3B = shape_from_config(MLLMConfig(text=TextConfig(
    vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True)), "Llama 3.2 3B")
LLAMA3_8B = shape_from_config(MLLMConfig(text=TextConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=2048)), "Llama 3 8B")
# llava-hf/llava-1.5-7b-hf: Vicuna-7B + CLIP ViT-L/14-336 (layer -2) + 2-layer MLP; ExecuTorch's export
# allocates 768 positions (executorch.md §1)
LLAVA15_7B = shape_from_config(MLLMConfig(
    text=TextConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=768),
    vision=CLIP_L_336, projector=ProjectorConfig(type="mlp2x_gelu")), "LLaVA-1.5 7B")
# Phi-3-mini (microsoft/Phi-3-mini-4k-instruct config)
PHI3_MINI = shape_from_config(MLLMConfig(text=TextConfig(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    max_position_embeddings=4096)), "Phi-3-mini")
# Qwen3.5-2B text model, spec from https://awesomeagents.ai/models/qwen-3-5-2b (24 layers = 6 x (3 Gated
# DeltaNet + 1 gated attention), hidden 2048, FFN 6144, DeltaNet 16 QK / 16 V heads of 128, attention
# 8 Q / 2 KV heads of 256, vocab 248320, tied)
QWEN35_2B = shape_from_hf_config({
    "model_type": "qwen3_5_text", "hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 256, "vocab_size": 248320, "tie_word_embeddings": True,
    "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6, "linear_num_key_heads": 16,
    "linear_num_value_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "max_position_embeddings": 262144}, "Qwen3.5-2B")


def _params(shape: ModelShape) -> int:
    head = 0 if shape.tied_embeddings else shape.embedding_params
    return sum(shape.block_params) + shape.embedding_params + head


def _from_file_size(label: str, shape: ModelShape, file_bytes: float) -> WeightFormat:
    return WeightFormat(label, 8 * file_bytes / _params(shape), "int8")


# Q4_K_S: llama.cpp's log for MobileLLaMA-1.4B says 4.64 BPW; mmproj F16 (llama.cpp MobileVLM doc)
MOBILEVLM_Q4KS = WeightPlan("Q4_K_S + mmproj F16", *(GGUF_TYPES["q4_k_s"],) * 3, F16)
# llama.cpp #26957: the Q4_K_M GGUF is 1.30 GiB
_QWEN_Q4KM = _from_file_size("Q4_K_M (1.30 GiB file)", QWEN35_2B, 1.30 * GIB)
QWEN_Q4KM = WeightPlan(_QWEN_Q4KM.name, _QWEN_Q4KM, _QWEN_Q4KM, None, F16)
# ExecuTorch Llama 3.2 SpinQuant: 8da4w group 32 linears (fp32 scales: 5 bits), 8-bit per-channel
# embedding and output (embedding_quantize "8,0"); the 1B .pte is 1,083 MiB, which this reproduces
_8DA4W_G32 = WeightFormat("8da4w g32", 4 + 32 / 32, "int8")
_8BIT = WeightFormat("8-bit per channel", 8, "int8")
SPINQUANT = WeightPlan("SpinQuant 8da4w g32, 8-bit embedding/output", _8DA4W_G32, _8BIT, _8BIT, F32)
BF16 = WeightPlan("bf16", GGUF_TYPES["bf16"], GGUF_TYPES["bf16"], GGUF_TYPES["bf16"], F32)
# llama_xnnpack.yaml: 8da4w group 128 linears (LM head included), 4-bit group-32 embedding
_8DA4W_G128 = WeightFormat("8da4w g128", 4 + 32 / 128, "int8")
LLAMA3_4BIT = WeightPlan("8da4w g128, 4-bit embedding", _8DA4W_G128, WeightFormat("4-bit g32", 5, "int8"),
                         _8DA4W_G128, F32)
# export_llava.py: 8da4w group 128 text decoder, 8-bit group-32 embedding, static int8 vision encoder
LLAVA_8DA4W = WeightPlan("8da4w g128, int8 vision", _8DA4W_G128, WeightFormat("8-bit g32", 9, "int8"),
                         _8DA4W_G128, WeightFormat("static int8", 8, "int8"))
# onnxruntime-genai Phi-3-mini int4 (RTN, block 32, MatMulNBits with accuracy level 4 = int8 compute)
PHI3_INT4 = WeightPlan("int4 g32", WeightFormat("int4 g32", 5, "int8"), F32, WeightFormat("int4 g32", 5, "int8"), F32)


@dataclass
class Row:
    label: str
    shape: ModelShape
    plan: WeightPlan
    device: str | DeviceProfile
    backend: str
    scenario: Scenario
    published: dict[str, float | tuple[float, float]]
    source: str
    role: str = "published"  # published | fit, notes | held out | host, fit | host, held out
    notes: list[str] = field(default_factory=list)


ROWS = [
    Row("MobileVLM-1.7B Q4_K_S, SD888, 4 threads", MOBILEVLM_17B, MOBILEVLM_Q4KS, "snapdragon-888", "llama.cpp",
        Scenario(prompt_tokens=102, threads=4),
        {"vision_s": 21.1, "prefill_tok_s": 19.7, "decode_tok_s": 14.1},
        "llama.cpp docs/multimodal/MobileVLM.md (246 prompt tokens incl. 144 image tokens)"),
    Row("MobileVLM-1.7B Q4_K_S, Jetson Orin CUDA", MOBILEVLM_17B, MOBILEVLM_Q4KS, "jetson-agx-orin", "llama.cpp-cuda",
        Scenario(prompt_tokens=102),
        {"vision_s": 0.30, "prefill_tok_s": (802, 1086), "decode_tok_s": 65.6},
        "llama.cpp docs/multimodal/MobileVLM.md; MobileVLM paper 65.3 tok/s"),
    Row("MobileVLM-1.7B 4-bit, SD888 CPU (paper)", MOBILEVLM_17B, MOBILEVLM_Q4KS, "snapdragon-888", "llama.cpp",
        Scenario(prompt_tokens=102), {"decode_tok_s": 21.5},
        "MobileVLM paper (arXiv 2312.16886); disagrees with the llama.cpp doc's 14.1"),
    Row("Llama 3.2 1B SpinQuant, OnePlus 12", LLAMA32_1B, SPINQUANT, "snapdragon-8-gen-3", "executorch-xnnpack",
        Scenario(prompt_tokens=64, images=0), {"prefill_tok_s": 260.5, "decode_tok_s": 50.2},
        "ExecuTorch examples/models/llama/README.md (prompt 64)"),
    Row("LLaVA-1.5 7B 8da4w, OnePlus 12", LLAVA15_7B, LLAVA_8DA4W, "snapdragon-8-gen-3", "executorch-xnnpack",
        Scenario(prompt_tokens=50), {"ttft_s": 14.6, "decode_tok_s": 8.9},
        "ExecuTorch examples/models/llava/README.md: 'prefill incl. image' = TTFT",
        notes=["text prompt length not published: ~50 tokens (system prompt + question) assumed"]),
    Row("Qwen3.5-2B Q4_K_M, Galaxy S23 Ultra, -t 5 -tb 8", QWEN35_2B, QWEN_Q4KM, "snapdragon-8-gen-2", "llama.cpp",
        Scenario(prompt_tokens=2000, images=0, threads=5, batch_threads=8, context=10240),
        {"prefill_tok_s": 72.7, "decode_tok_s": 15.48},
        "llama.cpp issue #26957, build b10092 (-t 5 for decode, -tb 8 for the ~2k-token prompt, -c 10240)"),
    # from the other reference notes: held out (fit nothing), or fitting what no published row covers
    Row("Llama 3.2 1B BF16, OnePlus 12", LLAMA32_1B, BF16, "snapdragon-8-gen-3", "executorch-xnnpack",
        Scenario(prompt_tokens=64, images=0), {"prefill_tok_s": 60.3, "decode_tok_s": 19.2},
        "ExecuTorch examples/models/llama/README.md", role="held out"),
    Row("Llama 3.2 3B SpinQuant, OnePlus 12", LLAMA32_3B, SPINQUANT, "snapdragon-8-gen-3", "executorch-xnnpack",
        Scenario(prompt_tokens=64, images=0), {"prefill_tok_s": 89.7, "decode_tok_s": 19.7},
        "ExecuTorch examples/models/llama/README.md", role="held out"),
    Row("Llama 3 8B 8da4w g128, OnePlus 12", LLAMA3_8B, LLAMA3_4BIT, "snapdragon-8-gen-3", "executorch-xnnpack",
        Scenario(prompt_tokens=64, images=0), {"decode_tok_s": 10.85},
        "ExecuTorch examples/models/llama/README.md", role="held out"),
    Row("Phi-3-mini int4, Galaxy S21 (SD888), 4 threads", PHI3_MINI, PHI3_INT4, "snapdragon-888", "onnxruntime",
        Scenario(prompt_tokens=128, images=0, threads=4), {"prefill_tok_s": 17.9},
        "onnxruntime PR #21380 (../shared/reference/onnx_nncf.md §2.4)", role="fit, notes",
        notes=["prompt length not published: 128 assumed; S21 also ships with an Exynos 2100"]),
    # memory: resident set of the 1B models (ExecuTorch's runtime overhead is set from these two)
    Row("Llama 3.2 1B SpinQuant RSS, OnePlus 12", LLAMA32_1B, SPINQUANT, "snapdragon-8-gen-3", "executorch-xnnpack",
        Scenario(prompt_tokens=64, images=0), {"peak_mib": 1921}, "ExecuTorch examples/models/llama/README.md",
        role="fit, notes", notes=["max_seq_len not published: 2048 assumed"]),
    Row("Llama 3.2 1B BF16 RSS, OnePlus 12", LLAMA32_1B, BF16, "snapdragon-8-gen-3", "executorch-xnnpack",
        Scenario(prompt_tokens=64, images=0), {"peak_mib": 3185}, "ExecuTorch examples/models/llama/README.md",
        role="fit, notes", notes=["max_seq_len not published: 2048 assumed"]),
]


def predicted(prediction: Prediction, metric: str) -> float:
    if metric == "peak_mib":
        return prediction.memory.peak_mib
    return getattr(prediction, METRICS[metric][0])


def published_value(value: float | tuple[float, float]) -> float:
    """A published range counts as its geometric midpoint."""
    return math.sqrt(value[0] * value[1]) if isinstance(value, tuple) else value


def _device(row: Row) -> DeviceProfile:
    return row.device if isinstance(row.device, DeviceProfile) else get_device(row.device)


def run_row(row: Row, backend: Backend | None = None) -> Prediction:
    return simulate(row.shape, row.plan, _device(row), backend or BACKENDS[row.backend], row.scenario)


def host_rows(bench_json: str, fit_names: tuple[str, ...] = ()) -> list[Row]:
    """One row per bundle of an ``edge-mllm bench --json`` run: what it measured on this host (set
    "host, fit" for the bundles named in ``fit_names``, else "host, held out")."""
    run = json.loads(Path(bench_json).read_text())
    # the host profile's copy bandwidth, as `simulate` measures it (runs before 2026-12-06 had only that one)
    machine = run["machine"]
    host = dataclasses.replace(get_device("host"), peak_gbs=machine.get("host_profile_gbs", machine["bandwidth_gbs"]))
    rows = []
    for result in run["results"]:
        shape, plan, backend = from_bundle(Path(result["path"]))
        image_tokens = shape.vision.image_tokens if shape.vision is not None else 0
        measured = {"vision_s": result["vision_encode_ms"] / 1e3, "prefill_tok_s": result["prefill_tok_s"],
                    "decode_tok_s": result["decode_tok_s"]}
        if result.get("bundle_rss_mib"):
            measured["peak_mib"] = result["bundle_rss_mib"]
        rows.append(Row(f"{result['name']} ({result['format']}, {result['quantization']}), host, "
                        f"{result['threads']} threads", shape, plan, host, backend.name,
                        Scenario(prompt_tokens=result["prompt_tokens"] - image_tokens, threads=result["threads"]),
                        measured, f"edge-mllm bench, {run['timestamp']}",
                        role="host, fit" if result["name"] in fit_names else "host, held out"))
    unknown = set(fit_names) - {r["name"] for r in run["results"]}
    if unknown:
        raise SystemExit(f"--host-fit: {', '.join(sorted(unknown))} not in {bench_json}")
    return rows


def results(rows: list[Row]) -> list[dict]:
    out = []
    for row in rows:
        prediction = run_row(row)
        for metric, value in row.published.items():
            got = predicted(prediction, metric)
            ratio = got / published_value(value)
            out.append({"row": row.label, "metric": metric, "published": value, "predicted": got, "ratio": ratio,
                        "within": 1 - TOLERANCE <= ratio <= 1 + TOLERANCE, "set": row.role,
                        "backend": row.backend, "source": row.source, "notes": row.notes})
    return out


FIT_ROLES = ("published", "fit, notes", "host, fit")
RESOURCES = ("compute", "bandwidth", "overhead_mib")


def _with_factors(backend: Backend, arch: str, factors: dict[str, float]) -> Backend:
    """``backend`` with ``factors`` as its efficiency on CPUs of ``arch``."""
    if arch == backend.arch:
        return dataclasses.replace(backend, **factors)
    return dataclasses.replace(backend, x86_64=Efficiency(**factors, calibration="being fitted"))


def _midpoint(resource: str, per_row: list[float]) -> float:
    """The value that minimises the largest miss over rows that each need ``per_row``: geometric for an
    efficiency (errors are ratios), arithmetic and never below 0 for an overhead in MiB."""
    if resource == "overhead_mib":
        return max(0.0, (min(per_row) + max(per_row)) / 2)
    return math.sqrt(min(per_row) * max(per_row))


def fit(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per backend (and CPU architecture) and resource, the factor with the smallest worst error over
    the rows of the fit sets: for compute and bandwidth the geometric midpoint of the per-row factors
    (each row's factor is the one that would make it exact, found by scaling the current factor, twice
    to settle roofline switches), which minimises the largest |log(predicted / published)|; for the
    runtime overhead, the midpoint of the per-row overheads (never below 0)."""
    factors: dict[str, dict[str, float]] = {}
    for name, backend in BACKENDS.items():
        for arch in ("arm64", "x86_64"):
            mine = [r for r in rows if r.role in FIT_ROLES and r.backend == name and _device(r).cpu_arch == arch]
            if not mine:
                continue
            start = backend.on(_device(mine[0]))
            current = {k: getattr(start, k) for k in RESOURCES}
            for _ in range(2):
                needed: dict[str, list[float]] = {k: [] for k in RESOURCES}
                trial = _with_factors(backend, arch, current)
                for row in mine:
                    prediction = run_row(row, trial)
                    for metric, value in row.published.items():
                        _, resource, faster = METRICS[metric]
                        got = predicted(prediction, metric)
                        if resource == "memory":
                            if row.role == "host, fit":  # the phones' overheads come from their notes (backends.py)
                                needed["overhead_mib"].append(current["overhead_mib"] + published_value(value) - got)
                        else:
                            ratio = got / published_value(value)
                            needed[resource].append(current[resource] * (1 / ratio if faster else ratio))
                current = {k: _midpoint(k, v) if v else current[k] for k, v in needed.items()}
            factors[name if arch == "arm64" else f"{name} ({arch})"] = current
    return factors


def _fmt(value: float | tuple[float, float]) -> str:
    if isinstance(value, tuple):
        return "–".join(_fmt(v) for v in value)
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


UNITS = {"vision_s": "vision encode (s)", "prefill_tok_s": "prefill (tok/s)", "ttft_s": "TTFT (s)",
         "decode_tok_s": "decode (tok/s)", "peak_mib": "peak memory (MiB)"}


def markdown(table: list[dict]) -> str:
    lines = ["| row | backend | metric | published | predicted | ratio | ±30% | set |",
             "| --- | --- | --- | ---: | ---: | ---: | :---: | --- |"]
    for r in table:
        lines.append(f"| {r['row']} | {r['backend']} | {UNITS[r['metric']]} | {_fmt(r['published'])} | "
                     f"{_fmt(r['predicted'])} | {r['ratio']:.2f} | {'yes' if r['within'] else '**no**'} | "
                     f"{r['set']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", action="store_true", help="Print the efficiency factors the rows fit.")
    parser.add_argument("--json", action="store_true", help="Print the table as JSON.")
    parser.add_argument("--host", metavar="BENCH_JSON",
                        help="Also compare with the bundles an `edge-mllm bench --json` run measured on this host.")
    parser.add_argument("--host-fit", nargs="*", default=(), metavar="NAME",
                        help="Bench results (by name) that --fit fits the host architecture's factors on; "
                             "the others are held out.")
    args = parser.parse_args(argv)
    rows = ROWS + (host_rows(args.host, tuple(args.host_fit)) if args.host else [])
    table = results(rows)
    if args.json:
        print(json.dumps({"rows": table, "fit": fit(rows) if args.fit else None}, indent=2, default=str))
        return 0
    print(markdown(table))
    print()
    for role in ("published", "fit, notes", "held out", "host, fit", "host, held out"):
        mine = [r for r in table if r["set"] == role]
        if not mine:
            continue
        print(f"{role}: {sum(r['within'] for r in mine)}/{len(mine)} within ±{TOLERANCE:.0%}")
    for row in rows:
        for note in row.notes:
            print(f"note ({row.label}): {note}")
    if args.fit:
        print("\nfitted efficiency factors (edge_mllm/sim/backends.py):")
        for name, factors in fit(rows).items():
            print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" if k != "overhead_mib" else f"overhead {v:.0f} MiB"
                                            for k, v in factors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
