"""Conversations → token ids and labels, and batches of them.

Labels are -100 (ignored) everywhere except the assistant's turns, end-of-turn token included: the
model learns to answer and to stop, never to predict the question or the image. For a caption
conversation that is "loss on caption tokens only" (stage 1); for instruction data, "response tokens
only" (stage 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edge_mllm.chat import ChatTemplate
from edge_mllm.data.llava import Conversation
from edge_mllm.errors import EdgeMLLMError
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX, MultimodalLM
from edge_mllm.tokenizer import Tokenizer

IGNORE_INDEX = -100
# A conversation meta key: its last answer does not end (no end-of-turn tokens to learn)
UNFINISHED = "unfinished"


@dataclass
class Example:
    input_ids: list[int]  # IMAGE_TOKEN_INDEX where the image goes
    labels: list[int]  # same length; IGNORE_INDEX where there is no loss
    image: Path | None
    # Lengths of the independent continuations that end ``input_ids``, each seeing only the prefix
    # before them and itself (``pack_shared_prefix``); empty: one causal sequence.
    branches: tuple[int, ...] = ()


def learns_within(example: Example, image_tokens: int, max_len: int) -> bool:
    """Whether any of ``example``'s labelled tokens lies within its first ``max_len`` positions (each
    image taking ``image_tokens``): rows are cut there, and a row cut before its answer teaches nothing."""
    position = 0
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if position >= max_len:
            return False
        if label != IGNORE_INDEX:
            return True
        position += image_tokens if token == IMAGE_TOKEN_INDEX else 1
    return False


@dataclass
class EmbeddedBatch:
    inputs: torch.Tensor  # [B, T, D] inputs_embeds, right-padded
    labels: torch.Tensor  # [B, T]
    # Per-row RoPE positions [B, T] and attention mask [B, T, T] when a row packs branches; None: causal
    input_pos: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None


def tokenize_conversation(conversation: Conversation, tokenizer: Tokenizer, template: ChatTemplate) -> Example:
    """Render with the chat template and label the assistant's spans.

    Each span is found as the text an assistant turn adds after its generation prompt (rendering is
    prefix-consistent), then the text is tokenized piece by piece at those boundaries, as LLaVA's
    ``preprocess`` does per round, so every label lines up with its token exactly. A conversation
    marked ``UNFINISHED`` ends with its last answer's words.
    """
    messages = conversation.messages
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(template.render(messages[:k], tokenizer, add_generation_prompt=True))
        end = len(template.render(messages[: k + 1], tokenizer, add_generation_prompt=False))
        spans.append((start, end))
    text = template.render(messages, tokenizer, add_generation_prompt=False)
    if conversation.meta.get(UNFINISHED):
        # The last answer was cut off (e.g. a teacher's, at its length limit): learn its words but not
        # an end of turn there, so the text ends where the answer does.
        start, answer = spans[-1][0], messages[-1]["content"]
        if messages[-1]["role"] != "assistant" or not text.startswith(answer, start):
            raise EdgeMLLMError(f"conversation {conversation.id}: an unfinished conversation must end with "
                                "an assistant answer the chat template keeps as written")
        spans[-1] = (start, start + len(answer))
        text = text[: start + len(answer)]
    cuts = [0] + [c for span in spans for c in span] + [len(text)]
    ids: list[int] = []
    labels: list[int] = []
    for i in range(len(cuts) - 1):
        piece = text[cuts[i] : cuts[i + 1]]
        if not piece:
            continue
        piece_ids = tokenizer.encode_with_images(piece) if i == 0 else tokenizer.encode(piece, add_special_tokens=False)
        is_target = i % 2 == 1
        ids += piece_ids
        labels += piece_ids if is_target else [IGNORE_INDEX] * len(piece_ids)
    if IMAGE_TOKEN_INDEX in labels or all(label == IGNORE_INDEX for label in labels):
        raise EdgeMLLMError(f"conversation {conversation.id}: no assistant tokens to learn from")
    return Example(ids, labels, conversation.image)


def pack_shared_prefix(examples: list[Example], model: MultimodalLM, max_len: int) -> list[Example]:
    """Examples about one image that begin with the same prompt (single questions, ``single_turns``)
    as few rows that hold that prompt once, followed by every question as a branch that sees only the
    prompt and itself, at the positions it would have alone.

    Why: the loss and gradients are exactly those of the examples one by one, but the 144 image tokens
    that dominate a short question's sequence are computed once per image instead of once per
    question (about 4× the questions per step on the synthetic data). Rows stay within ``max_len``
    positions; a branch that does not fit starts a new row with the same prompt."""
    if len(examples) < 2:
        return list(examples)
    if len({e.image for e in examples}) > 1 or any(e.branches for e in examples):
        raise EdgeMLLMError("only unpacked examples about one image can share their prompt")
    # The common prefix, ended before any example's first labelled token: every branch then starts
    # unlabelled, so no loss crosses from one branch into the next.
    shared = min(next(i for i, label in enumerate(e.labels) if label != IGNORE_INDEX) for e in examples)
    first = examples[0].input_ids
    for e in examples[1:]:
        shared = next((i for i, (a, b) in enumerate(zip(first[:shared], e.input_ids, strict=False)) if a != b), shared)
    prefix = examples[0].input_ids[:shared]
    rows: list[Example] = []
    for e in examples:
        ids, labels = e.input_ids[shared:], e.labels[shared:]
        row = rows[-1] if rows else None
        if row is None or model.prompt_length(row.input_ids) + len(ids) > max_len:
            row = Example(list(prefix), [IGNORE_INDEX] * shared, e.image, ())
            rows.append(row)
        row.input_ids += ids
        row.labels += labels
        row.branches += (len(ids),)
    return [row if len(row.branches) > 1 else Example(row.input_ids, row.labels, row.image) for row in rows]


def _row_layout(length: int, branches: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions [length] and segment ids [length] of a row whose last tokens are ``branches``:
    the shared prefix is segment 0, branch k is segment k + 1 and restarts where the prefix ends."""
    prefix = length - sum(branches)
    positions = [torch.arange(prefix)] + [torch.arange(prefix, prefix + n) for n in branches]
    segments = [torch.zeros(prefix, dtype=torch.long)] + [torch.full((n,), k + 1) for k, n in enumerate(branches)]
    return torch.cat(positions), torch.cat(segments)


