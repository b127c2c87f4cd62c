"""Synthetic multimodal data: rendered scenes of coloured shapes with captions, closed-set VQA and
POPE-style existence probes.

No image data set can be downloaded here, so the default model learns to see on scenes this module
draws. Every scene is a list of objects (shape, colour, size) placed in distinct cells of a 3×3 grid
over a neutral, noisy background, which makes every question's answer exact. Scenes are fully
determined by ``(split, seed, index)``; the three splits draw from disjoint seed streams.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from edge_mllm.data.llava import make_record, save_records
from edge_mllm.fsutil import atomic_output_dir

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 60, 185),
    "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
# A non-uniform prior, so that POPE's "popular" negatives (the most frequent objects) mean something.
COLOR_PRIOR = np.array([0.26, 0.20, 0.17, 0.14, 0.12, 0.11])
SHAPE_PRIOR = np.array([0.34, 0.28, 0.22, 0.16])
MAX_OBJECTS = 4
SPLITS = {"train": 0, "val": 1, "test": 2}
QUESTION_TYPES = ("color", "shape", "count", "position", "size", "relation")
POPE_SETTINGS = ("random", "popular", "adversarial")
ANSWER_SUFFIX = "Answer with a single word or phrase."
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short description of the image.",
    "Summarize what you see.",
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def position(self) -> str:
        """Where the object is, in words: "top left", "center", "bottom", ..."""
        row, col = ROWS[self.row], COLS[self.col]
        if row == "middle":
            return col
        return row if col == "center" else f"{row} {col}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    gradient: tuple[float, float]  # brightness change across x and y
    noise: float
    noise_seed: int
    objects: tuple[SceneObject, ...]
    jitter: tuple[tuple[float, float, float, int, int, int], ...]  # per object: dx, dy, rotation, rgb shift

    def count(self, shape: str | None = None) -> int:
        return sum(1 for o in self.objects if shape is None or o.shape == shape)

    def has(self, color: str, shape: str) -> bool:
        return any(o.color == color and o.shape == shape for o in self.objects)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    type: str  # one of QUESTION_TYPES, or "pope"
    pope_setting: str | None = None


def scene_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The random stream of one scene: disjoint across splits, seeds and indices."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(SPLITS[split], index)))


def sample_scene(rng: np.random.Generator) -> Scene:
    width, height = (int(v) for v in rng.integers(256, 449, size=2))
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(9, size=n, replace=False)
    objects, jitter = [], []
    for cell in cells:
        while True:  # the same colour+shape twice would make "the red circle" ambiguous
            color = list(COLORS)[rng.choice(len(COLORS), p=COLOR_PRIOR)]
            shape = SHAPES[rng.choice(len(SHAPES), p=SHAPE_PRIOR)]
            if not any(o.color == color and o.shape == shape for o in objects):
                break
        objects.append(SceneObject(shape, color, SIZES[rng.integers(2)], int(cell) // 3, int(cell) % 3))
        dx, dy = rng.uniform(-0.12, 0.12, size=2)
        jitter.append((float(dx), float(dy), float(rng.uniform(0, 360)), *(int(v) for v in rng.integers(-20, 21, 3))))
    gray = int(rng.integers(60, 215))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(gray + t, 0, 255)) for t in tint)
    return Scene(
        width, height, background, tuple(float(v) for v in rng.uniform(-30, 30, size=2)),
        float(rng.uniform(0, 10)), int(rng.integers(2**31)), tuple(objects), tuple(jitter),
    )


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        k, start = 4, np.deg2rad(45 + angle % 90)
        radii = [r * 1.15] * k
    elif shape == "triangle":
        k, start = 3, np.deg2rad(-90 + (angle % 120) * 0.25)  # stays point-up-ish, so it reads as a triangle
        radii = [r * 1.2] * k
    else:  # star
        k, start = 10, np.deg2rad(-90 + angle % 72)
        radii = [r * 1.2 if i % 2 == 0 else r * 0.5 for i in range(k)]
    angles = start + np.arange(k) * 2 * np.pi / k
    return [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for rad, a in zip(radii, angles, strict=True)]


def render(scene: Scene) -> Image.Image:
    """Draw a scene (at 2× then downsampled, for anti-aliased edges)."""
    scale = 2
    w, h = scene.width * scale, scene.height * scale
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    shade = scene.gradient[0] * (xs / w - 0.5) + scene.gradient[1] * (ys / h - 0.5)
    noise_rng = np.random.default_rng(scene.noise_seed)
    pixels = np.asarray(scene.background, np.float32)[None, None, :] + shade[..., None]
    pixels += noise_rng.normal(0, scene.noise, size=(h, w, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = w / 3, h / 3
    for obj, (dx, dy, angle, *shift) in zip(scene.objects, scene.jitter, strict=True):
        r = min(cell_w, cell_h) * (0.22 if obj.size == "small" else 0.38)
        cx, cy = (obj.col + 0.5 + dx) * cell_w, (obj.row + 0.5 + dy) * cell_h
        fill = tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(COLORS[obj.color], shift, strict=True))
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r, angle), fill=fill)
    return image.resize((scene.width, scene.height), Image.Resampling.LANCZOS)


def _in_reading_order(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: (o.row, o.col))


def caption(scene: Scene) -> str:
    """One sentence naming every object with its size and position, in reading order."""
    parts = []
    for obj in _in_reading_order(scene):
        where = "in the center" if obj.position == "center" else f"at the {obj.position}"
        parts.append(f"a {obj.size} {obj.color} {obj.shape} {where}")
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return listed[0].upper() + listed[1:] + "."


def _plural(shape: str) -> str:
    return shape + "s"


def vqa_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """Every closed-set question this scene answers unambiguously, one or more per type."""
    objs = list(scene.objects)
    out: list[QA] = []
    for obj in objs:
        if scene.count(obj.shape) == 1:
            out.append(QA(f"What color is the {obj.shape}?", obj.color, "color"))
        if sum(o.color == obj.color for o in objs) == 1:
            out.append(QA(f"What shape is the {obj.color} object?", obj.shape, "shape"))
        out.append(QA(f"Where is the {obj.name}?", obj.position, "position"))
        out.append(QA(f"Is the {obj.name} small or large?", obj.size, "size"))
    out.append(QA("How many objects are there?", str(scene.count()), "count"))
    shape = SHAPES[rng.integers(len(SHAPES))]
    out.append(QA(f"How many {_plural(shape)} are there?", str(scene.count(shape)), "count"))
    for a in objs:
        for b in objs:
            if a is b:
                continue
            if a.col != b.col:
                out.append(QA(f"Is the {a.name} to the left of the {b.name}?", "yes" if a.col < b.col else "no",
                              "relation"))
            if a.row != b.row:
                out.append(QA(f"Is the {a.name} above the {b.name}?", "yes" if a.row < b.row else "no", "relation"))
    return out


def _absent(scene: Scene) -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES if not scene.has(c, s)]


def pope_negative(scene: Scene, setting: str, rng: np.random.Generator) -> tuple[str, str]:
    """An object that is not in the scene, chosen as POPE's negative sampling setting says:
    random; popular (among the most frequent objects under the generator's prior); adversarial (a
    near miss that shares the colour or the shape of an object that is there)."""
    absent = _absent(scene)
    if setting == "random":
        return absent[rng.integers(len(absent))]
    if setting == "popular":
        prior = {(c, s): COLOR_PRIOR[i] * SHAPE_PRIOR[j] for i, c in enumerate(COLORS) for j, s in enumerate(SHAPES)}
        top = sorted(absent, key=lambda cs: -prior[cs])[:3]
        return top[rng.integers(len(top))]
    if setting == "adversarial":
        near = [(c, s) for c, s in absent if any(o.color == c or o.shape == s for o in scene.objects)]
        return near[rng.integers(len(near))]
    raise ValueError(f"unknown POPE setting {setting!r}; choose one of {', '.join(POPE_SETTINGS)}")


def pope_questions(scene: Scene, rng: np.random.Generator, settings: tuple[str, ...] = POPE_SETTINGS) -> list[QA]:
    """Per setting, one present and one absent object: yes/no balanced by construction."""
    out = []
    for setting in settings:
        present = scene.objects[rng.integers(len(scene.objects))]
        color, shape = pope_negative(scene, setting, rng)
        out.append(QA(f"Is there a {present.name} in the image?", "yes", "pope", setting))
        out.append(QA(f"Is there a {color} {shape} in the image?", "no", "pope", setting))
    return out


# ---------------------------------------------------------------------------------------------
# data set folders

CAPTIONS_FILE = "captions.json"  # stage 1: one caption conversation per image
CONVERSATIONS_FILE = "conversations.json"  # stage 2: multi-turn VQA + POPE per image
QUESTIONS_FILE = "questions.json"  # evaluation: one question per record, with its type
SPLIT_FILES = (CAPTIONS_FILE, CONVERSATIONS_FILE, QUESTIONS_FILE)


def _one_per_type(questions: list[QA], rng: np.random.Generator) -> list[QA]:
    by_type: dict[str, list[QA]] = {}
    for qa in questions:
        by_type.setdefault(qa.type, []).append(qa)
    return [qs[rng.integers(len(qs))] for qs in by_type.values()]


def scene_records(scene: Scene, image: str, rng: np.random.Generator) -> dict[str, list[dict]]:
    """The three kinds of records one scene contributes (see the *_FILE names)."""
    stem = image.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    prompt = CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))]
    captions = [make_record(stem, [(prompt, caption(scene))], image)]
    vqa = _one_per_type(vqa_questions(scene, rng), rng)
    pope = pope_questions(scene, rng)
    turns = [(f"{qa.question} {ANSWER_SUFFIX}", qa.answer) for qa in vqa + pope[: 2 * int(rng.integers(1, 3))]]
    order = rng.permutation(len(turns))
    conversations = [make_record(stem, [turns[i] for i in order], image)]
    questions = [
        make_record(f"{stem}-{k}", [(f"{qa.question} {ANSWER_SUFFIX}", qa.answer)], image,
                    question_type=qa.type, pope_setting=qa.pope_setting)
        for k, qa in enumerate(vqa + pope)
    ]
    return {CAPTIONS_FILE: captions, CONVERSATIONS_FILE: conversations, QUESTIONS_FILE: questions}


def is_split(folder: Path) -> bool:
    """Whether ``folder`` holds a split :func:`write_split` wrote (its three JSON files)."""
    return all((folder / name).is_file() for name in SPLIT_FILES)


def scene_image(split: str, seed: int, index: int) -> Image.Image:
    """Scene ``index`` of ``split`` and ``seed``, rendered."""
    return render(sample_scene(scene_rng(split, seed, index)))


def _write_image(job: tuple[str, int, int, Path]) -> None:
    split, seed, index, path = job
    scene_image(split, seed, index).save(path, optimize=False)


def write_split(out_dir: str | Path, split: str, seed: int, n: int, progress: bool = False, workers: int = 0,
                first: int = 0) -> Path:
    """Render ``n`` scenes of ``split`` (scenes ``first`` … ``first + n - 1`` of its seed) into
    ``out_dir/images`` and write the three JSON files (LLaVA format). Atomic: ``out_dir`` appears
    complete or not at all; it may replace an earlier split, never another folder with files in it.
    ``workers`` > 0 renders the images in that many processes (the same files)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    if first < 0:
        raise ValueError("the first scene's index cannot be negative")
    records: dict[str, list[dict]] = {name: [] for name in SPLIT_FILES}
    with atomic_output_dir(out_dir, is_split) as tmp:
        (tmp / "images").mkdir()
        indices = range(first, first + n)
        names = [f"images/{split}-{seed}-{index:06d}.png" for index in indices]
        jobs = [(split, seed, index, tmp / name) for index, name in zip(indices, names, strict=True)]
        with contextlib.ExitStack() as stack:
            written = map(_write_image, jobs)
            if workers > 0:
                pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
                written = pool.imap_unordered(_write_image, jobs, chunksize=8)
            for _ in tqdm(written, total=n, desc=f"synth {split}", unit="img", disable=not progress):
                pass
        for index, name in zip(indices, names, strict=True):
            rng = scene_rng(split, seed, index)
            scene = sample_scene(rng)
            for key, recs in scene_records(scene, name, rng).items():
                records[key] += recs
        for key, recs in records.items():
            save_records(recs, tmp / key)
    return Path(out_dir)
