"""Grounding the projector's image tokens in the LLM's own word embeddings, before alignment.

Why: on this budget (~600 conversations on a CPU) the LLM stages do not learn to read image tokens
from scratch: the pretrained tower encodes colour and position, and the answers still do not
(TRAINING.md). This step needs no LLM forward pass, so it is cheap. It trains tower + projector so
that the image tokens covering an object read, against the LLM's own token-embedding matrix (which
SmolLM2 also uses as its LM head), as the words that describe it: its colour, shape, size, row and
column. Alignment and instruction tuning then start from image tokens that already mean something
to the LLM, the way a caption's words do. Scenes are rendered fresh each step, as in
``vision_pretrain``, from a stream of their own.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from edge_mllm.data.synth import COLORS, COLS, ROWS, SHAPES, SIZES, render, sample_scene, scene_rng
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.preprocess import ImageProcessor
from edge_mllm.tokenizer import Tokenizer
from edge_mllm.train.examples import image_norm_penalty, mean_word_norm
from edge_mllm.train.vision_pretrain import (
    STREAM_OFFSET,
    disc_pool,
    final_metrics,
    object_discs,
    scheduled_step,
)

ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES, "row": ROWS, "col": COLS}
# Cosine similarities are bounded; this sharpens them into logits (CLIP's learned scale ends near 100).
LOGIT_SCALE = 20.0
GROUNDING_STREAM = STREAM_OFFSET + (1 << 29)  # disjoint from the tower pretraining's scenes


def word_embedding(embeddings: torch.Tensor, tokenizer: Tokenizer, word: str) -> torch.Tensor:
    """`` word`` (as it appears mid-sentence in captions and questions) in the embedding space: its
    token's row, or the mean of its tokens' rows (SmolLM2 has one token for every attribute word)."""
    return embeddings[tokenizer.encode(f" {word}", add_special_tokens=False)].float().mean(0)


def object_attributes(obj) -> dict[str, int]:
    """An object's index in each of ``ATTRIBUTES``' word lists."""
    values = {"color": obj.color, "shape": obj.shape, "size": obj.size, "row": ROWS[obj.row], "col": COLS[obj.col]}
    return {name: ATTRIBUTES[name].index(value) for name, value in values.items()}


def attribute_words(model: MultimodalLM, tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """Each attribute's words as unit rows of the LLM's token-embedding matrix [words, D]."""
    embeddings = model.language_model.model.embed_tokens.weight.detach()
    return {name: F.normalize(torch.stack([word_embedding(embeddings, tokenizer, w) for w in values]), dim=-1)
            for name, values in ATTRIBUTES.items()}


def pooled_object_tokens(model: MultimodalLM, tokens: torch.Tensor, scenes: list) -> torch.Tensor:
    """Each object's image tokens (``tokens`` [B, T, D] of ``scenes``) averaged over the cells it
    covers, unit length [objects, D], in scene then object order."""
    grid = int(round(model.num_image_tokens ** 0.5))
    pooled = torch.cat([disc_pool(tokens[b], object_discs(scene), grid) for b, scene in enumerate(scenes)])
    return F.normalize(pooled.float(), dim=-1)


def read_out(model: MultimodalLM, tokenizer: Tokenizer, processor: ImageProcessor, *, scenes: int = 24,
             seed: int = 0) -> dict[str, float]:
    """How often each object's pooled image tokens lie nearest its own colour, shape, size, row and
    column words, on fresh test-split scenes: whether the tokens still name what they show (the LLM
    stages can overwrite what grounding made; TRAINING.md)."""
    words = attribute_words(model, tokenizer)
    sampled = [sample_scene(scene_rng("test", seed, GROUNDING_STREAM + i)) for i in range(scenes)]
    device = next(model.mm_projector.parameters()).device
    with torch.no_grad():
        tokens = model.encode_images(torch.stack([processor(render(s)) for s in sampled]).to(device))
    pooled = pooled_object_tokens(model, tokens, sampled)
    targets = [object_attributes(obj) for scene in sampled for obj in scene.objects]
    return {name: float(((pooled @ table.t()).argmax(-1).cpu() == torch.tensor([t[name] for t in targets]))
                        .float().mean()) for name, table in words.items()}


def ground_image_tokens(
    model: MultimodalLM, tokenizer: Tokenizer, processor: ImageProcessor, *, steps: int, batch_size: int = 8,
    lr: float = 1e-3, tower_lr: float = 3e-4, norm_weight: float = 0.1, seed: int = 0, progress: bool = True,
) -> dict[str, float]:
    """Train ``model``'s vision tower and projector in place; returns the final loss and per-attribute
    accuracy of reading each object's pooled image tokens as its words. ``norm_weight``: of the
    penalty keeping every image token near a word embedding's norm (``image_norm_penalty``)."""
    tower, projector = model.vision_tower, model.mm_projector
    device = next(projector.parameters()).device
    word_norm = mean_word_norm(model)
    words = attribute_words(model, tokenizer)
    optimizer = torch.optim.AdamW([{"params": list(projector.parameters()), "peak_lr": lr},
                                   {"params": list(tower.parameters()), "peak_lr": tower_lr}], weight_decay=0.0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.requires_grad_(True)
    tower.train()
    projector.train()
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="ground image tokens", unit="step", disable=not progress)
    for step in bar:
        scenes = [sample_scene(scene_rng("train", seed, GROUNDING_STREAM + step * batch_size + b))
                  for b in range(batch_size)]
        attributes = [object_attributes(obj) for scene in scenes for obj in scene.objects]
        targets = {name: [a[name] for a in attributes] for name in ATTRIBUTES}
        tokens = model.encode_images(torch.stack([processor(render(s)) for s in scenes]).to(device))  # [B, T, D]
        pooled = pooled_object_tokens(model, tokens, scenes)
        norm_penalty = image_norm_penalty(tokens, word_norm)
        loss = norm_weight * norm_penalty
        metrics = {"norm_penalty": norm_penalty.item()}
        for name, table in words.items():
            logits = LOGIT_SCALE * pooled @ table.t()
            target = torch.tensor(targets[name], device=device)
            loss = loss + F.cross_entropy(logits, target)
            metrics[name] = float((logits.argmax(-1) == target).float().mean())
        scheduled_step(optimizer, params, loss, step, steps)
        metrics["loss"] = loss.item()
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", color=f"{metrics['color']:.2f}", shape=f"{metrics['shape']:.2f}")
    tower.eval()
    projector.eval()
    return final_metrics(history, t0)
