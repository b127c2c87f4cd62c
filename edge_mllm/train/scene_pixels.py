"""The pixels of each training step's synthetic scenes, rendered ahead in worker processes where
there are cores to spare.

Vision pretraining and grounding draw fresh scenes every step. One CPU core renders a scene in about
30 ms, so on a GPU, which runs the tower's step in milliseconds, rendering would take most of the
time; there the scenes of the coming steps are rendered in a process pool while the GPU trains. On
the 2-core CPU recipe both cores train and scenes are rendered inline, as before. Either way a
scene is fixed by ``(split, seed, index)``, so the pixels are the same.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from edge_mllm.data.synth import scene_image
from edge_mllm.preprocess import ImageProcessor

PREFETCH_STEPS = 4  # steps rendered ahead: bounds the memory the queued pixels take
MAX_WORKERS = 8


def render_workers() -> int:
    """Processes to render in: none where the CPU trains (it needs its cores), else up to
    ``MAX_WORKERS`` of the host's cores, one left for the training process."""
    if not torch.cuda.is_available():
        return 0
    return min(MAX_WORKERS, len(os.sched_getaffinity(0)) - 1)


def _pixels(split: str, seed: int, index: int, processor: ImageProcessor) -> np.ndarray:
    """Scene ``index`` of ``split`` → its normalised pixels [3, H, W]."""
    return processor(scene_image(split, seed, index)).numpy()


def _one_thread() -> None:
    torch.set_num_threads(1)  # each worker one core


def step_pixels(split: str, seed: int, steps: Iterable[list[int]], processor: ImageProcessor,
                workers: int = 0) -> Iterator[torch.Tensor]:
    """For each step's scene indices, their pixels [B, 3, H, W], in order; with ``workers`` > 0
    rendered up to ``PREFETCH_STEPS`` steps ahead, a scene per task, in that many processes."""
    if workers <= 0:
        for indices in steps:
            yield torch.stack([torch.from_numpy(_pixels(split, seed, i, processor)) for i in indices])
        return
    # spawn, not fork: a forked child of a process that has run torch's thread pools can deadlock
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        pending: deque = deque()
        for indices in steps:
            pending.append([pool.apply_async(_pixels, (split, seed, i, processor)) for i in indices])
            if len(pending) > PREFETCH_STEPS:
                yield torch.stack([torch.from_numpy(r.get()) for r in pending.popleft()])
        while pending:
            yield torch.stack([torch.from_numpy(r.get()) for r in pending.popleft()])
