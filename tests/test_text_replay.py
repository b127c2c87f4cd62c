"""Text replay: the teacher's answers to text-only instructions, learnt in stage 2 next to the image
questions (``edge_mllm.train.text_replay``)."""

from __future__ import annotations

import copy

import pytest
import torch

from edge_mllm.chat import ChatTemplate
from edge_mllm.checkpoint import load_model
from edge_mllm.data.llava import Conversation, load_conversations, save_records
from edge_mllm.data.synth import CONVERSATIONS_FILE, write_split
from edge_mllm.errors import EdgeMLLMError
from edge_mllm.tokenizer import Tokenizer
from edge_mllm.train.examples import IGNORE_INDEX, UNFINISHED, tokenize_conversation
from edge_mllm.train.text_replay import (
    HELD_OUT_FAMILIES,
    TRAIN_FAMILIES,
    held_out_prompts,
    teacher_records,
    text_agreement,
    train_prompts,
)
from edge_mllm.train.trainer import TrainConfig, Trainer


def test_training_and_held_out_prompts_come_from_different_families():
    train = train_prompts(0)
    assert len(train) == len(set(train)) == 200
    assert sorted(train) == sorted(train_prompts(0)) and train != train_prompts(1)  # seeded order and sums
    held = held_out_prompts()
    assert held[0] == "What is the capital of France?"  # the README's demo
    assert not set(held) & set(train)
    stems = {template.split("{")[0] for template in HELD_OUT_FAMILIES}
    assert not any(prompt.startswith(stem) for prompt in train for stem in stems if stem != "What is ")
    assert not set(TRAIN_FAMILIES) & set(HELD_OUT_FAMILIES)


def test_teacher_records_mark_answers_cut_off_and_learn_them_without_an_end_of_turn(tmp_path, chatml_tokenizer):
    answers = {"a?": ("Finished.", True), "b?": ("Cut off mid", False), "c?": ("  ", True)}
    save_records(teacher_records(lambda ps: [answers[p] for p in ps], list(answers)), tmp_path / "text.json")
    conversations = load_conversations(tmp_path / "text.json")
    assert [(c.messages[0]["content"], c.messages[1]["content"], c.image, c.meta.get(UNFINISHED, False))
            for c in conversations] == [("a?", "Finished.", None, False), ("b?", "Cut off mid", None, True)]
    tok, template = Tokenizer(chatml_tokenizer), ChatTemplate("tokenizer")
    finished, cut = (tokenize_conversation(c, tok, template) for c in conversations)
    learnt = [tok.decode([t for t in e.labels if t != IGNORE_INDEX], skip_special_tokens=False)
              for e in (finished, cut)]
    assert learnt == ["Finished.<|im_end|>\n", "Cut off mid"]
    assert cut.labels[-1] != IGNORE_INDEX  # the row ends with the answer's last word
    assert tok.decode(cut.input_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\nCut off mid")


def test_an_unfinished_conversation_must_end_with_an_answer_as_written(chatml_tokenizer):
    conversation = Conversation("x", [{"role": "user", "content": "q"}, {"role": "assistant", "content": " a "}],
                                meta={UNFINISHED: True})
    trimming = copy.deepcopy(chatml_tokenizer)  # a template that trims answers: the cut has no place
    trimming.chat_template = trimming.chat_template.replace("message['content']", "(message['content'] | trim)")
    with pytest.raises(EdgeMLLMError, match="unfinished"):
        tokenize_conversation(conversation, Tokenizer(trimming), ChatTemplate("tokenizer"))


def test_text_agreement_counts_answers_that_changed():
    report = text_agreement(["p", "q", "r", "s"], ["A", "Bb", "C", "D"], ["A", "Bc", "C", "D"])
    assert report["unchanged"] == 0.75 and report["prefix_kept"] == (3 + 0.5) / 4
    assert report["changed"] == [{"prompt": "q", "before": "Bb", "after": "Bc"}]


def test_text_rows_train_in_one_batch_with_packed_image_rows(mobilevlm_v2, tmp_path):
    # A batch mixes replayed text rows (one causal sequence) with rows of questions packed after an
    # image prompt: the loss is each row's own, as when they are learnt apart.
    tiny = load_model(mobilevlm_v2.path)
    config = TrainConfig(stage="instruct", lora_rank=4, single_turns=True, seed=0)
    trainer = Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template), config)
    images = load_conversations(write_split(tmp_path / "train", "train", 0, 1) / CONVERSATIONS_FILE)
    save_records(teacher_records(lambda ps: [(f"An answer to {p}", True) for p in ps],
                                 ["What is 2 + 3?", "Why do birds sing?"]),
                 tmp_path / "text.json")
    rows = trainer.examples(images + load_conversations(tmp_path / "text.json"))
    assert [len(r.branches) > 1 for r in rows][-2:] == [False, False] and rows[0].branches
    text_targets = [tiny.tokenizer.decode([t for t in r.labels if t != IGNORE_INDEX]) for r in rows[-2:]]
    assert text_targets[0].strip().startswith("An answer to What is 2 + 3?")
    with torch.no_grad():
        for name, p in tiny.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
        mixed, count = trainer.batch_loss(rows, penalise_norm=False)
        apart = [trainer.batch_loss([r], penalise_norm=False) for r in rows]
    assert count == sum(n for _, n in apart)
    assert float(mixed) == pytest.approx(sum(float(loss) * n for loss, n in apart) / count, rel=1e-5)
