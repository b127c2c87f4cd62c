"""Every 4/8-bit quantizer side by side on the same weights and data: ours (RTN, GPTQ, AWQ)
and the field's engines (torchao 8da4w, ONNX Runtime MatMulNBits, NNCF, llama.cpp Q4_0 / Q4_K_M...).

    python benchmarks/quant_quality.py [--model DIR] [--engines NAME ...] [--vqa-scenes N] [--json OUT]

For each engine: the language model's stored size (MB, and ratio to fp16, embeddings included),
perplexity on held-out text (stdlib docstrings the calibration never saw), mean KL divergence and
top-1 agreement of next-token distributions against the unquantized model, and with --vqa-scenes,
VQA accuracy / POPE F1 on a held-out synthetic split. Prints a Markdown table.

The embedded SmolLM2 weights come from a Q4_1 GGUF: its "unquantized" reference is their dequantized
fp32 values.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from edge_mllm.quant.calibration import calibration_set, text_sequences
from edge_mllm.quant.engines import ENGINES
from edge_mllm.quant.quality import sequence_logits, text_quality, vqa_quality

from edge_mllm.checkpoint import LoadedModel, load_model
from edge_mllm.data.synth import write_split

DEFAULT_ENGINES = (
    "edge-mllm-rtn-w4-g32", "edge-mllm-gptq-w4-g32", "edge-mllm-awq-w4-g32", "edge-mllm-rtn-w4-g32-min",
    "edge-mllm-gptq-w4-g32-min",
    "torchao-8da4w-g32", "ort-matmulnbits-w4-g32", "nncf-int4-sym-g64-awq-se",
    "llamacpp-q4_0", "llamacpp-q4_1", "llamacpp-q4_k_m", "llamacpp-q8_0",
)


def llm_fp16_bytes(loaded: LoadedModel) -> int:
    return 2 * sum(p.numel() for p in loaded.model.language_model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the embedded default)")
    parser.add_argument("--engines", nargs="+", default=list(DEFAULT_ENGINES), choices=sorted(ENGINES))
    parser.add_argument("--text-seqs", type=int, default=8, help="held-out text sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vqa-scenes", type=int, default=0, help="held-out synthetic scenes (~11 questions each)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)

    loaded = load_model(args.model)
    sequences = text_sequences(loaded, "heldout", args.text_seqs, args.seq_len)
    reference = sequence_logits(loaded.model.language_model, sequences)
    calibration = calibration_set(loaded) if any(ENGINES[e].needs_calibration for e in args.engines) else None
    fp16 = llm_fp16_bytes(loaded)
    with tempfile.TemporaryDirectory() as tmp:
        vqa_data = None
        if args.vqa_scenes and loaded.model.config.has_vision:
            vqa_data = write_split(Path(tmp) / "test", "test", seed=0, n=args.vqa_scenes)
        rows = {"unquantized (fp32)": {"size_mb": fp16 / 1e6, "ratio_vs_fp16": 1.0,
                                       **text_quality(loaded.model.language_model, sequences, reference)}}
        if vqa_data:
            rows["unquantized (fp32)"].update(vqa_quality(loaded, vqa_data, progress=False))
        for name in args.engines:
            start = time.perf_counter()
            result = ENGINES[name].quantize(loaded, calibration)
            seconds = time.perf_counter() - start
            row = {"size_mb": result.nbytes / 1e6, "ratio_vs_fp16": result.nbytes / fp16,
                   **text_quality(result.model.language_model, sequences, reference),
                   "quantize_s": seconds, "note": result.note}
            if vqa_data:
                quantized = LoadedModel(result.model, loaded.tokenizer, loaded.chat_template)
                row.update(vqa_quality(quantized, vqa_data, progress=False))
            rows[name] = row
            print(f"{name}: {json.dumps(row)}", flush=True)
    print_table(rows, vqa=vqa_data is not None)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")


def print_table(rows: dict[str, dict], vqa: bool) -> None:
    head = "| engine | LLM MB | vs fp16 | perplexity | KL | top-1 agree |" + (" VQA | POPE F1 |" if vqa else "")
    print("\n" + head)
    print("| --- " + "| ---: " * (head.count("|") - 2) + "|")
    for name, r in rows.items():
        kl = f"{r['kl_divergence']:.4f}" if "kl_divergence" in r else "—"
        agree = f"{r['top1_agreement'] * 100:.1f}%" if "top1_agreement" in r else "—"
        line = (f"| {name} | {r['size_mb']:.1f} | {r['ratio_vs_fp16'] * 100:.1f}% | {r['perplexity']:.2f} | {kl} "
                f"| {agree} |")
        if vqa:
            line += f" {r['vqa_accuracy'] * 100:.1f}% | {r['pope_f1_mean']:.3f} |"
        print(line)


if __name__ == "__main__":
    main()
