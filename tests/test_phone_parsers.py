"""benchmarks/phone/: the parsers on real output of llama-bench, llama-mtmd-cli and ExecuTorch's runners
(tests/data/phone/, sources in SOURCES.md there), and the runner's flow with adb replaced by a fake that
answers with those recordings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from edge_mllm.bench.schema import ROW_KEYS, SCHEMA
from edge_mllm.config import MLLMConfig, ProjectorConfig, TextConfig, VisionConfig
from edge_mllm.sim.profiles import get_device

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "phone"
PHONE = ROOT / "benchmarks" / "phone"


def _load(name: str):
    if str(PHONE) not in sys.path:
        sys.path.insert(0, str(PHONE))
    spec = importlib.util.spec_from_file_location(f"phone_{name}", PHONE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


parsers = _load("parsers")


def sample(name: str) -> str:
    return (DATA / name).read_text()


def test_llama_bench_markdown_threads_table():
    rows = parsers.parse_llama_bench_markdown(sample("llama_bench_threads.md"))
    assert len(rows) == 12 and rows[0] == {"kind": "prefill", "tokens": 64, "depth": 0, "tok_s": 6.17,
                                           "tok_s_std": 0.07, "threads": 1, "model": "llama 7B mostly Q4_0",
                                           "samples": None}
    assert parsers.llama_bench_rates(rows, threads=4) == {"prefill_tok_s": 23.18, "prefill_threads": 4,
                                                          "decode_tok_s": 12.22, "decode_threads": 4}
    best = parsers.llama_bench_rates(rows)  # the fastest thread count of each phase
    assert (best["prefill_tok_s"], best["prefill_threads"], best["decode_tok_s"], best["decode_threads"]) == \
        (59.00, 32, 16.71, 8)


def test_llama_bench_markdown_depth_rows_are_not_the_empty_cache_rates():
    rows = parsers.parse_llama_bench_markdown(sample("llama_bench_depth.md"))
    assert [(r["kind"], r["tokens"], r["depth"]) for r in rows] == \
        [("prefill", 512, 0), ("decode", 128, 0), ("prefill", 512, 512), ("decode", 128, 512)]
    assert parsers.llama_bench_rates(rows) == {"prefill_tok_s": 7340.20, "prefill_threads": None,
                                               "decode_tok_s": 120.60, "decode_threads": None}


def test_llama_bench_json():
    rows = parsers.parse_llama_bench_json(sample("llama_bench.json"))
    assert [(r["kind"], r["tokens"], r["threads"]) for r in rows] == [("prefill", 512, 8), ("decode", 128, 8)]
    assert rows[0]["tok_s"] == pytest.approx(7100.002165) and len(rows[1]["samples"]) == 5
    rates = parsers.llama_bench_rates(rows, threads=8)
    assert rates["decode_tok_s"] == pytest.approx(118.881588)
    jsonl = "\n".join(json.dumps(item) for item in json.loads(sample("llama_bench.json")))
    assert parsers.parse_llama_bench_json(jsonl) == rows


def test_mtmd_cli_on_a_snapdragon_888():
    out = parsers.parse_mtmd_cli(sample("llama_mtmd_cli_mobilevlm_sd888.txt"))
    assert out["vision_encode_ms"] == pytest.approx(21148.71) and out["image_slices"] == 1
    assert (out["prompt_tokens"], out["generated_tokens"]) == (246, 6)
    assert out["prefill_tok_s"] == pytest.approx(19.74, abs=0.01)  # as llama.cpp printed it
    assert out["decode_tok_s"] == pytest.approx(14.12, abs=0.01)
    assert out["ttft_ms"] == pytest.approx(21148.71 + 12460.15) and out["load_ms"] == pytest.approx(23574.72)


def test_mtmd_cli_current_perf_lines_and_new_image_lines():
    out = parsers.parse_mtmd_cli(sample("llama_cli_perf_rk3566.txt"))
    assert out["vision_encode_ms"] is None and out["ttft_ms"] == pytest.approx(4245.68)
    assert out["prefill_tok_s"] == pytest.approx(1.88, abs=0.01)
    assert out["decode_tok_s"] == pytest.approx(1.02, abs=0.01)
    # today's libmtmd logs "image slice encoded in N ms" per slice (tools/mtmd/mtmd-helper.cpp)
    sliced = "encoding image slice...\nimage slice encoded in 709 ms\nimage slice encoded in 291 ms\n" + \
        sample("llama_cli_perf_rk3566.txt")
    out = parsers.parse_mtmd_cli(sliced)
    assert (out["vision_encode_ms"], out["image_slices"]) == (1000.0, 2)
    assert out["ttft_ms"] == pytest.approx(1000 + 4245.68)


def test_executorch_llama_main_on_android():
    out = parsers.parse_executorch(sample("executorch_llama_main_android.txt"))
    assert (out["prompt_tokens"], out["generated_tokens"]) == (54, 53)
    assert out["ttft_ms"] == 185 and out["load_ms"] == 3577
    assert out["prefill_tok_s"] == pytest.approx(291.891892)  # the stats report's own rates
    assert out["decode_tok_s"] == pytest.approx(38.629738)
    assert out["peak_rss_mib"] == pytest.approx(1269.320312) and out["vision_encode_ms"] is None


def test_executorch_stats_report_without_the_observer_line():
    text = "\n".join(line for line in sample("executorch_llama_main_android.txt").splitlines()
                     if "PyTorchObserver" not in line)
    out = parsers.parse_executorch(text)
    assert (out["prompt_tokens"], out["generated_tokens"], out["ttft_ms"], out["load_ms"]) == (54, 53, 185, 3577)
    assert out["prefill_tok_s"] == pytest.approx(291.891892) and out["decode_tok_s"] == pytest.approx(38.629738)


def test_executorch_multimodal_runner_report():
    out = parsers.parse_executorch(sample("executorch_voxtral_runner.txt"))
    assert (out["prompt_tokens"], out["generated_tokens"], out["ttft_ms"]) == (388, 99, 5054)
    assert out["prefill_tok_s"] == pytest.approx(76.770875) and out["decode_tok_s"] == pytest.approx(8.865407)
    assert out["peak_rss_mib"] is None and out["load_ms"] == 0


@pytest.mark.parametrize("parse", ["parse_mtmd_cli", "parse_executorch", "parse_llama_bench_markdown",
                                   "parse_llama_bench_json"])
def test_output_without_results_is_a_parse_error(parse):
    with pytest.raises(parsers.ParseError):
        getattr(parsers, parse)("error: failed to load model\n")


# --- the runner, with adb faked ---------------------------------------------------------------

class FakeAdb:
    """Answers shell commands with the recorded outputs; remembers what was pushed and run."""

    def __init__(self):
        self.pushed, self.commands = [], []

    def shell(self, command: str) -> str:
        self.commands.append(command)
        for tool, name in (("llama-bench", "llama_bench.json"),
                           ("llama-mtmd-cli", "llama_mtmd_cli_mobilevlm_sd888.txt"),
                           ("llava_main", "executorch_llama_main_android.txt")):
            if tool in command:
                return sample(name)
        return ""

    def push(self, local: Path, remote: str) -> None:
        assert Path(local).is_file(), local
        self.pushed.append(remote)

    def getprop(self, name: str) -> str:
        return {"ro.product.model": "OnePlus 12", "ro.soc.model": "SM8650"}.get(name, "")


def fake_bundle(root: Path, name: str, fmt: str, quant: str, files: dict[str, str], section: dict) -> Path:
    config = MLLMConfig(text=TextConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4),
                        vision=VisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4),
                        projector=ProjectorConfig(type="ldpv2"))
    folder = root / name
    listed = []
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
        listed.append({"path": path, "size": len(text), "sha256": "0" * 64})
    manifest = {"format": fmt, "quantization": quant, "files": listed, "model": config.to_dict(), "max_seq_len": 256,
                "image_token_count": 4, fmt.split("-")[0]: section}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_runner_turns_phone_output_into_bench_json(tmp_path):
    run = _load("run")
    gguf = fake_bundle(tmp_path, "gguf-q4", "gguf", "rtn-w4-g32", {"model.gguf": "m", "mmproj.gguf": "p"},
                       {"model_file": "model.gguf", "mmproj_file": "mmproj.gguf"})
    pte = fake_bundle(tmp_path, "et-q4", "executorch", "rtn-w4-g32",
                      {"model.pte": "x", "tokenizer/tokenizer.json": "{}"}, {"program": "model.pte"})
    image = tmp_path / "scene.png"
    image.write_bytes(b"png")
    adb = FakeAdb()
    settings = run.Settings(threads=8, tokens=16, repeats=2)
    report = run.run_phone(adb, [str(gguf), str(pte)], image, settings, get_device("snapdragon-8-gen-3"))

    assert report["schema"] == SCHEMA and report["machine"]["model"] == "OnePlus 12"
    g, e = report["results"]
    assert set(g) == set(ROW_KEYS) and g["source"] == "phone: OnePlus 12"
    assert g["vision_encode_ms"] == pytest.approx(21148.71) and g["ttft_ms"] == pytest.approx(33608.86)
    assert g["prefill_tok_s"] == pytest.approx(7100.002165) and g["decode_tok_s"] == pytest.approx(118.881588)
    assert e["decode_tok_s"] == pytest.approx(38.629738) and e["peak_rss_mib"] == pytest.approx(1269.320312)
    assert e["anchor"] == "gguf-q4" and e["decode_vs_llamacpp"] == pytest.approx(38.629738 / 118.881588)
    for row in (g, e):
        assert row["roofline_decode_tok_s"] > 0 and row["decode_pct_of_roofline"] > 0
    assert sorted(adb.pushed) == sorted([
        "/data/local/tmp/edge-mllm/gguf-q4/model.gguf", "/data/local/tmp/edge-mllm/gguf-q4/mmproj.gguf",
        "/data/local/tmp/edge-mllm/gguf-q4/image.png", "/data/local/tmp/edge-mllm/et-q4/model.pte",
        "/data/local/tmp/edge-mllm/et-q4/tokenizer/tokenizer.json", "/data/local/tmp/edge-mllm/et-q4/image.png"])
    bench = [c for c in adb.commands if "llama-bench" in c]
    assert len(bench) == 1 and "-t 8" in bench[0] and "-o json" in bench[0]
    assert sum("llama-mtmd-cli" in c for c in adb.commands) == 2 and sum("llava_main" in c for c in adb.commands) == 2
