"""Sequence-level knowledge distillation (Kim & Rush, 2016): the student learns the teacher's own
greedy answers in place of the data's.

Why: the word-level KL shows the student the teacher's distribution along the *data's* answers; a
student that should answer as its teacher does (the issue measures it against the teacher) learns
what the teacher actually says, right or wrong. Each question is asked alone with its image, as
single-turn training and the evaluation ask it, so the answers are the ones the evaluator would get.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from edge_mllm.data.llava import IMAGE_MARKER, Conversation, DataError, without_image_marker
from edge_mllm.pipeline import Pipeline

ANSWERS_FILE = "teacher_answers.json"  # kept with the training state, so a resumed run reuses them
ANSWER_TOKENS = 64  # a four-object caption is ~45 tokens; the closed-set answers are 1-3

# (question, image) → the teacher's answer, and whether it ended by itself
Answer = Callable[[str, Path | None], tuple[str, bool]]


def pipeline_answers(pipeline: Pipeline, max_new_tokens: int = ANSWER_TOKENS) -> Answer:
    """``pipeline``'s greedy answers (its prompt cache prefills a scene's image once for all its questions)."""

    def answer(question: str, image: Path | None) -> tuple[str, bool]:
        result = pipeline.generate(question, [image] if image else [], max_new_tokens=max_new_tokens)
        return result.text.strip(), result.finish_reason == "stop"

    return answer


def with_teacher_answers(conversations: list[Conversation], answer: Answer, cache: Path | None = None,
                         progress: bool = False) -> list[Conversation]:
    """``conversations`` with every assistant turn replaced by ``answer``'s to that turn's question.

    An empty answer, or one the length limit cut off, keeps the data's (learning a cut-off answer
    would teach the student to stop mid-sentence). ``cache``: a JSON file of earlier answers to the
    same (image, question) pairs, used where present and rewritten with the new ones."""
    known = _read_cache(cache) if cache is not None and cache.is_file() else {}
    answers: dict[str, str | None] = {}
    replaced = []
    bar = tqdm(total=sum(len(c.messages) // 2 for c in conversations), desc="teacher answers", unit="q",
               disable=not progress)
    for conversation in conversations:
        messages = [dict(m) for m in conversation.messages]
        for k in range(0, len(messages), 2):
            question = without_image_marker(messages[k]["content"])
            key = _key(conversation.image, question)
            if key not in known:
                text, finished = answer(question, conversation.image)
                known[key] = text if text and finished else None
            answers[key] = known[key]
            if known[key] is not None:
                messages[k + 1]["content"] = known[key]
            bar.update()
        replaced.append(Conversation(conversation.id, messages, conversation.image, conversation.meta))
    bar.close()
    if cache is not None:
        _write_cache(cache, answers)
    return replaced


def _key(image: Path | None, question: str) -> str:
    return f"{image or ''}{IMAGE_MARKER}{question}"


def _read_cache(path: Path) -> dict[str, str | None]:
    try:
        cached = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the teacher's answers in {path} ({exc}); remove it to answer again") from exc
    if not isinstance(cached, dict) or not all(isinstance(v, str | None) for v in cached.values()):
        raise DataError(f"{path} is not a file of teacher answers; remove it to answer again")
    return cached


def _write_cache(path: Path, answers: dict[str, str | None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(answers, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)  # atomic: a run stopped mid-write leaves the earlier file