def embed_batch(
    model: MultimodalLM, examples: list[Example], image_embeds: list[torch.Tensor | None], max_len: int
) -> EmbeddedBatch:
    """Right-padded inputs_embeds and labels; image placeholders expand to the image's embeddings with
    ignored labels. Sequences are cut at ``max_len``. Rows that pack branches get their positions and
    mask (a query attends to earlier keys of the shared prefix and of its own branch)."""
    rows, row_labels, layouts = [], [], []
    for example, embeds in zip(examples, image_embeds, strict=True):
        row = model.embed_prompt(example.input_ids, None if embeds is None else embeds[None])[0]
        expanded = []
        for tok, label in zip(example.input_ids, example.labels, strict=True):
            expanded += [IGNORE_INDEX] * model.num_image_tokens if tok == IMAGE_TOKEN_INDEX else [label]
        positions, segments = _row_layout(row.shape[0], example.branches)
        rows.append(row[:max_len])
        row_labels.append(torch.tensor(expanded[:max_len]))
        layouts.append((positions[:max_len], segments[:max_len]))
    length = max(r.shape[0] for r in rows)
    inputs = torch.zeros(len(rows), length, rows[0].shape[1], dtype=rows[0].dtype, device=rows[0].device)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, row_labels, strict=True)):
        inputs[i, : row.shape[0]] = row
        labels[i, : lab.shape[0]] = lab
    batch = EmbeddedBatch(inputs, labels.to(inputs.device))
    if any(e.branches for e in examples):
        input_pos = torch.zeros(len(rows), length, dtype=torch.long)
        segments = torch.full((len(rows), length), -1, dtype=torch.long)  # padding: a segment of its own
        for i, (positions, segs) in enumerate(layouts):
            input_pos[i, : positions.shape[0]], segments[i, : segs.shape[0]] = positions, segs
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        same = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
        batch.input_pos, batch.attn_mask = input_pos.to(inputs.device), (causal & same).to(inputs.device)
    return batch


def lm_loss(model: MultimodalLM, batch: EmbeddedBatch) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions, and how many there were. The LM head
    runs only at those positions (it is the largest matmul for a small LLM with a big vocabulary)."""
    lm = model.language_model
    hidden = lm.hidden_states(batch.inputs, batch.input_pos, batch.attn_mask)[:, :-1]
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep]), int(keep.sum())


def image_norm_penalty(image_embeds: torch.Tensor, word_norm: float) -> torch.Tensor:
    """Mean squared log-ratio of the image tokens' norms [..., D] to the LLM's mean word-embedding norm.

    Why: trained freely, the projector's tokens grow to ~50× a word embedding's norm (measured on the
    default model), and a token that large stays its raw embedding through every residual layer
    instead of being read and contextualised as words are (one of the two measured reasons the
    trained default ignores its images; TRAINING.md). Keeping image tokens at a word's scale keeps
    them in distribution."""
    return (image_embeds.float().norm(dim=-1) / word_norm).log().pow(2).mean()


def mean_word_norm(model: MultimodalLM) -> float:
    """The mean norm of the LLM's token embeddings: the scale ``image_norm_penalty`` keeps image tokens at."""
    return float(model.language_model.model.embed_tokens.weight.detach().float().norm(dim=-1).mean())
