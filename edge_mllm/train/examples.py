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


@dataclass
class Example:
    input_ids: list[int]  # IMAGE_TOKEN_INDEX where the image goes
    labels: list[int]  # same length; IGNORE_INDEX where there is no loss
    image: Path | None


def tokenize_conversation(conversation: Conversation, tokenizer: Tokenizer, template: ChatTemplate) -> Example:
    """Render with the chat template and label the assistant's spans.

    Each span is found as the text an assistant turn adds after its generation prompt (rendering is
    prefix-consistent), then the text is tokenized piece by piece at those boundaries, as LLaVA's
    ``preprocess`` does per round, so every label lines up with its token exactly.
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


def embed_batch(
    model: MultimodalLM, examples: list[Example], image_embeds: list[torch.Tensor | None], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs_embeds [B, T, D] and labels [B, T]; image placeholders expand to the
    image's embeddings with ignored labels. Sequences are cut at ``max_len``."""
    rows, row_labels = [], []
    for example, embeds in zip(examples, image_embeds, strict=True):
        rows.append(model.embed_prompt(example.input_ids, None if embeds is None else embeds[None])[0, :max_len])
        expanded = []
        for tok, label in zip(example.input_ids, example.labels, strict=True):
            expanded += [IGNORE_INDEX] * model.num_image_tokens if tok == IMAGE_TOKEN_INDEX else [label]
        row_labels.append(torch.tensor(expanded[:max_len]))
    length = max(r.shape[0] for r in rows)
    inputs = torch.zeros(len(rows), length, rows[0].shape[1], dtype=rows[0].dtype, device=rows[0].device)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, row_labels, strict=True)):
        inputs[i, : row.shape[0]] = row
        labels[i, : lab.shape[0]] = lab
    return inputs, labels.to(inputs.device)


def lm_loss(model: MultimodalLM, inputs_embeds: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions, and how many there were. The LM head
    runs only at those positions (it is the largest matmul for a small LLM with a big vocabulary)."""
    lm = model.language_model
    hidden = lm.hidden_states(inputs_embeds)[:, :-1]
    targets = labels[:, 1:]
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
