"""Run an evaluation set (LLaVA-format records with ``question_type`` / ``pope_setting``) through any
answer function: the PyTorch pipeline here, an exported bundle's runtime elsewhere."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from edge_mllm.data.llava import Conversation, DataError, load_conversations, without_image_marker
from edge_mllm.data.synth import QUESTIONS_FILE
from edge_mllm.eval.metrics import caption_scores, pope_metrics, pope_yes, vqa_accuracy

AnswerFn = Callable[[str, Path | None], str]


def load_eval_set(data: str | Path, limit: int | None = None) -> list[Conversation]:
    """A data folder (with ``questions.json``) or a JSON file; single-turn records only."""
    path = Path(data)
    conversations = load_conversations(path / QUESTIONS_FILE if path.is_dir() else path)
    for c in conversations:
        if len(c.messages) != 2:
            raise DataError(f"evaluation record {c.id} must have exactly one question and one answer")
    if not conversations:  # a report of nothing would read as a result
        raise DataError(f"{path} holds no evaluation questions")
    return conversations[:limit] if limit else conversations


def question_and_reference(conv: Conversation) -> tuple[str, str]:
    """An evaluation record's question, without its image marker, and its reference answer."""
    return without_image_marker(conv.messages[0]["content"]).strip(), conv.messages[1]["content"]


def evaluate(answer: AnswerFn, conversations: list[Conversation], progress: bool = True) -> dict:
    """Ask every question; report VQA accuracy (per type) and POPE metrics (per setting).

    Records with ``question_type == "pope"`` count for POPE (with their ``pope_setting``); every other
    record counts for VQA, typed by ``question_type`` (``"other"`` when absent)."""
    vqa, pope = [], defaultdict(list)
    predictions = []
    for conv in tqdm(conversations, desc="eval", unit="q", disable=not progress):
        question, reference = question_and_reference(conv)
        prediction = answer(question, conv.image)
        qtype = conv.meta.get("question_type") or "other"
        if qtype == "pope":
            pope[conv.meta.get("pope_setting") or "default"].append((pope_yes(prediction), pope_yes(reference)))
        else:
            vqa.append((qtype, prediction, reference))
        predictions.append({"id": conv.id, "type": qtype, "prediction": prediction, "reference": reference})
    report: dict = {"vqa": vqa_accuracy(vqa) if vqa else None,
                    "pope": {s: pope_metrics(items) for s, items in sorted(pope.items())}}
    report["predictions"] = predictions
    return report


def evaluate_captions(answer: AnswerFn, conversations: list[Conversation], progress: bool = True) -> dict:
    """Ask each conversation's first question (a request for a description) and score the answers
    against its reference (``caption_scores``); the answers are listed under ``predictions``."""
    items, predictions = [], []
    for conv in tqdm(conversations, desc="captions", unit="image", disable=not progress):
        question, reference = question_and_reference(conv)
        prediction = answer(question, conv.image)
        items.append((prediction, reference))
        predictions.append({"id": conv.id, "prediction": prediction, "reference": reference})
    return {**caption_scores(items), "predictions": predictions}


def pipeline_answer(pipeline, max_new_tokens: int = 12) -> AnswerFn:
    """The answer function of a PyTorch ``Pipeline``: greedy, short answers."""

    def answer(question: str, image: Path | None) -> str:
        return pipeline.generate(question, [image] if image else [], max_new_tokens=max_new_tokens).text

    return answer
