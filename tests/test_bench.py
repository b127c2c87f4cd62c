"""``edge-mllm bench``: tiny LLaVA bundles (GGUF f32 in llama.cpp, ONNX fp32 in onnxruntime) timed side
by side; the report's fields, llama.cpp ratios, the bandwidth roofline, markdown, plot and errors."""

from __future__ import annotations

import copy
import json

import pytest
from edge_mllm.export.bundle import export_bundle

from edge_mllm.bench import BenchSettings, run_bench
from edge_mllm.bench.report import markdown_table, plot
from edge_mllm.bench.schema import ROW_KEYS, SCHEMA, add_ratios, new_row
from edge_mllm.checkpoint import load_model
from edge_mllm.cli import main
from edge_mllm.errors import CheckpointError

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def bundles(llava, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = load_model(llava.path)
    return {fmt: export_bundle(copy.deepcopy(model), fmt, root / f"{fmt}-f32", quant=quant, progress=False)
            for fmt, quant in {"gguf": "f32", "onnx": None}.items()}


@pytest.fixture(scope="module")
def report(bundles):
    return run_bench(BenchSettings([str(bundles["gguf"]), str(bundles["onnx"])], threads=1, repeats=2, tokens=4))


def test_report_has_every_field(report, bundles):
    assert report["schema"] == SCHEMA
    assert report["settings"] | {"threads": 1, "repeats": 2, "tokens": 4} == report["settings"]
    # the roofline reads at the bench's threads; simulate's host profile (a copy) is kept beside it
    assert report["machine"]["bandwidth_gbs"] > 0 and "on 1 thread(s)" in report["machine"]["bandwidth_source"]
    assert report["machine"]["host_profile_gbs"] > 0
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["gguf-f32", "onnx-f32"]
    for row in rows.values():
        assert set(row) == set(ROW_KEYS)
        for key in ("vision_encode_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "size_bytes", "peak_rss_mib"):
            assert row[key] > 0, key
        assert row["ttft_ms"] >= row["vision_encode_ms"]
        assert row["generated_tokens"] == 4 and row["repeats"] == 2 and len(row["samples"]["decode_tok_s"]) == 2
        assert row["peak_rss_mib"] > row["baseline_rss_mib"] > 0 and row["rss_method"]
    manifest = json.loads((bundles["onnx"] / "manifest.json").read_text())
    assert rows["onnx-f32"]["size_bytes"] == sum(f["size"] for f in manifest["files"])
    assert (rows["gguf-f32"]["runtime"], rows["onnx-f32"]["runtime"]) == ("llama.cpp", "onnxruntime")


def test_ratios_to_llamacpp_and_roofline(report):
    gguf, onnx = report["results"]
    assert gguf["anchor"] == onnx["anchor"] == "gguf-f32"
    assert gguf["decode_vs_llamacpp"] == pytest.approx(1.0)
    assert onnx["decode_vs_llamacpp"] == pytest.approx(onnx["decode_tok_s"] / gguf["decode_tok_s"])
    assert onnx["prefill_vs_llamacpp"] == pytest.approx(onnx["prefill_tok_s"] / gguf["prefill_tok_s"])
    for row in (gguf, onnx):
        # f32 weights: 4 bytes per decoder + LM-head weight, the bytes the roofline divides into
        assert row["decode_bytes_per_token"] > 4 * (2 * (64 * 64 * 3 + 64 * 32 * 2 + 3 * 64 * 128) + 320 * 64)
        assert row["roofline_decode_tok_s"] == pytest.approx(
            report["machine"]["bandwidth_gbs"] * 1e9 / row["decode_bytes_per_token"])
        assert row["decode_pct_of_roofline"] == pytest.approx(100 * row["decode_tok_s"] / row["roofline_decode_tok_s"])


def test_anchor_prefers_the_same_quantization():
    rows = [new_row("a", runtime="llama.cpp", quantization="q8_0", decode_tok_s=10.0),
            new_row("b", runtime="llama.cpp", quantization="rtn-w4-g32", decode_tok_s=20.0),
            new_row("c", runtime="executorch", quantization="rtn-w4-g32", decode_tok_s=30.0),
            new_row("d", runtime="onnxruntime", quantization=None, decode_tok_s=5.0)]
    add_ratios(rows)
    assert [r["anchor"] for r in rows] == ["a", "b", "b", "a"]
    assert rows[2]["decode_vs_llamacpp"] == pytest.approx(1.5) and rows[3]["decode_vs_llamacpp"] == 0.5
    assert rows[0]["prefill_vs_llamacpp"] is None  # not measured: no ratio
    no_llama = [new_row("x", runtime="onnxruntime", decode_tok_s=1.0)]
    add_ratios(no_llama)
    assert no_llama[0]["anchor"] is None and no_llama[0]["decode_vs_llamacpp"] is None


def test_markdown_table_and_plot(report, tmp_path):
    table = markdown_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("| bundle | format | quant |") and "% of roofline" in lines[0]
    assert lines[2].startswith("| gguf-f32 | gguf | f32 |") and lines[3].startswith("| onnx-f32 | onnx | – |")
    assert "1.00x" in lines[2] and lines[0].count("|") == lines[3].count("|")
    png = plot(report, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_markdown_and_errors(bundles, tmp_path, capsys, monkeypatch):
    md = tmp_path / "bench.md"
    monkeypatch.chdir(bundles["onnx"].parent)  # a relative path on the command line
    code = main(["bench", bundles["onnx"].name, "--threads", "1", "--repeats", "1", "--tokens", "2", "--no-rss",
                 "--json", "--markdown", str(md)])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    row = data["results"][0]
    assert row["peak_rss_mib"] is None and row["anchor"] is None and row["decode_pct_of_roofline"] > 0
    assert row["path"] == str(bundles["onnx"].resolve())  # the report is readable from anywhere
    assert md.read_text().startswith("| bundle |")

    (tmp_path / "notabundle").mkdir()
    (tmp_path / "notabundle" / "x.txt").write_text("hi")
    code = main(["bench", str(bundles["onnx"]), str(tmp_path / "notabundle")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert "is not an exported bundle" in err and "notabundle" in err
    with pytest.raises(CheckpointError, match="no such bundle"):
        run_bench(BenchSettings([str(tmp_path / "missing")]))
    assert main(["bench"]) == 2
    # found before the runs, not after them: an output file's missing folder, a bad eval set
    assert main(["bench", str(bundles["onnx"]), "--markdown", str(tmp_path / "no" / "such" / "b.md")]) == 2
    assert "its folder does not exist" in capsys.readouterr().err
    assert main(["bench", str(bundles["onnx"]), "--eval-limit", "3"]) == 2
    assert "give --eval DATA too" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["bench", str(bundles["onnx"]), "--eval", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "bad.json" in err  # no "loading …" first
    # more threads than cores: measured (oversubscription can be the point), but said
    assert main(["bench", str(tmp_path / "missing"), "--threads", "4096"]) == 1
    assert capsys.readouterr().err.startswith("warning: --threads 4096 is more than this host's")


def test_model_folders_run_in_pytorch_eager(llava):
    report = run_bench(BenchSettings([str(llava.path)], threads=1, repeats=1, tokens=2, rss=False))
    row = report["results"][0]
    assert (row["format"], row["runtime"], row["quantization"]) == ("pytorch", "pytorch", None)
    assert row["size_bytes"] > 0 and row["decode_tok_s"] > 0 and row["vision_encode_ms"] > 0
    assert row["decode_pct_of_roofline"] > 0 and row["peak_rss_mib"] is None


def test_each_subject_runs_in_its_own_process(bundles, tmp_path):
    import os

    from edge_mllm.bench.worker import RuntimeProcess
    from edge_mllm.errors import EdgeMLLMError

    with RuntimeProcess(str(bundles["gguf"]), threads=1, name="gguf-f32") as worker:
        assert worker.config is None  # bundles have no PyTorch config
        assert worker._process.pid != os.getpid()
        assert worker.call(getattr, "threads") == 1  # the call reached the loaded runtime
        # an error in the child comes back as one line, and the runtime keeps serving
        with pytest.raises(EdgeMLLMError, match=r"^gguf-f32: AttributeError: .*no_such_attribute"):
            worker.call(getattr, "no_such_attribute")
        assert worker.call(getattr, "threads") == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeMLLMError, match="empty: "):
        RuntimeProcess(str(tmp_path / "empty"), name="empty")


def test_sim_validation_compares_host_predictions_with_a_bench_run(report, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import sim_validation

    (tmp_path / "bench.json").write_text(json.dumps(report))
    fitted = report["results"][0]["name"]
    rows = sim_validation.host_rows(str(tmp_path / "bench.json"), (fitted,))
    table = sim_validation.results(rows)
    measured = {(r["name"], m): r[k] for r in report["results"]
                for m, k in (("prefill_tok_s", "prefill_tok_s"), ("decode_tok_s", "decode_tok_s"))}
    assert {row["set"] for row in table} == {"host, fit", "host, held out"}
    assert {row["set"] for row in table if row["row"].startswith(fitted + " ")} == {"host, fit"}
    assert {row["backend"] for row in table} == {"llama.cpp", "onnxruntime"}
    for row in table:
        assert row["predicted"] > 0 and row["ratio"] == pytest.approx(row["predicted"] / row["published"])
        name = row["row"].split(" ")[0]
        if (name, row["metric"]) in measured:
            assert row["published"] == measured[name, row["metric"]]


def test_every_timed_run_prefills_its_whole_prompt(llava):
    # PyTorch's prompt cache would serve the repeated prompt of the timed runs from the first one's KV:
    # a prefill of one token, not what a new request costs (the bundles' runtimes keep no such cache).
    from edge_mllm.bench.measure import one_run
    from edge_mllm.checkpoint import load_model
    from edge_mllm.pipeline import Pipeline

    pipe = Pipeline(load_model(llava.path))
    generate, cached = pipe.generate, []

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        cached.append(out.timings["cached_prompt_tokens"])
        return out

    pipe.generate = spy
    one_run(pipe, 2)
    one_run(pipe, 2)
    assert cached == [0, 0]
