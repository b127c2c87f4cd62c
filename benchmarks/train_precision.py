"""Stage-2 training steps in fp32 and in bf16 mixed precision, side by side in one run.

    python benchmarks/train_precision.py [--steps 3] [--repeats 2] [--threads 2] [--scenes 4]

The recipe's stage 2 (`train-default`: quantization-aware LoRA on SmolLM2 through the 4-bit grid, the
questions about each image packed after its prompt, `instruct_batch` rows per step) on the shipped
vision tower and projector, one trainer per precision built from the same seed. Both train on the
same fixed batch; their steps alternate (a warm-up step each first) so machine noise hits both alike.
Prints seconds per step (median), bf16 / fp32, and each precision's first loss. bf16 is only faster
where the CPU multiplies it natively (AVX512-BF16 or AMX; `--precision auto` picks it there): the
script says which this CPU is.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from edge_mllm.chat import ChatTemplate
from edge_mllm.data.llava import load_conversations
from edge_mllm.data.synth import CONVERSATIONS_FILE, write_split
from edge_mllm.default import TRAINED_WEIGHTS, load_trained_vision, trained_projector, untrained_default
from edge_mllm.train.precision import native_bf16
from edge_mllm.train.recipe import RecipeConfig, instruct_config
from edge_mllm.train.trainer import Trainer

PRECISIONS = ("fp32", "bf16")


def stage2_trainer(precision: str) -> Trainer:
    """The recipe's stage-2 trainer in ``precision``, on the shipped tower and projector."""
    loaded = untrained_default(seed=0, progress=False, projector=trained_projector(TRAINED_WEIGHTS))
    load_trained_vision(loaded.model, TRAINED_WEIGHTS)
    config = instruct_config(RecipeConfig(precision=precision))
    return Trainer(loaded.model, loaded.tokenizer, ChatTemplate(loaded.chat_template), config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per precision and repeat")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of alternating fp32 / bf16 steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scenes", type=int, default=4, help="train scenes the fixed batch is drawn from")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"CPU multiplies bf16 natively (AVX512-BF16 or AMX): {'yes' if native_bf16(cpu) else 'no'}; "
          f"{args.threads} threads")

    trainers = {p: stage2_trainer(p) for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as tmp:
        split = write_split(Path(tmp) / "train", "train", seed=0, n=args.scenes)
        conversations = load_conversations(split / CONVERSATIONS_FILE)
        batches = {p: t.examples(conversations)[: t.config.batch_size] for p, t in trainers.items()}
        for trainer in trainers.values():  # the recipe's stage-2 peak rate, without its schedule
            for group in trainer.optimizer.param_groups:
                group["lr"] = group["peak_lr"]
        first_loss = {p: trainers[p].train_step(batches[p]) for p in PRECISIONS}  # warm-up
        seconds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for _ in range(args.repeats):
            for precision in PRECISIONS:
                for _ in range(args.steps):
                    start = time.perf_counter()
                    trainers[precision].train_step(batches[precision])
                    seconds[precision].append(time.perf_counter() - start)

    rows = sum(max(1, len(e.branches)) for e in batches["fp32"])
    print(f"one stage-2 step: {len(batches['fp32'])} packed rows, {rows} questions; "
          f"median of {args.steps * args.repeats} steps each")
    print("| precision | s / step | vs fp32 | first loss |")
    print("| --- | ---: | ---: | ---: |")
    base = statistics.median(seconds["fp32"])
    for precision in PRECISIONS:
        median = statistics.median(seconds[precision])
        print(f"| {precision} | {median:.2f} | {median / base:.2f}x | {first_loss[precision]:.4f} |")


if __name__ == "__main__":
    main()
