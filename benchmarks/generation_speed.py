"""PyTorch generation with and without its two shortcuts, side by side in one run: the prompt cache
(the next question about the same image prefills only the question) over held-out questions, and
batched text generation (``Pipeline.generate_batch``) over the recipe's replayed text prompts.

    python benchmarks/generation_speed.py [--model M] [--scenes 5] [--prompts 40] [--threads 2]

Prints seconds for each way, the ratio, and how many answers are the same both ways (the shortcuts
change only floating-point rounding, so the answers should all agree).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from edge_mllm.checkpoint import load_model
from edge_mllm.data.synth import write_split
from edge_mllm.eval.runner import evaluate, load_eval_set, pipeline_answer, question_and_reference
from edge_mllm.pipeline import Pipeline
from edge_mllm.train.text_replay import train_prompts

MAX_NEW_TOKENS = 48  # the recipe's text replay (RecipeConfig.text_max_new_tokens)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the embedded default)")
    parser.add_argument("--scenes", type=int, default=5, help="held-out test scenes whose questions are asked")
    parser.add_argument("--prompts", type=int, default=40, help="replayed text prompts answered")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    print(f"threads={args.threads}")
    print("| what | shortcut off s | shortcut on s | on / off | same answers |")
    print("| --- | ---: | ---: | ---: | ---: |")

    with tempfile.TemporaryDirectory() as tmp:
        questions = load_eval_set(write_split(Path(tmp) / "test", "test", seed=0, n=args.scenes, progress=False))
        pipes = {cache: Pipeline(loaded, cache_prompt=cache) for cache in (False, True)}
        first, _ = question_and_reference(questions[0])
        for pipe in pipes.values():  # warm-up: the fused image path is folded on first use
            pipeline_answer(pipe)(first, questions[0].image)
        runs = {cache: timed(lambda pipe=pipe: evaluate(pipeline_answer(pipe), questions, progress=False))
                for cache, pipe in pipes.items()}
        (off, t_off), (on, t_on) = runs[False], runs[True]
        same = sum(a["prediction"] == b["prediction"] for a, b in zip(off["predictions"], on["predictions"],
                                                                       strict=True))
        print(f"| {len(questions)} questions about {args.scenes} images (prompt cache) | {t_off:.1f} | {t_on:.1f} "
              f"| {t_on / t_off:.2f} | {same} / {len(questions)} |")

    prompts = train_prompts(0)[: args.prompts]
    pipe = Pipeline(loaded, cache_prompt=False)
    pipe.generate_batch(prompts[:2], max_new_tokens=2)  # warm-up
    one_by_one, t_off = timed(lambda: [pipe.generate(p, max_new_tokens=MAX_NEW_TOKENS).text for p in prompts])
    batched, t_on = timed(lambda: [r.text for r in pipe.generate_batch(prompts, max_new_tokens=MAX_NEW_TOKENS)])
    same = sum(a == b for a, b in zip(one_by_one, batched, strict=True))
    print(f"| {len(prompts)} text prompts, up to {MAX_NEW_TOKENS} tokens (batched) | {t_off:.1f} | {t_on:.1f} "
          f"| {t_on / t_off:.2f} | {same} / {len(prompts)} |")


if __name__ == "__main__":
    main()
