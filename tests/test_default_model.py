"""The embedded default model sees: its shipped weights (vision tower, projector, LoRA) answer
held-out synthetic questions far better than the same model with the untrained tower it started from."""

from __future__ import annotations

import pytest

from edge_mllm.data.synth import write_split
from edge_mllm.default import TRAINED_WEIGHTS, load_default, untrained_default
from edge_mllm.eval.runner import evaluate, load_eval_set, pipeline_answer
from edge_mllm.pipeline import Pipeline


def test_trained_weights_are_small_package_data():
    assert TRAINED_WEIGHTS.is_file()
    assert TRAINED_WEIGHTS.stat().st_size < 20 * 2**20


@pytest.mark.slow
def test_trained_default_beats_its_untrained_start(tmp_path):
    # Seed 1 of the test split: scenes the recipe never trained or evaluated on.
    questions = load_eval_set(write_split(tmp_path / "test", "test", 1, 5))
    questions = [q for q in questions if q.meta["question_type"] in ("color", "count", "pope")]
    trained = evaluate(pipeline_answer(Pipeline(load_default(progress=False))), questions, progress=False)
    untrained = evaluate(pipeline_answer(Pipeline(untrained_default(progress=False))), questions, progress=False)
    color = trained["vqa"]["by_type"]["color"]["accuracy"]
    assert color >= 0.8, trained["vqa"]
    assert color > untrained["vqa"]["by_type"].get("color", {}).get("accuracy", 0.0) + 0.3
    assert trained["vqa"]["accuracy"] > untrained["vqa"]["accuracy"]
