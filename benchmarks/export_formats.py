"""Every export format × quantization of one model, side by side in one run, each in its own runtime:
export time, artifact size, vision-encode ms, prefill and decode tok/s, and (with --vqa-scenes) VQA
accuracy — with llama.cpp running the GGUF of the same weights as the anchor for the speed ratios.

    python benchmarks/export_formats.py [--model DIR] [--scheme rtn-w4-g32] [--rows NAME ...]
                                        [--threads 2] [--repeats 3] [--vqa-scenes N] [--json OUT]
                                        [--keep DIR]

Rows: PyTorch eager (the reference), then per format the float export and 4-bit. "4-bit" is our
``--scheme`` codes in every format (ExecuTorch 8da4w linears, ONNX MatMulNBits, GGUF Q4_0/Q4_1), so
the formats compute the same weights (``executorch-4bit-2digit``: the same with
``--two-digit-activations``); native rows (torchao 8da4w, llama.cpp Q4_K_M) are each format's own
quantizer. Every bundle runs in its own process (runtimes sharing a process slow each
other: edge_mllm/bench/worker.py); eager rows run in this one. Speed runs alternate between rows,
repeated, and report medians, so machine noise hits every row alike; ratios are to llama.cpp on the
same weights (float rows: the F16 GGUF; 4-bit rows: the GGUF of the same codes). Each speed run is
``edge-mllm bench``'s request (its prompt, synthetic test scene 0, stop tokens ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from edge_mllm.export.bundle import MANIFEST, export_bundle, quantized_weights
from edge_mllm.quant.scheme import QuantScheme

from edge_mllm.bench.measure import one_run, settle
from edge_mllm.bench.suite import accuracy
from edge_mllm.bench.worker import RuntimeProcess
from edge_mllm.checkpoint import LoadedModel, load_model
from edge_mllm.data.synth import write_split
from edge_mllm.pipeline import Pipeline

# A row's runtime: call(fn, *args) runs fn(runtime, *args) where the runtime lives.
Call = Callable[..., object]


@dataclass(frozen=True)
class Row:
    name: str
    fmt: str | None  # None: PyTorch eager
    quant: str | None  # "codes": our --scheme's codes; else the format's own type (None: float)
    anchor: str  # the llama.cpp row with the same weights
    two_digit: bool = False  # ExecuTorch: --two-digit-activations


ROWS = (
    Row("pytorch-fp32", None, None, "gguf-f16"),
    Row("gguf-f16", "gguf", "f16", "gguf-f16"),
    Row("executorch-fp32", "executorch", None, "gguf-f16"),
    Row("onnx-fp32", "onnx", None, "gguf-f16"),
    Row("pytorch-4bit", None, "codes", "gguf-4bit"),
    Row("gguf-4bit", "gguf", "codes", "gguf-4bit"),
    Row("executorch-4bit", "executorch", "codes", "gguf-4bit"),
    Row("executorch-4bit-2digit", "executorch", "codes", "gguf-4bit", two_digit=True),
    Row("onnx-4bit", "onnx", "codes", "gguf-4bit"),
    Row("executorch-8da4w", "executorch", "8da4w", "gguf-4bit"),
    Row("gguf-q4_k_m", "gguf", "q4_k_m", "gguf-4bit"),
)


def bundle_size(out: Path) -> int:
    return sum(f["size"] for f in json.loads((out / MANIFEST).read_text())["files"])


def build(row: Row, model: LoadedModel, quantized: LoadedModel, root: Path, threads: int,
          stack: contextlib.ExitStack) -> tuple[Call, float, int | None]:
    """(call, export seconds, artifact bytes) for a row: eager rows run here, bundles in a process."""
    source = quantized if row.quant == "codes" else model
    if row.fmt is None:
        pipeline = Pipeline(copy.deepcopy(source))
        return (lambda fn, *args: fn(pipeline, *args)), 0.0, None
    t0 = time.perf_counter()
    out = export_bundle(copy.deepcopy(source), row.fmt, root / row.name,
                        quant=None if row.quant == "codes" else row.quant, progress=False,
                        two_digit_activations=row.two_digit)
    seconds = time.perf_counter() - t0
    worker = stack.enter_context(RuntimeProcess(str(out), threads, row.name))
    return worker.call, seconds, bundle_size(out)


def speed(call: Call, tokens: int) -> dict[str, float]:
    run = call(one_run, tokens)
    return {"vision_ms": run["vision_encode_ms"], "prefill_tok_s": run["prefill_tok_s"],
            "decode_tok_s": run["decode_tok_s"], "prompt_tokens": run["prompt_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    parser.add_argument("--scheme", default="rtn-w4-g32", help="our 4-bit scheme for the '4bit' rows")
    parser.add_argument("--rows", nargs="*", default=None, help=f"subset of {[r.name for r in ROWS]}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per speed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vqa-scenes", type=int, default=0, help="also VQA on N held-out scenes (~11 q each)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="export the bundles into DIR (one folder per row) and keep them, e.g. for edge-mllm bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [r for r in ROWS if args.rows is None or r.name in args.rows]
    rows += [r for r in ROWS if r.name in {x.anchor for x in rows} and r not in rows]  # anchors always run
    model = load_model(args.model)
    quantized = copy.deepcopy(model)
    if any(r.quant == "codes" for r in rows):
        quantized_weights(quantized, QuantScheme.parse(args.scheme))  # once, shared by every 4-bit row

    results: dict[str, dict] = {}
    calls: dict[str, Call] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        bundles = Path(args.keep) if args.keep else Path(tmp)
        bundles.mkdir(parents=True, exist_ok=True)
        for row in rows:
            print(f"exporting {row.name}", flush=True)
            calls[row.name], seconds, size = build(row, model, quantized, bundles, args.threads, stack)
            results[row.name] = {"format": row.fmt or "pytorch", "quant": args.scheme if row.quant == "codes"
                                 else row.quant, "export_s": seconds, "size_mb": None if size is None else size / 1e6}
        print(f"timing {len(calls)} rows", flush=True)
        for call in calls.values():
            speed(call, 4)  # warm-up: first-call allocations, thread pools
        runs: dict[str, list[dict]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                settle()
                runs[name].append(speed(call, args.tokens))
        for name, samples in runs.items():
            for key in samples[0]:
                results[name][key] = statistics.median(s[key] for s in samples)
        if args.vqa_scenes:
            data = str(write_split(Path(tmp) / "test", "test", seed=0, n=args.vqa_scenes))
            for name, call in calls.items():
                print(f"VQA {name}", flush=True)
                report = call(accuracy, data, None, True)
                results[name]["vqa"] = report["vqa"]["accuracy"]
                results[name]["answers"] = [p["prediction"] for p in report["predictions"]]

    by_name = {r.name: r for r in rows}
    for name, res in results.items():
        anchor = results[by_name[name].anchor]
        res["decode_vs_llamacpp"] = res["decode_tok_s"] / anchor["decode_tok_s"]
        res["prefill_vs_llamacpp"] = res["prefill_tok_s"] / anchor["prefill_tok_s"]
        reference = results.get("pytorch-4bit" if by_name[name].quant == "codes" else "pytorch-fp32", {})
        if "answers" in res and "answers" in reference:
            res["same_answers_as_pytorch"] = float(np.mean([a == b for a, b in
                                                            zip(res["answers"], reference["answers"], strict=True)]))
    print_table(results, args)
    if args.json:
        for res in results.values():
            res.pop("answers", None)
        Path(args.json).write_text(json.dumps({"threads": args.threads, "scheme": args.scheme,
                                               "results": results}, indent=2) + "\n")


def print_table(results: dict[str, dict], args) -> None:
    vqa = any("vqa" in r for r in results.values())
    header = ["row", "export s", "size MB", "vision ms", "prefill tok/s", "decode tok/s", "decode ×llama.cpp",
              "prefill ×llama.cpp"] + (["VQA %", "same answers as PyTorch"] if vqa else [])
    print(f"\n{args.threads} threads; '4bit' = {args.scheme} codes; medians of {args.repeats} runs "
          f"({args.tokens} decoded tokens, prompt with one image)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in results.items():
        cells = [name, f"{r['export_s']:.0f}" if r["export_s"] else "–",
                 f"{r['size_mb']:.0f}" if r["size_mb"] else "–", f"{r['vision_ms']:.0f}",
                 f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}", f"{r['decode_vs_llamacpp']:.2f}",
                 f"{r['prefill_vs_llamacpp']:.2f}"]
        if vqa:
            same = r.get("same_answers_as_pytorch")
            cells += [f"{100 * r['vqa']:.1f}", "–" if same is None else f"{100 * same:.0f}%"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
