"""Distillation: layer-selected students, the KD losses (zero when student = teacher), a learning
step, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edge_mllm.chat import ChatTemplate
from edge_mllm.checkpoint import load_model
from edge_mllm.data.llava import DataError, load_conversations
from edge_mllm.data.synth import CONVERSATIONS_FILE, write_split
from edge_mllm.distill.distiller import DistillConfig, Distiller
from edge_mllm.distill.losses import kd_kl, layer_cosine
from edge_mllm.distill.student import make_student, select_layers
from edge_mllm.distill.teacher_answers import ANSWERS_FILE, with_teacher_answers
from edge_mllm.errors import OptionError
from edge_mllm.train.examples import tokenize_conversation
from edge_mllm.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    return load_conversations(write_split(tmp_path_factory.mktemp("d") / "train", "train", 1, 3) / CONVERSATIONS_FILE)


@pytest.mark.parametrize(("n_teacher", "n_student", "selection", "expected"),
                         [(30, 10, "even", [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]), (4, 2, "even", [0, 3]),
                          (3, 3, "even", [0, 1, 2]), (5, 1, "even", [4]),
                          (30, 10, "front", [0, 1, 2, 3, 4, 5, 6, 7, 8, 29]), (4, 2, "front", [0, 3]),
                          (3, 3, "front", [0, 1, 2]), (5, 1, "front", [4]),
                          (30, 10, "ends", [0, 1, 2, 3, 4, 25, 26, 27, 28, 29]), (30, 3, "ends", [0, 1, 29]),
                          (4, 2, "ends", [0, 3]), (3, 3, "ends", [0, 1, 2]), (5, 1, "ends", [4])])
def test_select_layers(n_teacher, n_student, selection, expected):
    assert select_layers(n_teacher, n_student, selection) == expected


def test_select_layers_refuses_impossible_students():
    with pytest.raises(OptionError, match="1 to 4"):  # the CLI's exit 2
        select_layers(4, 5)
    with pytest.raises(OptionError, match="ends, front, even"):
        select_layers(4, 2, "odd")


def test_resume_restores_the_hidden_projection_and_refuses_other_settings(mobilevlm_v2, conversations, tmp_path):
    def distiller(hidden_weight: float, teacher_answers: bool = False) -> Distiller:
        teacher = load_model(mobilevlm_v2.path)
        config = TrainConfig(stage="instruct", epochs=1, batch_size=2, lr=1e-2, lora_rank=0, checkpoint_every=0)
        return Distiller(make_student(teacher.model, [1]), teacher.model, teacher.tokenizer,
                         ChatTemplate(teacher.chat_template), config,
                         DistillConfig(hidden_weight=hidden_weight, teacher_answers=teacher_answers))

    trained = distiller(1.0)
    trained.train(conversations, checkpoint_dir=tmp_path, progress=False)
    assert not torch.equal(trained.projection.weight, torch.eye(*trained.projection.weight.shape))  # it learnt
    resumed = distiller(1.0)
    resumed.load_checkpoint(tmp_path)
    assert torch.equal(resumed.projection.weight, trained.projection.weight)
    with pytest.raises(OptionError, match="hidden_weight"):
        distiller(0.5).load_checkpoint(tmp_path)
    with pytest.raises(OptionError, match="teacher_answers"):  # trained on the data's answers, not the teacher's
        distiller(1.0, teacher_answers=True).load_checkpoint(tmp_path)


def test_student_keeps_the_selected_blocks(mobilevlm_v2):
    teacher = load_model(mobilevlm_v2.path).model
    student = make_student(teacher, select_layers(2, 1))
    assert student.config.text.num_hidden_layers == 1 and teacher.config.text.num_hidden_layers == 2
    kept = student.language_model.model.layers[0]
    last = teacher.language_model.model.layers[1]
    for (name, param), (_, ref) in zip(kept.named_parameters(), last.named_parameters(), strict=True):
        assert torch.equal(param, ref), name
        assert param.data_ptr() != ref.data_ptr()  # a copy: training the student leaves the teacher alone
    assert student.parameter_counts()["language_model"] < teacher.parameter_counts()["language_model"]
    ids = torch.tensor([[1, 5, 7]])
    with pytest.raises(OptionError, match="blocks 0 to 1"):
        make_student(teacher, [2])
    with torch.no_grad():  # the student runs on its own (its LLM config says 1 layer)
        assert student.language_model(student.language_model.embed(ids)).shape == (1, 3, teacher.config.text.vocab_size)


def test_kl_is_zero_only_for_identical_distributions():
    logits = torch.randn(5, 11)
    assert kd_kl(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(logits + torch.randn(5, 11), logits, 2.0).item() > 1e-3


def test_layer_cosine_compares_matched_blocks_whatever_their_scale():
    states = [torch.randn(4, 8), torch.randn(4, 8) * 100]
    assert layer_cosine([s * 3 for s in states], states).item() == pytest.approx(0.0, abs=1e-6)
    assert layer_cosine(states[::-1], states).item() > 0.1
    assert layer_cosine([-s for s in states], states).item() == pytest.approx(2.0)


@pytest.mark.parametrize("single_turns", [False, True])
def test_distillation_loss_is_zero_when_student_equals_teacher(mobilevlm_v2, conversations, single_turns):
    loaded = load_model(mobilevlm_v2.path)
    teacher = loaded.model
    layers = tuple(range(teacher.config.text.num_hidden_layers))  # all layers: the same model
    distiller = Distiller(make_student(teacher, layers), teacher, loaded.tokenizer, ChatTemplate(loaded.chat_template),
                          TrainConfig(stage="instruct", lora_rank=0, single_turns=single_turns),
                          DistillConfig(alpha=0.0, hidden_weight=1.0, layer_weight=1.0, teacher_layers=layers))
    # single turns: each question packed after the shared image prompt, teacher and student alike
    batch = distiller.examples(conversations[:2])
    assert any(e.branches for e in batch) == single_turns and (len(batch) == 2 or single_turns)
    with torch.no_grad():
        loss, n = distiller.batch_loss(batch)
    assert n > 0 and loss.item() == pytest.approx(0.0, abs=1e-5)


def test_distillation_steps_move_the_student_toward_the_teacher(mobilevlm_v2, conversations):
    loaded = load_model(mobilevlm_v2.path)
    teacher = loaded.model
    student = make_student(teacher, [1])
    with pytest.raises(OptionError, match="block matching"):  # which teacher block to match is not known
        Distiller(student, teacher, loaded.tokenizer, ChatTemplate(loaded.chat_template),
                  TrainConfig(stage="instruct", lora_rank=0), DistillConfig(layer_weight=0.5))
    distiller = Distiller(student, teacher, loaded.tokenizer, ChatTemplate(loaded.chat_template),
                          TrainConfig(stage="instruct", lora_rank=0, lr=3e-3),
                          DistillConfig(alpha=0.0, hidden_weight=0.5, layer_weight=0.5, teacher_layers=(1,)))
    batch = [tokenize_conversation(c, loaded.tokenizer, distiller.template) for c in conversations[:2]]
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        before = distiller.batch_loss(batch)[0].item()
    for _ in range(5):
        loss = distiller.batch_loss(batch)[0]
        distiller.optimizer.zero_grad()
        loss.backward()
        distiller.optimizer.step()
    with torch.no_grad():
        after = distiller.batch_loss(batch)[0].item()
    assert after < before * 0.8, (before, after)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_teacher_answers_replace_the_data_answers_and_are_reused(conversations, tmp_path):
    asked = []

    def teacher(question, image):
        asked.append((question, image))
        if "color" in question.lower():
            return "", True  # nothing said: the data's answer stays
        return f"teacher says {len(asked)}", not question.lower().startswith("is there")  # cut off: stays

    cache = tmp_path / ANSWERS_FILE
    replaced = with_teacher_answers(conversations, teacher, cache)
    pairs = {(m["content"].replace("<image>\n", ""), c.image) for c in conversations for m in c.messages[::2]}
    assert sorted(asked) == sorted(pairs)  # each question once with its image, as the evaluation asks it
    kept = changed = 0
    for before, after in zip(conversations, replaced, strict=True):
        assert (after.id, after.image, after.meta) == (before.id, before.image, before.meta)
        for k, (old, new) in enumerate(zip(before.messages, after.messages, strict=True)):
            if k % 2 == 0:
                assert new == old  # questions untouched
                continue
            question = before.messages[k - 1]["content"].lower()
            if "color" in question or "is there" in question:
                assert new == old
                kept += 1
            else:
                assert new["content"].startswith("teacher says") and old["content"] != new["content"]
                changed += 1
    assert kept and changed
    assert not any(m["content"].startswith("teacher says") for c in conversations for m in c.messages)

    def unreachable(question, image):
        raise AssertionError("a cached answer was asked again")

    assert [c.messages for c in with_teacher_answers(conversations, unreachable, cache)] == \
        [c.messages for c in replaced]
    cache.write_text("[1, 2")
    with pytest.raises(DataError, match="remove it"):
        with_teacher_answers(conversations, unreachable, cache)


def test_cli_distill(mobilevlm_v2, conversations, tmp_path):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([
        {"id": c.id, "image": str(c.image), "conversations": [
            {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in c.messages]}
        for c in conversations
    ]))
    proc = subprocess.run([sys.executable, "-m", "edge_mllm.cli", "distill", str(mobilevlm_v2.path),
                           "--student-layers", "1", "--data", str(data), "--images", "/", "-o", str(tmp_path / "s"),
                           "--single-turns", "--freeze-projector", "--lr", "1e-2", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["parameters"]["language_model"] < stats["teacher_parameters"]["language_model"]
    student = load_model(tmp_path / "s")
    assert student.model.config.text.num_hidden_layers == 1
    assert "distillation" in student.model.config.notes
    # --freeze-projector: the student reads the teacher's image tokens (e.g. grounded ones) as they are
    teacher = load_model(mobilevlm_v2.path).model
    assert all(torch.equal(v, teacher.mm_projector.state_dict()[k])
               for k, v in student.model.mm_projector.state_dict().items())
    assert not torch.equal(student.model.language_model.model.norm.weight, teacher.language_model.model.norm.weight)
    proc = subprocess.run([sys.executable, "-m", "edge_mllm.cli", "distill", str(mobilevlm_v2.path),
                           "--student-layers", "1", "--data", str(data), "--images", "/", "-o", str(tmp_path / "u"),
                           "--teacher-answers", "--layer-weight", "1", "--layer-selection", "even", "--epochs", "0.5",
                           "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    answered = json.loads((tmp_path / f"u.train/{ANSWERS_FILE}").read_text())
    assert len(answered) == len({(c.image, m["content"]) for c in conversations for m in c.messages[::2]})
    proc = subprocess.run([sys.executable, "-m", "edge_mllm.cli", "distill", str(mobilevlm_v2.path),
                           "--student-layers", "9", "--data", str(data), "--images", "/", "-o", str(tmp_path / "t")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "1 to 2 layers" in proc.stderr and not (tmp_path / "t").exists()
