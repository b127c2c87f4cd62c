"""Vision-tower pretraining on synthetic scenes, before any LLM is attached: as CLIP is pretrained
before LLaVA/MobileVLM alignment, the tower first learns to see what the scenes contain.

The objective is dense attribute prediction: the tower's selected-layer features are sampled at each
object's centre and at empty background points, and small heads predict presence, colour, size and
grid row/column there, plus the object count from the mean feature. Shape is predicted from the
features averaged over the patches the object covers: a shape is its outline, which lies in the
patches around the centre, not in the uniformly filled patch at it (a centre-point shape head stays
at chance; TRAINING.md). Scenes are rendered
fresh for every step (an endless stream), so the tower cannot memorise them. The heads are thrown
away afterwards; only the tower is kept.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edge_mllm.data.synth import COLORS, MAX_OBJECTS, SHAPES, Scene, sample_scene, scene_rng
from edge_mllm.model.vision import CLIPVisionTower
from edge_mllm.preprocess import ImageProcessor
from edge_mllm.train.scene_pixels import step_pixels
from edge_mllm.train.trainer import cosine_lr

HEADS = {"presence": 2, "color": len(COLORS), "size": 2, "row": 3, "col": 3}
BACKGROUND_POINTS = 2
# Index offset of the pretraining stream within the train split, so its scenes differ from the
# LLaVA-format training set written from the same seed.
STREAM_OFFSET = 1 << 30


class AttributeHeads(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.point = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in HEADS.items()})
        self.count = nn.Linear(dim, MAX_OBJECTS + 1)
        self.shape = nn.Linear(dim, len(SHAPES))


def _square(scene: Scene, x: float, y: float) -> tuple[float, float]:
    """Image pixel → the padded square's [-1, 1] coordinates (LLaVA's pad-to-square)."""
    side = max(scene.width, scene.height)
    return (x + (side - scene.width) // 2) / side * 2 - 1, (y + (side - scene.height) // 2) / side * 2 - 1


def _centres(scene: Scene) -> list[tuple[float, float]]:
    """Object centres in image pixels, as ``synth.render`` places them."""
    return [((obj.col + 0.5 + dx) * scene.width / 3, (obj.row + 0.5 + dy) * scene.height / 3)
            for obj, (dx, dy, *_rest) in zip(scene.objects, scene.jitter, strict=True)]


def object_discs(scene: Scene) -> list[tuple[float, float, float]]:
    """Each object's centre and radius ``(x, y, r)`` in the padded square's coordinates (the points of
    a star or square reach 1.2 × ``synth.render``'s radius)."""
    cell = min(scene.width, scene.height) / 3
    side = max(scene.width, scene.height)
    return [(*_square(scene, cx, cy), 2 * 1.2 * cell * (0.22 if obj.size == "small" else 0.38) / side)
            for obj, (cx, cy) in zip(scene.objects, _centres(scene), strict=True)]


def disc_cover(discs: list[tuple[float, float, float]], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a ``grid``×``grid`` patch map (reading order): each patch centre's distance to each disc's
    centre, and whether the disc covers the patch (its centre within half a patch of the disc, and at
    least the nearest patch); both [len(discs), grid * grid]."""
    centres = (torch.arange(grid) + 0.5) / grid * 2 - 1
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    disc = torch.tensor(discs, dtype=torch.float32)
    distance = ((xs.reshape(1, -1) - disc[:, :1]) ** 2 + (ys.reshape(1, -1) - disc[:, 1:2]) ** 2).sqrt()
    return distance, (distance <= disc[:, 2:] + 1 / grid) | (distance == distance.amin(1, keepdim=True))


def disc_pool(features: torch.Tensor, discs: list[tuple[float, float, float]], grid: int) -> torch.Tensor:
    """Mean of the patch features [N, D] each disc covers (``disc_cover``) → [len(discs), D]."""
    mask = disc_cover(discs, grid)[1].to(features.device, features.dtype)
    return (mask @ features) / mask.sum(1, keepdim=True)


def scene_points(scene: Scene, rng: np.random.Generator) -> tuple[list[tuple[float, float]], dict[str, list[int]]]:
    """Sample points in the padded square's [-1, 1] coordinates, with their targets (-100: none).

    Object centres follow ``synth.render``; the square is LLaVA's pad-to-square of the image."""
    centres = _centres(scene)
    points = [_square(scene, cx, cy) for cx, cy in centres]
    targets = {name: [] for name in HEADS}
    for obj in scene.objects:
        values = {"presence": 1, "color": list(COLORS).index(obj.color), "size": int(obj.size == "large"),
                  "row": obj.row, "col": obj.col}
        for name in HEADS:
            targets[name].append(values[name])
    cell = min(scene.width, scene.height) / 3
    added = 0
    while added < BACKGROUND_POINTS:
        x, y = rng.uniform(0, scene.width), rng.uniform(0, scene.height)
        if all((x - cx) ** 2 + (y - cy) ** 2 > (0.45 * cell) ** 2 for cx, cy in centres):
            points.append(_square(scene, x, y))
            for name in HEADS:
                targets[name].append(0 if name == "presence" else -100)
            added += 1
    return points, targets


def pretrain_vision(
    tower: CLIPVisionTower, processor: ImageProcessor, *, steps: int, batch_size: int = 16, lr: float = 1e-3,
    seed: int = 0, progress: bool = True, render_workers: int = 0,
) -> dict[str, float]:
    """Train ``tower`` in place for ``steps`` steps; returns the final loss and per-head accuracy.
    ``render_workers``: processes rendering the coming steps' scenes (``train.scene_pixels``)."""
    device = next(tower.parameters()).device
    torch.manual_seed(seed)
    heads = AttributeHeads(tower.config.hidden_size).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW([{"params": params, "peak_lr": lr}], lr=lr, weight_decay=0.05)
    grid = tower.config.grid_size
    tower.train()
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    indices = [[STREAM_OFFSET + step * batch_size + b for b in range(batch_size)] for step in range(steps)]
    bar = tqdm(step_pixels("train", seed, indices, processor, render_workers), total=steps, desc="vision pretrain",
               unit="step", disable=not progress)
    for step, pixels in enumerate(bar):
        batch_points, discs, counts, shape_features, shapes = [], [], [], [], []
        batch_targets = {name: [] for name in HEADS}
        for index in indices[step]:
            rng = scene_rng("train", seed, index)
            scene = sample_scene(rng)  # again, here: its rng goes on to pick the points (cheap beside rendering)
            points, targets = scene_points(scene, rng)
            batch_points.append(points)
            discs.append(object_discs(scene))
            counts.append(len(scene.objects))
            shapes += [SHAPES.index(obj.shape) for obj in scene.objects]
            for name in HEADS:
                batch_targets[name] += targets[name]
        features = tower(pixels.to(device))  # [B, N, D] patch tokens
        fmap = features.transpose(1, 2).reshape(batch_size, -1, grid, grid)
        sampled = []
        for b, points in enumerate(batch_points):
            where = torch.tensor(points, dtype=fmap.dtype, device=device).view(1, -1, 1, 2)
            sampled.append(F.grid_sample(fmap[b : b + 1], where, align_corners=False)[0, :, :, 0].t())
            shape_features.append(disc_pool(features[b], discs[b], grid))
        sampled = torch.cat(sampled)  # [P, D]
        loss = F.cross_entropy(heads.count(features.mean(1)), torch.tensor(counts, device=device))
        shape_logits = heads.shape(torch.cat(shape_features))
        shape_target = torch.tensor(shapes, device=device)
        loss = loss + F.cross_entropy(shape_logits, shape_target)
        metrics = {"shape": float((shape_logits.argmax(-1) == shape_target).float().mean())}
        for name, head in heads.point.items():
            target = torch.tensor(batch_targets[name], device=device)
            logits = head(sampled)
            loss = loss + F.cross_entropy(logits, target, ignore_index=-100)
            valid = target != -100
            metrics[name] = float((logits.argmax(-1)[valid] == target[valid]).float().mean())
        scheduled_step(optimizer, params, loss, step, steps)
        metrics["loss"] = loss.item()
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", color=f"{metrics['color']:.2f}", shape=f"{metrics['shape']:.2f}")
    tower.eval()
    return final_metrics(history, t0)


def scheduled_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor, step: int,
                   steps: int) -> None:
    """One optimizer step at the cosine schedule's rate for ``step`` (each group's ``peak_lr``; 5%
    warmup), gradients clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(step, steps, max(1, steps // 20), group["peak_lr"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def final_metrics(history: list[dict[str, float | None]], t0: float) -> dict[str, float | None]:
    """Each metric averaged over the last 10% of steps where it was measured (None: in none of them),
    and the seconds since ``t0``."""
    tail = history[-max(1, len(history) // 10):]
    measured = {k: [h[k] for h in tail if h[k] is not None] for k in tail[0]}
    summary = {k: sum(v) / len(v) if v else None for k, v in measured.items()}
    summary["seconds"] = time.perf_counter() - t0
    return summary
