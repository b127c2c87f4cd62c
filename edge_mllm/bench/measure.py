"""The timed runs: one warm-up per subject, then ``repeats`` rounds that each run every subject once
(alternating, so slow drift and noise on a shared machine hit every subject alike), medians reported.
Each subject runs in its own process (:mod:`edge_mllm.bench.worker`), as it would in an app.

Every run answers the same prompt about the same synthetic scene (text-only models: the prompt alone)
and decodes exactly ``tokens`` tokens (stop tokens ignored), greedily, in the subject's own runtime."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

from edge_mllm.bench.worker import RuntimeProcess

PROMPT = "Describe the picture in detail."
WARMUP_TOKENS = 4
# What one run reports, from the runtime's own timings (edge_mllm.runtime).
METRICS = ("vision_encode_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s")
# A runtime's threads spin on after its call returns (ONNX Runtime's intra-op pool, PyTorch's OpenMP,
# XNNPACK's pthreadpool), sharing the cores with whatever is timed next: on the 2-core host an ONNX
# Runtime vision encode timed right after another session's took 82 ms instead of 47, and eager
# PyTorch's after it 97 instead of 53. Waiting this long before each timed call lets them go idle.
SETTLE_S = 0.2


def settle() -> None:
    """Let the previous call's runtime threads go idle before the next timed call."""
    time.sleep(SETTLE_S)


@lru_cache(maxsize=1)
def bench_image():
    """The held-out synthetic test scene 0 (the same picture in every run and on every machine)."""
    from edge_mllm.data.synth import render, sample_scene, scene_rng

    return render(sample_scene(scene_rng("test", 0, 0)))


def images_for(runtime) -> list:
    """One image when the runtime sees, none otherwise."""
    return [bench_image()] if getattr(runtime, "image_processor", None) is not None else []


def one_run(runtime, tokens: int) -> dict[str, float]:
    """One request → the metrics of :data:`METRICS` plus token counts."""
    prompt_cache = getattr(runtime, "prompt_cache", None)  # PyTorch's: it would serve a repeated prompt
    if prompt_cache is not None:
        prompt_cache.clear()  # every run prefills its whole prompt, as the bundles' runtimes do
    out = runtime.generate(PROMPT, images_for(runtime), max_new_tokens=tokens, stop_token_ids=())
    t = out.timings
    return {
        "vision_encode_ms": 1000 * t["vision_encode_s"],
        "ttft_ms": 1000 * t["time_to_first_token_s"],
        "prefill_tok_s": t["prefill_tokens_per_s"],
        "decode_tok_s": t["decode_tokens_per_s"],
        "prompt_tokens": out.prompt_tokens,
        "generated_tokens": len(out.token_ids),
    }


def measure(workers: dict[str, RuntimeProcess], repeats: int, tokens: int,
            progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Medians of ``repeats`` alternating runs per subject (after one warm-up each), with the samples."""
    for name, worker in workers.items():
        if progress:
            progress(f"warm-up {name}")
        worker.call(one_run, WARMUP_TOKENS)  # first-call allocations, thread pools, lazy kernels
    samples: dict[str, list[dict]] = {name: [] for name in workers}
    for i in range(repeats):
        for name, worker in workers.items():
            if progress:
                progress(f"run {i + 1}/{repeats} {name}")
            settle()
            samples[name].append(worker.call(one_run, tokens))
    return {name: summarise(runs) for name, runs in samples.items()}


def summarise(runs: Sequence[dict]) -> dict:
    """Medians of every metric, the token counts of the first run and the raw samples."""
    out = {key: statistics.median(r[key] for r in runs) for key in METRICS}
    out.update(prompt_tokens=runs[0]["prompt_tokens"], generated_tokens=runs[0]["generated_tokens"],
               repeats=len(runs), samples={key: [r[key] for r in runs] for key in METRICS})
    return out
