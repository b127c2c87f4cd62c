"""Grounding the projector's image tokens in the LLM's own word embeddings, one word per token.

Why: on this budget (~600 scenes on a CPU) the LLM stages do not learn to read image tokens from
scratch (TRAINING.md). Given image tokens that *are* word embeddings — each token covering an object
one of its words, the background a full stop — the same stage 2 reaches 63% VQA and POPE F1 0.94
(an oracle experiment, TRAINING.md), against ~35% for tokens that only pool near an object's words:
reading them is the copying SmolLM2 already does for text. This step trains tower + projector to
produce that layout, with no LLM forward pass (cheap).

The layout: within an object, a token's word depends on its place in the 12×12 grid, so that every
2×2 block of the object holds its colour, its shape, its size and its row or column word, and in
reading order colour and shape sit side by side ("red star"), as in a caption. (The oracle cycled
the five words in reading order within each object; the tower learns that far more slowly, since a
token must know its rank inside the object, where here it needs only its own grid position: after
300 steps from the same tower, colour 82% / row 96% here against ~50% / ~30%, TRAINING.md.) Scenes
are rendered fresh each step, as in ``vision_pretrain``, from a stream of their own.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from edge_mllm.data.synth import COLORS, COLS, ROWS, SHAPES, SIZES, Scene, render, sample_scene, scene_rng
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.preprocess import ImageProcessor
from edge_mllm.tokenizer import Tokenizer
from edge_mllm.train.examples import image_norm_penalty, mean_word_norm
from edge_mllm.train.scene_pixels import step_pixels
from edge_mllm.train.vision_pretrain import STREAM_OFFSET, disc_cover, final_metrics, object_discs, scheduled_step

ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES, "row": ROWS, "col": COLS}
BACKGROUND_WORD = "."
# The word list an image token is trained to be: the background's, then every attribute's words.
VOCABULARY = (BACKGROUND_WORD,) + tuple(w for words in ATTRIBUTES.values() for w in words)
_OFFSET = {name: 1 + sum(len(ATTRIBUTES[m]) for m in list(ATTRIBUTES)[:i]) for i, name in enumerate(ATTRIBUTES)}
# Cosine similarities are bounded; this sharpens them into logits (CLIP's learned scale ends near 100).
LOGIT_SCALE = 20.0
GROUNDING_STREAM = STREAM_OFFSET + (1 << 29)  # disjoint from the tower pretraining's scenes


def word_embedding(embeddings: torch.Tensor, tokenizer: Tokenizer, word: str) -> torch.Tensor:
    """`` word`` (as it appears mid-sentence in captions and questions) in the embedding space: its
    token's row, or the mean of its tokens' rows (SmolLM2 has one token for every attribute word)."""
    return embeddings[tokenizer.encode(f" {word}", add_special_tokens=False)].float().mean(0)


def vocabulary_embeddings(model: MultimodalLM, tokenizer: Tokenizer) -> torch.Tensor:
    """``VOCABULARY`` as rows of the LLM's token-embedding matrix [words, D]."""
    embeddings = model.language_model.model.embed_tokens.weight.detach()
    return torch.stack([word_embedding(embeddings, tokenizer, w) for w in VOCABULARY])


