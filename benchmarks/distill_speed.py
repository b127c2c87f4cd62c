"""Teacher vs distilled student, side by side in one run: LLM parameters, decode speed, and (with
--data) VQA / POPE accuracy on a held-out split.

    python benchmarks/distill_speed.py [--student STUDENT_DIR | --student-layers N] [--data TEST_DIR]

Without --student, the student is the teacher's layer-selected initialisation (same speed as a
trained one: speed depends only on the architecture). Runs alternate teacher/student so machine noise
hits both alike; the numbers printed are medians.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from edge_mllm.checkpoint import LoadedModel, load_model
from edge_mllm.distill.student import make_student, select_layers
from edge_mllm.pipeline import Pipeline

PROMPT = "Write a short story about a robot who learns to paint."


def decode_speed(pipeline: Pipeline, tokens: int) -> float:
    # No stop tokens: every run decodes exactly `tokens` tokens, whatever the model would answer (a student
    # distilled on one-word answers ends its turn at once).
    out = pipeline.generate(PROMPT, max_new_tokens=tokens, temperature=0.8, seed=0, stop_token_ids=())
    return out.timings["decode_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="teacher model (default: the embedded default)")
    parser.add_argument("--student", default=None, help="trained student folder (edge-mllm distill -o)")
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--data", default=None, help="held-out split folder to also compare accuracy")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher = load_model(args.teacher)
    if args.student:
        student = load_model(args.student)
    else:
        layers = select_layers(teacher.model.config.text.num_hidden_layers, args.student_layers)
        student = LoadedModel(make_student(teacher.model, layers), teacher.tokenizer,
                              teacher.chat_template)
    pipes = {"teacher": Pipeline(teacher), "student": Pipeline(student)}
    for pipe in pipes.values():
        decode_speed(pipe, 8)  # warm-up
    speeds: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            speeds[name].append(decode_speed(pipe, args.tokens))
    rows = {}
    for name, pipe in pipes.items():
        rows[name] = {"llm_params_M": pipe.model.parameter_counts()["language_model"] / 1e6,
                      "layers": pipe.model.config.text.num_hidden_layers,
                      "decode_tok_s": statistics.median(speeds[name])}
    if args.data:
        from edge_mllm.eval.runner import evaluate, load_eval_set, pipeline_answer

        questions = load_eval_set(args.data)
        for name, pipe in pipes.items():
            report = evaluate(pipeline_answer(pipe), questions)
            rows[name]["vqa_acc"] = report["vqa"]["accuracy"]
            rows[name]["pope_f1_adv"] = report["pope"].get("adversarial", {}).get("f1", float("nan"))
            by_type = ", ".join(f"{t} {v['accuracy'] * 100:.1f}" for t, v in report["vqa"]["by_type"].items())
            pope = " / ".join(f"{s} {v['f1']:.3f}" for s, v in report["pope"].items())
            rows[name]["breakdown"] = f"{name}: VQA by type {by_type}; POPE F1 {pope}"
    print(f"threads={args.threads} tokens={args.tokens} repeats={args.repeats}")
    accuracy_columns = " VQA acc | POPE F1 (adv) |" if args.data else ""
    print("| model | LLM layers | LLM params (M) | decode tok/s |" + accuracy_columns)
    print("| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if args.data else ""))
    for name, r in rows.items():
        extra = f" {r['vqa_acc'] * 100:.1f}% | {r['pope_f1_adv']:.3f} |" if args.data else ""
        print(f"| {name} | {r['layers']} | {r['llm_params_M']:.1f} | {r['decode_tok_s']:.1f} |{extra}")
    for r in rows.values():
        if "breakdown" in r:
            print(r["breakdown"])
    t, s = rows["teacher"], rows["student"]
    print(f"student/teacher: params {s['llm_params_M'] / t['llm_params_M']:.2f}x, "
          f"decode speed {s['decode_tok_s'] / t['decode_tok_s']:.2f}x"
          + (f", VQA accuracy {s['vqa_acc'] / max(t['vqa_acc'], 1e-9):.2f}x" if args.data else ""))


if __name__ == "__main__":
    main()
