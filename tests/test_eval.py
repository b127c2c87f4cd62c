"""Evaluation metrics on hand-made predictions, and the evaluator over answer functions and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_mllm.data.llava import DataError
from edge_mllm.data.synth import write_split
from edge_mllm.eval.metrics import caption_scores, is_correct, normalize_answer, pope_metrics, pope_yes, vqa_accuracy
from edge_mllm.eval.runner import evaluate, evaluate_captions, load_eval_set


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("eval") / "test", "test", 0, 3)


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [("Red.", "red", True), ("The red", "red", True), ("top  left", "top left", True), ("two", "2", True),
     ("2 objects", "2", False), ("blue", "red", False), ("red square", "red", False), ("No", "no", True)],
)
def test_normalised_exact_match(prediction, reference, correct):
    assert is_correct(prediction, reference) is correct


def test_number_words_only_map_for_numeric_answers():
    assert normalize_answer("No, none.") == "no none"
    assert normalize_answer("none", numeric=True) == "0"


def test_vqa_accuracy_by_type():
    report = vqa_accuracy([("color", "red", "red"), ("color", "blue", "red"), ("count", "3", "3"),
                           ("count", "three", "3")])
    assert report["accuracy"] == 0.75 and report["count"] == 4
    assert report["by_type"] == {"color": {"accuracy": 0.5, "count": 2}, "count": {"accuracy": 1.0, "count": 2}}


def test_pope_metrics_hand_computed():
    # 3 true yes (2 said yes), 5 true no (1 said yes): tp=2 fn=1 fp=1 tn=4
    items = [(True, True), (True, True), (False, True), (True, False)] + [(False, False)] * 4
    m = pope_metrics(items)
    assert m["accuracy"] == 6 / 8 and m["precision"] == 2 / 3 and m["recall"] == 2 / 3
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 3 / 8 and m["count"] == 8
    assert pope_metrics([(True, True), (True, False)])["precision"] == 0.5


def test_pope_answer_rule():
    assert pope_yes("Yes, there is.") and not pope_yes("No.") and not pope_yes("There is not.")


def test_caption_scores_hand_computed():
    reference = "A small red circle at the top and a large blue square at the left."
    scores = caption_scores([
        ("a small red circle at the top and a large blue square at the left", reference),  # exact after normalising
        # articles dropped: its 5 words are all among the reference's 11, F1 10/16
        ("A small red circle at the top.", reference),
        ("Nothing.", reference),
    ])
    assert scores["count"] == 3 and scores["exact"] == pytest.approx(1 / 3)
    assert scores["token_f1"] == pytest.approx((1 + 10 / 16 + 0) / 3)
    assert caption_scores([]) == {"exact": 0.0, "token_f1": 0.0, "count": 0}


def test_captions_are_asked_with_their_image(test_split):
    from edge_mllm.data.llava import load_conversations
    from edge_mllm.data.synth import CAPTIONS_FILE

    captions = load_conversations(test_split / CAPTIONS_FILE)
    references = {c.image: c.messages[1]["content"] for c in captions}
    asked = []
    report = evaluate_captions(lambda q, image: asked.append(q) or references[image], captions, progress=False)
    assert report["exact"] == 1.0 and report["count"] == len(captions) == 3
    assert asked == [c.messages[0]["content"].removeprefix("<image>\n") for c in captions]
    assert [p["prediction"] for p in report["predictions"]] == [c.messages[1]["content"] for c in captions]


def test_oracle_and_always_yes(test_split):
    questions = load_eval_set(test_split)
    answers = {(c.messages[0]["content"].split("\n", 1)[1], c.image): c.messages[1]["content"] for c in questions}
    oracle = evaluate(lambda q, image: answers[q, image], questions, progress=False)
    assert oracle["vqa"]["accuracy"] == 1.0
    assert all(m["f1"] == 1.0 and m["yes_ratio"] == 0.5 for m in oracle["pope"].values())
    assert set(oracle["pope"]) == {"random", "popular", "adversarial"}
    yes = evaluate(lambda q, image: "Yes", questions, progress=False)
    for m in yes["pope"].values():
        assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert yes["vqa"]["by_type"]["color"]["accuracy"] == 0.0


def test_answer_function_gets_the_question_and_image(test_split):
    seen = []
    evaluate(lambda q, image: seen.append((q, image)) or "x", load_eval_set(test_split, limit=2), progress=False)
    assert len(seen) == 2
    assert all("<image>" not in q and q.endswith("Answer with a single word or phrase.") for q, _ in seen)
    assert all(image.is_file() for _, image in seen)


def test_an_empty_question_set_is_an_error(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="holds no evaluation questions"):
        load_eval_set(empty)


def test_cli_eval_json_on_a_tiny_checkpoint(mobilevlm_v2, test_split):
    proc = subprocess.run(
        [sys.executable, "-m", "edge_mllm.cli", "eval", str(mobilevlm_v2.path), "--data", str(test_split),
         "--limit", "6", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["vqa"]["count"] + sum(m["count"] for m in report["pope"].values()) == 6
    assert len(report["predictions"]) == 6
    assert 0.0 <= report["vqa"]["accuracy"] <= 1.0


def test_cli_eval_bad_data_is_one_line(tmp_path, mobilevlm_v2):
    bad = tmp_path / "q.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "edge_mllm.cli", "eval", str(mobilevlm_v2.path), "--data", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error:") and "not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