def slot_attribute(index: int, grid: int) -> str:
    """Which of an object's attributes the token at ``index`` (reading order) of a ``grid``×``grid``
    map carries: colour and shape on even rows, size and the row or column word on odd ones."""
    i, j = divmod(index, grid)
    if i % 2 == 0:
        return "color" if j % 2 == 0 else "shape"
    if j % 2 == 0:
        return "size"
    return "row" if (i // 2 + j // 2) % 2 == 0 else "col"


def token_words(scene: Scene, grid: int) -> torch.Tensor:
    """The ``VOCABULARY`` index every image token of ``scene`` is trained to be [grid * grid]: on
    each object's disc (its nearest token at least; a token two discs reach goes to the nearer
    centre) the word ``slot_attribute`` names, elsewhere the background word."""
    distance, covers = disc_cover(object_discs(scene), grid)  # [objects, tokens]
    nearest = distance.argmin(0)
    words = torch.zeros(grid * grid, dtype=torch.long)
    for k, obj in enumerate(scene.objects):
        values = {"color": obj.color, "shape": obj.shape, "size": obj.size, "row": ROWS[obj.row],
                  "col": COLS[obj.col]}
        covered = (covers[k] & (nearest == k)) | (distance[k] == distance[k].min())
        for index in covered.nonzero().flatten().tolist():
            name = slot_attribute(index, grid)
            words[index] = _OFFSET[name] + ATTRIBUTES[name].index(values[name])
    return words


def _grid(model: MultimodalLM) -> int:
    return int(round(model.num_image_tokens ** 0.5))


def word_accuracy(tokens: torch.Tensor, words: torch.Tensor, table: torch.Tensor) -> dict[str, float | None]:
    """Per attribute (and the background): how often a token's nearest ``VOCABULARY`` word (cosine)
    is the one it should be; tokens [N, D], words [N]. None where no token should name that attribute
    (a grid too coarse to spell it): JSON has no NaN."""
    nearest = (F.normalize(tokens.float(), dim=-1) @ F.normalize(table, dim=-1).t()).argmax(-1).cpu()
    words = words.cpu()
    spans = {"background": (0, 1)} | {n: (_OFFSET[n], _OFFSET[n] + len(v)) for n, v in ATTRIBUTES.items()}
    result = {}
    for name, (lo, hi) in spans.items():
        mask = (words >= lo) & (words < hi)
        result[name] = float((nearest[mask] == words[mask]).float().mean()) if mask.any() else None
    return result


def read_out(model: MultimodalLM, tokenizer: Tokenizer, processor: ImageProcessor, *, scenes: int = 24,
             seed: int = 0) -> dict[str, float | None]:
    """On fresh test-split scenes, how often each image token lies nearest the word it should be, per
    attribute: whether the tokens still name what they show (the LLM stages can overwrite what
    grounding made; TRAINING.md)."""
    table = vocabulary_embeddings(model, tokenizer)
    sampled = [sample_scene(scene_rng("test", seed, GROUNDING_STREAM + i)) for i in range(scenes)]
    device = next(model.mm_projector.parameters()).device
    with torch.no_grad():
        tokens = model.encode_images(torch.stack([processor(render(s)) for s in sampled]).to(device))
    words = torch.cat([token_words(s, _grid(model)) for s in sampled])
    return word_accuracy(tokens.reshape(-1, tokens.shape[-1]), words, table.to(device))


def _word_loss(tokens: torch.Tensor, words: torch.Tensor, table: torch.Tensor, word_norm: float,
               norm_weight: float) -> tuple[torch.Tensor, dict[str, float | None]]:
    """Grounding's loss for image tokens [B, N, D] whose words are ``words`` [B * N] (``VOCABULARY``
    indices): cross-entropy of each token's cosine against the vocabulary, plus its squared distance to
    its word's embedding relative to the word's norm (nearest is not enough: the LLM should see the word
    itself), object and background tokens weighted alike though the background covers most of the
    grid; plus the norm penalty. Returns the loss and the step's metrics."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    cross_entropy = F.cross_entropy(LOGIT_SCALE * F.normalize(flat, dim=-1) @ F.normalize(table, dim=-1).t(), words,
                                    reduction="none")
    target = table[words]
    distance = ((flat - target) ** 2).sum(-1) / (target ** 2).sum(-1)
    per_token = cross_entropy + distance
    loss = sum(per_token[part].mean() for part in (words > 0, words == 0) if part.any())
    norm_penalty = image_norm_penalty(tokens, word_norm)
    loss = loss + norm_weight * norm_penalty
    metrics = {"norm_penalty": norm_penalty.item(), "cosine": float(F.cosine_similarity(flat.detach(), target).mean())}
    metrics |= word_accuracy(flat.detach(), words, table)
    metrics["loss"] = loss.item()
    return loss, metrics


def ground_image_tokens(
    model: MultimodalLM, tokenizer: Tokenizer, processor: ImageProcessor, *, steps: int, batch_size: int = 8,
    lr: float = 1e-3, tower_lr: float = 3e-4, norm_weight: float = 0.1, seed: int = 0, progress: bool = True,
    render_workers: int = 0,
) -> dict[str, float]:
    """Train ``model``'s vision tower and projector in place so that each image token is the word
    ``token_words`` names (``_word_loss``). Returns the final loss and per-attribute accuracy.
    ``render_workers``: processes rendering the coming steps' scenes (``train.scene_pixels``)."""
    tower, projector = model.vision_tower, model.mm_projector
    device = next(projector.parameters()).device
    word_norm = mean_word_norm(model)
    table = vocabulary_embeddings(model, tokenizer).to(device)
    grid = _grid(model)
    optimizer = torch.optim.AdamW([{"params": list(projector.parameters()), "peak_lr": lr},
                                   {"params": list(tower.parameters()), "peak_lr": tower_lr}], weight_decay=0.0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.requires_grad_(True)
    tower.train()
    projector.train()
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    indices = [[GROUNDING_STREAM + step * batch_size + b for b in range(batch_size)] for step in range(steps)]
    bar = tqdm(step_pixels("train", seed, indices, processor, render_workers), total=steps,
               desc="ground image tokens", unit="step", disable=not progress)
    for step, pixels in enumerate(bar):
        scenes = [sample_scene(scene_rng("train", seed, i)) for i in indices[step]]
        words = torch.cat([token_words(s, grid) for s in scenes]).to(device)
        loss, metrics = _word_loss(model.encode_images(pixels.to(device)), words, table, word_norm, norm_weight)
        scheduled_step(optimizer, params, loss, step, steps)
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                        **{k: "-" if metrics[k] is None else f"{metrics[k]:.2f}" for k in ("color", "shape")})
    tower.eval()
    projector.eval()
    return final_metrics(history, t0)


def ground_projector(
    model: MultimodalLM, tokenizer: Tokenizer, processor: ImageProcessor, *, steps: int, scenes: int,
    batch_size: int = 8, lr: float = 1e-3, norm_weight: float = 0.1, seed: int = 0, progress: bool = True,
    render_workers: int = 0,
) -> dict[str, float]:
    """Train only ``model``'s projector, on the frozen tower's features of ``scenes`` scenes computed
    once, so that each image token is its word (``_word_loss``). Returns the final loss and accuracy.
    The scenes are the tower grounding's first ones (``GROUNDING_STREAM``), of the train split.

    Why: a token names an object's shape only if something combines the patches around it; the tower
    learns that far too slowly on this budget (37% after grounding), LDP's convolutions over the
    tower's patch features learn it (72% after 2,000 steps from run 13's tower, TRAINING.md). Cached
    features make a step ~10× cheaper than grounding through the tower, which buys those steps.
    """
    tower, projector = model.vision_tower, model.mm_projector
    device = next(projector.parameters()).device
    word_norm = mean_word_norm(model)
    table = vocabulary_embeddings(model, tokenizer).to(device)
    grid = _grid(model)
    indices = [GROUNDING_STREAM + i for i in range(scenes)]
    batches = [indices[start:start + batch_size] for start in range(0, scenes, batch_size)]
    features = []
    tower.eval()
    with torch.no_grad():
        for pixels in tqdm(step_pixels("train", seed, batches, processor, render_workers), total=len(batches),
                           desc="tower features", unit="batch", disable=not progress):
            features.append(tower(pixels.to(device)).half())  # half the memory: ~300 KB a scene
    features = torch.cat(features)
    words = torch.stack([token_words(sample_scene(scene_rng("train", seed, i)), grid) for i in indices]).to(device)
    optimizer = torch.optim.AdamW([{"params": list(projector.parameters()), "peak_lr": lr}], weight_decay=0.0)
    params = list(projector.parameters())
    for p in params:
        p.requires_grad_(True)
    projector.train()
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc="ground projector", unit="step", disable=not progress):
        batch = torch.randint(scenes, (batch_size,), generator=generator).to(device)
        loss, metrics = _word_loss(projector(features[batch].float()), words[batch].reshape(-1), table, word_norm,
                                   norm_weight)
        scheduled_step(optimizer, params, loss, step, steps)
        history.append(metrics)
    projector.eval()
    return final_metrics(history, t0)
