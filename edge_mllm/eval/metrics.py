"""Answer normalisation, VQA accuracy and POPE metrics (Li et al., 2023, "Evaluating Object
Hallucination in Large Vision-Language Models")."""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict

NUMBER_WORDS = {"zero": "0", "none": "0", "no": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str, numeric: bool = False) -> str:
    """Lowercase, punctuation and articles removed, whitespace collapsed (VQAv2-style); with
    ``numeric``, number words become digits (so "two" matches "2" on counting questions)."""
    words = [w for w in text.lower().translate(_PUNCT).split() if w not in ARTICLES]
    if numeric:
        words = [NUMBER_WORDS.get(w, w) for w in words]
    return " ".join(words)


def is_correct(prediction: str, reference: str) -> bool:
    numeric = bool(re.fullmatch(r"\d+", reference.strip()))
    return normalize_answer(prediction, numeric) == normalize_answer(reference, numeric)


def vqa_accuracy(items: list[tuple[str, str, str]]) -> dict:
    """``items``: (question_type, prediction, reference) → overall and per-type exact-match accuracy."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for qtype, prediction, reference in items:
        by_type[qtype].append(is_correct(prediction, reference))
    flat = [c for results in by_type.values() for c in results]
    return {
        "accuracy": sum(flat) / len(flat) if flat else 0.0,
        "count": len(flat),
        "by_type": {t: {"accuracy": sum(r) / len(r), "count": len(r)} for t, r in sorted(by_type.items())},
    }


def pope_yes(prediction: str) -> bool:
    """POPE's rule: an answer is "no" if it says no or not anywhere, else "yes"."""
    words = set(normalize_answer(prediction).split())
    return not ({"no", "not"} & words)


def pope_metrics(items: list[tuple[bool, bool]]) -> dict:
    """``items``: (predicted yes, truly yes) → accuracy, precision, recall, F1 and yes-ratio, with
    "yes" as the positive class."""
    tp = sum(p and t for p, t in items)
    fp = sum(p and not t for p, t in items)
    fn = sum(t and not p for p, t in items)
    tn = sum(not p and not t for p, t in items)
    n = len(items)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "count": n}


def caption_scores(items: list[tuple[str, str]]) -> dict:
    """``items``: (prediction, reference) descriptions → the share that match exactly after
    normalisation, and the mean word-overlap F1 (SQuAD's token F1: partial credit for the objects and
    attributes a description gets right)."""

    def f1(prediction: str, reference: str) -> float:
        predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
        common = sum((Counter(predicted) & Counter(expected)).values())
        return 2 * common / (len(predicted) + len(expected)) if common else 0.0

    n = len(items)
    return {"exact": sum(normalize_answer(p) == normalize_answer(r) for p, r in items) / n if n else 0.0,
            "token_f1": sum(f1(p, r) for p, r in items) / n if n else 0.0, "count": n}
