"""The synthetic data generator and the LLaVA-format loader."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from edge_mllm.data.llava import (
    Conversation,
    DataError,
    join_by_image,
    load_conversations,
    make_record,
    save_records,
    single_turns,
)
from edge_mllm.data.synth import (
    CAPTIONS_FILE,
    COLORS,
    CONVERSATIONS_FILE,
    POPE_SETTINGS,
    QUESTIONS_FILE,
    SHAPES,
    caption,
    pope_questions,
    render,
    sample_scene,
    scene_rng,
    vqa_questions,
    write_split,
)


def folder_digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    a = write_split(tmp_path / "a", "test", 7, 3)
    b = write_split(tmp_path / "b", "test", 7, 3)
    assert folder_digest(a) == folder_digest(b)
    assert len([k for k in folder_digest(a) if k.startswith("images/")]) == 3


def test_a_split_can_start_at_a_later_scene(tmp_path):
    # A run that goes on from an earlier one trains on the scenes after those it saw (recipe first_scene).
    whole = write_split(tmp_path / "whole", "train", 3, 5)
    tail = write_split(tmp_path / "tail", "train", 3, 2, first=3)
    images = {k: v for k, v in folder_digest(tail).items() if k.startswith("images/")}
    assert sorted(images) == ["images/train-3-000003.png", "images/train-3-000004.png"]
    assert all(folder_digest(whole)[k] == v for k, v in images.items())
    whole_records = json.loads((whole / CONVERSATIONS_FILE).read_text())
    assert json.loads((tail / CONVERSATIONS_FILE).read_text()) == whole_records[3:]
    with pytest.raises(ValueError, match="negative"):
        write_split(tmp_path / "bad", "train", 3, 2, first=-1)


def test_rendering_in_worker_processes_writes_the_same_files(tmp_path):
    inline = write_split(tmp_path / "inline", "train", 3, 5)
    pooled = write_split(tmp_path / "pooled", "train", 3, 5, workers=2)
    assert folder_digest(inline) == folder_digest(pooled)


def test_training_scene_pixels_are_the_same_rendered_ahead_in_workers():
    from edge_mllm.preprocess import ImageProcessor
    from edge_mllm.train.scene_pixels import PREFETCH_STEPS, step_pixels

    processor = ImageProcessor(112, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    steps = [[2 * s, 2 * s + 1] for s in range(PREFETCH_STEPS + 2)]  # past the prefetch window
    inline = list(step_pixels("train", 1, steps, processor))
    pooled = list(step_pixels("train", 1, steps, processor, workers=2))
    assert len(pooled) == len(steps) and pooled[0].shape == (2, 3, 112, 112)
    assert all(torch.equal(a, b) for a, b in zip(inline, pooled, strict=True))
    assert not torch.equal(inline[0], inline[1])  # each step its own scenes


def test_splits_and_seeds_are_disjoint():
    def images(split, seed):
        return {hashlib.sha256(render(sample_scene(scene_rng(split, seed, i))).tobytes()).hexdigest()
                for i in range(12)}

    train, test, val, other_seed = images("train", 0), images("test", 0), images("val", 0), images("test", 1)
    assert len(train) == len(test) == 12
    assert not train & test and not train & val and not val & test and not test & other_seed


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        scene_rng("dev", 0, 0)


@pytest.mark.parametrize("index", range(20))
def test_questions_are_answered_by_the_scene(index):
    rng = scene_rng("val", 3, index)
    scene = sample_scene(rng)
    assert 1 <= len(scene.objects) <= 4
    assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)  # one object per cell
    text = caption(scene)
    for obj in scene.objects:
        assert f"{obj.color} {obj.shape}" in text
    for qa in vqa_questions(scene, rng):
        if qa.question == "How many objects are there?":
            assert qa.answer == str(len(scene.objects))
        if qa.type == "color":
            shape = qa.question.split()[-1].rstrip("?")
            assert [o.color for o in scene.objects if o.shape == shape] == [qa.answer]
        if qa.type == "shape":
            color = qa.question.split()[-2]
            assert [o.shape for o in scene.objects if o.color == color] == [qa.answer]
    pope = pope_questions(scene, rng)
    for setting in POPE_SETTINGS:
        answers = [qa.answer for qa in pope if qa.pope_setting == setting]
        assert sorted(answers) == ["no", "yes"]  # balanced
    for qa in pope:
        color, shape = qa.question.split()[3:5]
        assert scene.has(color, shape) == (qa.answer == "yes")
        if qa.pope_setting == "adversarial" and qa.answer == "no":
            assert any(o.color == color or o.shape == shape for o in scene.objects)


def test_rendered_colors_are_where_the_objects_are():
    scene = sample_scene(scene_rng("test", 0, 5))
    pixels = np.asarray(render(scene), dtype=np.int32)
    for obj, (dx, dy, *_rest) in zip(scene.objects, scene.jitter, strict=True):
        x = int((obj.col + 0.5 + dx) * scene.width / 3)
        y = int((obj.row + 0.5 + dy) * scene.height / 3)
        if obj.shape == "star":
            continue  # a star's centre is filled too, but thinly at small sizes
        distances = {name: np.abs(pixels[y, x] - np.array(rgb)).sum() for name, rgb in COLORS.items()}
        assert min(distances, key=distances.get) == obj.color


def test_written_files_are_llava_format(tmp_path):
    folder = write_split(tmp_path / "d", "train", 0, 4)
    conversations = load_conversations(folder / CONVERSATIONS_FILE)
    assert len(conversations) == 4
    for conv in conversations:
        assert conv.image.is_file()
        assert conv.messages[0]["content"].startswith("<image>\n")
        assert len(conv.messages) >= 4 and len(conv.messages) % 2 == 0  # multi-turn
    questions = json.loads((folder / QUESTIONS_FILE).read_text())
    types = {q["question_type"] for q in questions}
    assert {"color", "count", "position", "size", "pope"} <= types
    assert all(q["conversations"][1]["value"] for q in questions)
    assert set(SHAPES) >= {q["conversations"][1]["value"] for q in questions if q["question_type"] == "shape"}


def test_loader_accepts_text_only_and_adds_the_image_marker(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "cat.png")
    records = [
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "i", "image": "cat.png",
         "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."}]},
        make_record("m", [("q1", "a1"), ("q2", "a2")], "cat.png", question_type="color"),
    ]
    save_records(records, tmp_path / "d.json")
    text, image, multi = load_conversations(tmp_path / "d.json")
    assert text.image is None and text.messages[1] == {"role": "assistant", "content": "Hello!"}
    assert image.messages[0]["content"] == "<image>\nWhat is it?"
    assert multi.meta == {"question_type": "color"} and len(multi.messages) == 4


def test_single_turns_give_each_question_its_own_image_and_nothing_else(tmp_path):
    # Evaluation asks one question at a time; in a multi-turn conversation earlier questions give later
    # answers away ("Is the blue square above the purple star?" ... "What color is the star?").
    folder = write_split(tmp_path / "d", "train", 0, 3)
    conversations = load_conversations(folder / CONVERSATIONS_FILE)
    singles = single_turns(conversations)
    assert len(singles) == sum(len(c.messages) // 2 for c in conversations)
    pairs = [(m["content"].removeprefix("<image>\n"), a["content"])
             for c in conversations for m, a in zip(c.messages[::2], c.messages[1::2], strict=True)]
    assert [(s.messages[0]["content"], s.messages[1]["content"]) for s in singles] == [
        (f"<image>\n{q}", a) for q, a in pairs]
    assert all(len(s.messages) == 2 and s.messages[0]["content"].count("<image>") == 1 for s in singles)
    assert [s.image for s in singles] == [c.image for c in conversations for _ in c.messages[::2]]
    text_only = single_turns([Conversation("t", [{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello"}])])
    assert text_only[0].messages[0]["content"] == "Hi" and text_only[0].image is None
    with pytest.raises(DataError, match="alternating"):
        single_turns([Conversation("x", [{"role": "assistant", "content": "Hi"}])])


def test_captions_join_their_scene_s_conversation(tmp_path):
    # The recipe's stage 2 learns each scene's caption as one more single question about its image,
    # packed in that image's row: one conversation per image, one image marker, the caption turn last.
    folder = write_split(tmp_path / "d", "train", 0, 3)
    conversations = load_conversations(folder / CONVERSATIONS_FILE)
    captions = load_conversations(folder / CAPTIONS_FILE)
    text = Conversation("t", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    joined = join_by_image(conversations, captions + [text])
    assert [c.image for c in joined] == [c.image for c in conversations] + [None]
    for before, after in zip(conversations, joined, strict=False):
        caption_turns = next(c for c in captions if c.image == before.image).messages
        assert after.messages[: len(before.messages)] == before.messages
        assert after.messages[len(before.messages):] == [
            {"role": "user", "content": caption_turns[0]["content"].removeprefix("<image>\n")}, caption_turns[1]]
        assert sum(m["content"].count("<image>") for m in after.messages) == 1
    assert len(before.messages) + 2 == len(after.messages)  # the inputs are left as they were
    assert single_turns(joined)[len(conversations[0].messages) // 2].messages[1] == captions[0].messages[1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2", "not valid JSON"),
        ('{"a": 1}', "JSON list"),
        ('[{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}]', "turn 0"),
        ('[{"conversations": [{"from": "human", "value": "x"}]}]', "pairs"),
        ('[{"image": "missing.png", "conversations": [{"from": "human", "value": "x"}, '
         '{"from": "gpt", "value": "y"}]}]', "missing"),
        ('[{"conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]}]', "<image>"),
    ],
)
def test_loader_errors_are_clear(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_conversations(path)


def test_loader_finds_every_unreadable_image_before_any_work(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "notes.png").write_text("not pixels")
    (tmp_path / "empty.jpg").write_bytes(b"")
    turns = [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]
    records = [{"image": name, "conversations": turns} for name in ("ok.png", "notes.png", "ok.png", "empty.jpg")]
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"2 image\(s\) listed in .*data.json cannot be read, e.g. .*notes.png: not an"):
        load_conversations(tmp_path / "data.json")
    (tmp_path / "data.json").write_text(json.dumps(records[:1]))
    assert load_conversations(tmp_path / "data.json")[0].image == tmp_path / "ok.png"


def test_loader_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_conversations(tmp_path / "nope.json")
