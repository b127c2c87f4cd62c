"""What a quantization costs, measured against the unquantized model on held-out data.

- perplexity of the LLM on held-out text;
- mean KL(reference ‖ quantized) of next-token distributions, and top-1 agreement (the share of
  positions where both models' greedy next token is the same; teacher-forced, as llama.cpp's
  ``llama-perplexity --kl-divergence`` reports "same top p");
- VQA / POPE on a held-out synthetic split (through ``edge_mllm.eval``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.eval.runner import evaluate, load_eval_set, pipeline_answer
from edge_mllm.model.llama import LlamaForCausalLM
from edge_mllm.pipeline import Pipeline


@torch.no_grad()
def sequence_logits(llm: LlamaForCausalLM, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Teacher-forced log-probabilities [T, V] for each token-id sequence [1, T] (no KV cache)."""
    llm.clear_cache()
    return [F.log_softmax(llm(llm.embed(ids)).float()[0], dim=-1) for ids in sequences]


def perplexity(log_probs: Sequence[torch.Tensor], sequences: Sequence[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for lp, ids in zip(log_probs, sequences, strict=True):
        targets = ids[0, 1:]
        nll -= float(lp[:-1].gather(-1, targets[:, None]).sum())
        count += targets.numel()
    return math.exp(nll / count)


def divergence(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean KL(reference ‖ candidate) per position and top-1 agreement."""
    kl, same, count = 0.0, 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        kl += float((ref.exp() * (ref - cand)).sum())
        same += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        count += ref.shape[0]
    return {"kl_divergence": kl / count, "top1_agreement": same / count}


def text_quality(
    llm: LlamaForCausalLM, sequences: Sequence[torch.Tensor], reference: Sequence[torch.Tensor] | None
) -> dict[str, float]:
    """Perplexity, and KL / agreement against ``reference`` log-probs when given."""
    log_probs = sequence_logits(llm, sequences)
    out = {"perplexity": perplexity(log_probs, sequences)}
    if reference is not None:
        out.update(divergence(reference, log_probs))
    return out


def vqa_quality(loaded: LoadedModel, data: str | Path, limit: int | None = None, progress: bool = True) -> dict:
    """VQA accuracy and POPE F1 (per setting and mean) on an evaluation folder."""
    report = evaluate(pipeline_answer(Pipeline(loaded)), load_eval_set(data, limit), progress=progress)
    pope = report["pope"]
    return {
        "vqa_accuracy": None if report["vqa"] is None else report["vqa"]["accuracy"],
        "pope_f1": {s: m["f1"] for s, m in pope.items()},
        "pope_f1_mean": sum(m["f1"] for m in pope.values()) / len(pope) if pope else None,
    }
