"""LLaVA's conversation format: a JSON list of records, each with an optional ``image`` (relative to
an image folder) and ``conversations``, alternating ``{"from": "human"|"gpt", "value": ...}`` turns
with ``<image>`` marking where the image goes. LLaVA-558K, mix665k and ShareGPT4V use it; so does
``edge-mllm data synth``. Records without an image are text-only conversations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_mllm.errors import EdgeMLLMError
from edge_mllm.preprocess import image_problem
from edge_mllm.tokenizer import IMAGE_MARKER

ROLES = {"human": "user", "gpt": "assistant"}


class DataError(EdgeMLLMError):
    """A data file or folder is missing or not in the expected format."""


@dataclass
class Conversation:
    """One training or evaluation example: chat messages and, for multimodal ones, an image path."""

    id: str
    messages: list[dict[str, str]]  # {"role": "user"|"assistant", "content": ...}
    image: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # extra record keys (question_type, ...)


def make_record(id: str, turns: list[tuple[str, str]], image: str | None = None, **meta: Any) -> dict[str, Any]:
    """A LLaVA record from (question, answer) turns; the image marker leads the first question."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        if i == 0 and image is not None:
            question = f"{IMAGE_MARKER}\n{question}"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record: dict[str, Any] = {"id": id}
    if image is not None:
        record["image"] = image
    return {**record, "conversations": conversations, **meta}


def _parse(record: Any, index: int, image_folder: Path, source: Path) -> Conversation:
    where = f"{source} record {index}"
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise DataError(f"{where}: expected an object with a 'conversations' list")
    turns = record["conversations"]
    if not turns or len(turns) % 2:
        raise DataError(f"{where}: conversations must alternate human/gpt turns in pairs")
    messages = []
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {i} should be {{'from': '{expected}', 'value': str}}")
        messages.append({"role": ROLES[expected], "content": turn["value"]})
    image = None
    if record.get("image") is not None:
        image = image_folder / str(record["image"])
        if IMAGE_MARKER not in messages[0]["content"]:  # LLaVA puts the image before the first question
            messages[0]["content"] = f"{IMAGE_MARKER}\n{messages[0]['content']}"
    if sum(m["content"].count(IMAGE_MARKER) for m in messages) != (1 if image else 0):
        raise DataError(f"{where}: {IMAGE_MARKER} must appear exactly once when there is an image, else never")
    meta = {k: v for k, v in record.items() if k not in ("id", "image", "conversations")}
    return Conversation(str(record.get("id", index)), messages, image, meta)


def load_conversations(json_path: str | Path, image_folder: str | Path | None = None) -> list[Conversation]:
    """Read a LLaVA-format JSON file. Images are resolved against ``image_folder`` (default: the
    JSON file's folder); missing image files are reported up front, all at once."""
    json_path = Path(json_path)
    try:
        records = json.loads(json_path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"data file not found: {json_path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{json_path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise DataError(f"{json_path}: expected a JSON list of conversation records")
    folder = Path(image_folder) if image_folder is not None else json_path.parent
    conversations = [_parse(r, i, folder, json_path) for i, r in enumerate(records)]
    images = list(dict.fromkeys(c.image for c in conversations if c.image is not None))
    missing = [str(image) for image in images if not image.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image(s) listed in {json_path} are missing, e.g. {missing[0]}")
    unreadable = {str(image): why for image in images if (why := image_problem(image))}
    if unreadable:
        first = next(iter(unreadable.items()))
        raise DataError(f"{len(unreadable)} image(s) listed in {json_path} cannot be read, e.g. {first[0]}: {first[1]}")
    return conversations


def without_image_marker(text: str) -> str:
    """``text`` with the image marker (and the line break after it) removed."""
    return text.replace(f"{IMAGE_MARKER}\n", "").replace(IMAGE_MARKER, "")


def single_turns(conversations: list[Conversation]) -> list[Conversation]:
    """Each question-and-answer pair as a conversation of its own, the image marker leading its question.

    Why: in a multi-turn conversation about one scene, earlier questions name the objects ("Is the
    blue square above the purple star?") and so give away later answers ("What color is the star?")
    without the image; evaluation asks one question at a time. A model trained on single turns can
    only learn those answers from the image."""
    singles = []
    for conversation in conversations:
        messages = conversation.messages
        roles = [m["role"] for m in messages]
        if len(roles) % 2 or roles != ["user", "assistant"] * (len(roles) // 2):
            raise DataError(f"conversation {conversation.id}: expected alternating user/assistant turns")
        for k in range(0, len(messages), 2):
            question = without_image_marker(messages[k]["content"])
            if conversation.image is not None:
                question = f"{IMAGE_MARKER}\n{question}"
            singles.append(Conversation(f"{conversation.id}#{k // 2}", [{"role": "user", "content": question},
                                                                        messages[k + 1]],
                                        conversation.image, conversation.meta))
    return singles


def join_by_image(conversations: list[Conversation], more: list[Conversation]) -> list[Conversation]:
    """``conversations`` with the turns of each of ``more``'s appended to the first conversation about
    the same image (its image marker dropped); the rest of ``more`` (another image, or none) follow as
    they are. E.g. a scene's caption as one more turn of its questions, so that ``single_turns``
    rows share that image's prompt (``pack_shared_prefix``) instead of computing it again."""
    joined = [Conversation(c.id, list(c.messages), c.image, c.meta) for c in conversations]
    by_image = {}
    for c in joined:
        if c.image is not None:
            by_image.setdefault(c.image, c)
    rest = []
    for c in more:
        target = by_image.get(c.image) if c.image is not None else None
        if target is None:
            rest.append(c)
            continue
        target.messages += [{**m, "content": without_image_marker(m["content"])} for m in c.messages]
    return joined + rest


def save_records(records: list[dict[str, Any]], path: Path) -> None:
    path.write_text(json.dumps(records, indent=1) + "\n")
