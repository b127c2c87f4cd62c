"""The quantization report: what a scheme costs in size and quality, against the unquantized model,
on held-out data (text the calibration never saw; a synthetic split from its own seed)."""

from __future__ import annotations

from pathlib import Path

from edge_mllm.quant.calibration import text_sequences
from edge_mllm.quant.quality import sequence_logits, text_quality, vqa_quality
from edge_mllm.quant.storage import QuantizedWeights, fp16_bytes

from edge_mllm.checkpoint.base import LoadedModel

MB = 1e6


def size_report(weights: QuantizedWeights, loaded: LoadedModel) -> dict:
    """Quantized and fp16 sizes of ``loaded``'s parameters (embeddings and vision tower included)."""
    quantized, fp16 = weights.nbytes(loaded.model), fp16_bytes(loaded.model)
    return {"quantized_mb": quantized / MB, "fp16_mb": fp16 / MB, "ratio_vs_fp16": quantized / fp16}


def quality_report(
    reference: LoadedModel,
    quantized: LoadedModel,
    *,
    text_count: int = 8,
    seq_len: int = 256,
    vqa_data: str | Path | None = None,
    vqa_limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity, KL divergence and top-1 agreement on held-out text; VQA / POPE when ``vqa_data`` is
    given and the model sees. ``reference`` and ``quantized`` share a tokenizer."""
    seq_len = min(seq_len, reference.model.config.text.max_position_embeddings)
    sequences = text_sequences(reference, "heldout", text_count, seq_len)
    ref_log_probs = sequence_logits(reference.model.language_model, sequences)
    report = {
        "heldout_text": {"sequences": text_count, "tokens_per_sequence": seq_len},
        "reference": text_quality(reference.model.language_model, sequences, None),
        "quantized": text_quality(quantized.model.language_model, sequences, ref_log_probs),
    }
    del ref_log_probs
    if vqa_data is not None and reference.model.config.has_vision:
        report["reference"].update(vqa_quality(reference, vqa_data, vqa_limit, progress))
        report["quantized"].update(vqa_quality(quantized, vqa_data, vqa_limit, progress))
    return report


def format_report(report: dict) -> str:
    """The report as a small text table."""
    size = report["size"]
    lines = [f"scheme {report['scheme']}: {size['quantized_mb']:.1f} MB, "
             f"{size['ratio_vs_fp16'] * 100:.1f}% of fp16 ({size['fp16_mb']:.1f} MB)"]
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    tensors = report.get("tensors", {})
    if tensors:
        key = "output_error" if all(t["output_error"] is not None for t in tensors.values()) else "weight_error"
        worst = sorted(tensors.items(), key=lambda item: -(item[1][key] or 0))[:5]
        lines.append(f"most sensitive tensors ({key.replace('_', ' ')}):")
        lines += [f"  {t[key]:.4f}  {t['bits']}-bit {t['method']:<4} {name}" for name, t in worst]
    if "reference" in report:
        ref, q = report["reference"], report["quantized"]
        lines.append(f"{'':<16}{'reference':>12}{'quantized':>12}")
        lines.append(f"{'perplexity':<16}{ref['perplexity']:>12.3f}{q['perplexity']:>12.3f}")
        lines.append(f"{'KL divergence':<16}{'':>12}{q['kl_divergence']:>12.4f}")
        lines.append(f"{'top-1 agreement':<16}{'':>12}{q['top1_agreement'] * 100:>11.1f}%")
        for key, label in (("vqa_accuracy", "VQA accuracy"), ("pope_f1_mean", "POPE F1 (mean)")):
            if ref.get(key) is not None:
                lines.append(f"{label:<16}{ref[key] * 100:>11.1f}%{q[key] * 100:>11.1f}%")
    return "\n".join(lines)
