"""The recipe that trains the embedded default model's eyes: one seeded command, sized for a 45-minute
budget on a 2-core CPU (faster with CUDA), wall-clock included (``training.json``: ``wall_seconds``).

1. Render synthetic train scenes (captions, multi-turn VQA + POPE) and a held-out test split.
2. Pretrain the vision tower on dense scene attributes (``vision_pretrain``); or, with ``vision_from``,
   take the tower (and the projector, if of the recipe's type: then skip to step 5) of an earlier file;
   with ``continue_from``, its LoRA too, which stage 2 then goes on training.
3. Ground the image tokens, so that each token covering an object is one of its words in SmolLM2's
   embedding space and the background a full stop (``grounding``; no LLM forward pass): the LDP
   projector alone on the frozen tower's cached features (``grounding.ground_projector``); optionally
   first tower and projector together (``ground_steps``, off by default).
4. Stage 1 (off by default): align the projector on captions, vision tower and LLM frozen.
5. Text replay: SmolLM2's own answers to 200 text-only instructions (``text_replay``).
6. Stage 2: instruction-tune quantization-aware LoRA on SmolLM2 (optionally with its linears' inputs
   rounded as ExecuTorch's 8da4w rounds them), one question per example (the questions about one
   image, its caption among them, packed after its prompt), the replayed text conversations mixed in,
   with the grounded tower and projector frozen (each can be trained too, or the LLM frozen instead).
7. Evaluate on the test split (VQA, POPE, descriptions) and write the small trained tensors as one
   safetensors file.

Along the way it records whether the image tokens still read as their words (``grounding.read_out``)
whether the model's loss depends on its images (``Trainer.image_reliance``) and whether its answers to
held-out text instructions stayed the same (``text_replay.text_agreement``), in ``training.json``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from edge_mllm.chat import ChatTemplate
from edge_mllm.config import RECIPE_PROJECTORS
from edge_mllm.data.llava import join_by_image, load_conversations, save_records, single_turns
from edge_mllm.data.synth import CAPTIONS_FILE, CONVERSATIONS_FILE, write_split
from edge_mllm.default import (
    DEFAULT_PROJECTOR,
    PROJECTOR_KEY,
    TRAINED_WEIGHTS_FILE,
    apply_trained,
    load_trained_vision,
    trained_lora,
    trained_projector,
    untrained_default,
)
from edge_mllm.errors import OptionError
from edge_mllm.eval.runner import evaluate, evaluate_captions, load_eval_set, pipeline_answer
from edge_mllm.fsutil import atomic_output_dir
from edge_mllm.pipeline import Pipeline
from edge_mllm.preprocess import ImageProcessor
from edge_mllm.train.grounding import ground_image_tokens, ground_projector, read_out
from edge_mllm.train.lora import load_lora_factors, lora_factors
from edge_mllm.train.precision import PRECISIONS
from edge_mllm.train.scene_pixels import render_workers
from edge_mllm.train.text_replay import (
    TEXT_FILE,
    answers_of,
    held_out_prompts,
    teacher_records,
    text_agreement,
    train_prompts,
)
from edge_mllm.train.trainer import TrainConfig, Trainer, pick_device
from edge_mllm.train.vision_pretrain import pretrain_vision

TRAINING_FILE = "training.json"  # the run's summary: recipe, timings, metrics
CAPTION_TOKENS = 64  # a four-object caption is ~45 SmolLM2 tokens


@dataclass
class RecipeConfig:
    seed: int = 0
    train_scenes: int = 600
    test_scenes: int = 40
    vision_steps: int = 300
    vision_batch: int = 8
    vision_lr: float = 5e-4
    # LDPv2 (MobileVLM v2: pooling + a linear depthwise conv) or LDP (v1: two nonlinear inverted-residual
    # blocks). Grounded on the frozen tower's features, LDP's tokens name an object's shape where LDPv2's
    # stay at the majority class (TRAINING.md, runs 13 and 17).
    projector: str = DEFAULT_PROJECTOR.type
    projector_ground_steps: int = 3000  # 0: no projector-only grounding
    projector_ground_scenes: int = 3000  # whose tower features are computed once and sampled from
    # Then tower and projector grounded together through the tower (~2 s a step on the 2-core CPU), so
    # that the tower learns features the grounded projector reads: after the projector's grounding, as
    # through a fresh LDP 210 steps took the loss only from 185 to 95 (colour per token 0.5). Off: 250
    # such steps (8.4 min) raised the per-token read-out (shape 0.82 → 0.86) but not VQA or POPE beyond
    # a run's noise (TRAINING.md, runs 18 and 20); run 13's tower (600 steps with LDPv2) gives 0.92.
    ground_steps: int = 0
    ground_batch: int = 8
    # Stage 1 (caption alignment) is off: driven by an LLM that does not yet read the image, it
    # overwrote what grounding made (run 3, TRAINING.md). 0 skips it.
    align_epochs: float = 0.0
    align_lr: float = 1e-3
    # Keeps image tokens at a word embedding's norm in every step that trains the projector; without it
    # they grew 50-70× larger, one of the measured reasons the model ignored its images (TRAINING.md).
    image_norm_weight: float = 0.1
    instruct_epochs: float = 1.0  # of the 600 conversations: every one of their ~5,200 questions once
    instruct_lr: float = 5e-4  # what stage 2 trains besides the connector (vision tower, LoRA)
    instruct_projector_lr: float = 1e-3
    instruct_batch: int = 4  # conversations per step: ~35 questions, each packed after its image prompt
    # A frozen SmolLM2 cannot learn to answer from what it is shown (TRAINING.md: 63% VQA and chance
    # POPE even given the true caption), so stage 2 trains LoRA on it. Float LoRA updates are smaller
    # than a 4-bit step and vanish when the LLM is re-quantized for export; trained through the grid
    # of SmolLM2's own Q4_1 form (qat), they are exactly what a `-min` 4-bit export computes.
    freeze_llm: bool = False
    lora_rank: int = 8
    qat: str | None = "rtn-w4-g32-min"
    # Round the grid linears' inputs to int8 per token too, as ExecuTorch's 8da4w linears do. Off: in run
    # 14 ExecuTorch kept more of the answers (79% the same, from 69%) but still scored 4 VQA points
    # under PyTorch with the same codes, and the float model 2.7 under run 13's (TRAINING.md).
    qat_activations: bool = False
    # Tower and projector stay as grounding leaves them: stage 2 only teaches the LLM to read them.
    instruct_train_vision: bool = False
    instruct_train_projector: bool = False
    # One question per example, as evaluation asks: in multi-turn data earlier questions give later
    # answers away, and the model learnt those instead of reading the image (runs 4 and 5, TRAINING.md).
    # The questions about one image share its prompt in one packed row (TrainConfig.single_turns).
    instruct_single_turn: bool = True
    # Each scene's caption as one more question of its conversation ("Describe the image briefly." →
    # every object's size, colour, shape and place, in reading order), in the image's packed row. Without
    # it the model had learnt only one-word answers and described an image with whatever SmolLM2 made up.
    instruct_captions: bool = True
    caption_test_scenes: int = 20  # test scenes whose descriptions are scored after training (0: none)
    # Text-only instructions answered by SmolLM2 before stage 2 and learnt in it, so the LoRA keeps its
    # text answers (run 10's did not; TRAINING.md). 0: no replay.
    text_prompts: int = 200
    text_max_new_tokens: int = 48  # longer answers are learnt as far as that (text_replay)
    # Stages 1-2's precision (train.precision): "auto" is bf16 where the hardware multiplies it natively
    # (0.6x the stage-2 time on an AVX512-BF16 CPU; run 15 scored within run-to-run noise of fp32), else
    # fp32. The vision steps stay fp32 either way: they gain only ~10% from it.
    precision: str = "auto"
    # A recipe file whose vision tower and projector are used as they are, in place of steps 2-3 (to
    # try stage-2 changes without re-training the eyes; stage 2 keeps them frozen by default)
    vision_from: str | None = None
    # A recipe file to go on training: its tower and projector as vision_from takes them, and stage 2
    # starts from its LoRA factors (trained through the same grid) rather than from zero. With first_scene
    # past the scenes that run saw, the two runs together train once over new scenes (TRAINING.md, run 23).
    continue_from: str | None = None
    first_scene: int = 0  # the training scenes: this seed's train-split scenes from this index on

    def __post_init__(self) -> None:
        if self.vision_from and self.continue_from:
            raise OptionError("give vision_from or continue_from, not both (continue_from takes the eyes too)")
        if self.first_scene < 0:
            raise OptionError(f"the first training scene's index cannot be negative ({self.first_scene})")
        # Checked here, not only by stage 2's TrainConfig, which is built after half an hour of steps 2-3.
        if self.precision not in PRECISIONS:
            raise OptionError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.projector not in RECIPE_PROJECTORS:
            raise OptionError(f"unknown projector {self.projector!r}; choose one of {', '.join(RECIPE_PROJECTORS)}")

    def scaled(self, factor: int) -> RecipeConfig:
        """The same recipe with ``factor`` times the training scenes, vision-pretraining and grounding
        steps and the projector's grounding scenes (stage 2's one epoch over the scenes then takes
        ``factor`` times the steps): for a GPU, where the 45-minute CPU budget does not bind. The 200
        replayed text prompts stay as they are."""
        if factor < 1:
            raise OptionError(f"the recipe's scale must be a positive integer, not {factor}")
        return replace(self, train_scenes=self.train_scenes * factor, vision_steps=self.vision_steps * factor,
                       ground_steps=self.ground_steps * factor,
                       projector_ground_steps=self.projector_ground_steps * factor,
                       projector_ground_scenes=self.projector_ground_scenes * factor)

    @property
    def eyes_from(self) -> str | None:
        """The earlier recipe file whose vision tower (and projector) this run takes, if any."""
        return self.vision_from or self.continue_from

    @classmethod
    def quick(cls) -> RecipeConfig:
        """A minutes-long version of the same steps, for trying the pipeline out."""
        return cls(train_scenes=16, test_scenes=4, vision_steps=4, vision_batch=2, ground_batch=2,
                   projector_ground_steps=4, projector_ground_scenes=8, instruct_epochs=0.5, text_prompts=4,
                   text_max_new_tokens=24, caption_test_scenes=2)


def instruct_config(config: RecipeConfig) -> TrainConfig:
    """The recipe's stage 2 (instruction tuning) as a trainer configuration."""
    qat = None if config.freeze_llm else config.qat  # LoRA's grid; a frozen LLM has no LoRA
    return TrainConfig(stage="instruct", epochs=config.instruct_epochs, lr=config.instruct_lr,
                       projector_lr=config.instruct_projector_lr, batch_size=config.instruct_batch,
                       lora_rank=config.lora_rank, freeze_llm=config.freeze_llm,
                       qat=qat, qat_activations=config.qat_activations and qat is not None,
                       train_vision=config.instruct_train_vision, train_projector=config.instruct_train_projector,
                       image_norm_weight=config.image_norm_weight, single_turns=config.instruct_single_turn,
                       precision=config.precision, seed=config.seed, checkpoint_every=0)


def trained_tensors(model) -> dict[str, torch.Tensor]:
    """What the default model adds to SmolLM2: vision tower, projector and any LoRA factors (fp16)."""
    state = {f"vision_tower.{k}": v for k, v in model.vision_tower.state_dict().items()}
    state.update({f"mm_projector.{k}": v for k, v in model.mm_projector.state_dict().items()})
    state.update({f"language_model.{k}": v for k, v in lora_factors(model.language_model).items()})
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}


def is_recipe_output(folder: Path) -> bool:
    """An earlier run's output folder (which a new run may replace)."""
    return (folder / TRAINING_FILE).is_file() and (folder / TRAINED_WEIGHTS_FILE).is_file()


def run_recipe(out_dir: str | Path, config: RecipeConfig, progress: bool = True) -> dict:
    """Run every step; writes ``TRAINED_WEIGHTS_FILE``, ``training.json``, ``eval.json`` and the data it
    made to ``out_dir``. Atomic: ``out_dir`` appears complete or not at all; it may replace an earlier
    run's output, never another folder with files in it."""
    if config.eyes_from and (config.projector_ground_steps == 0 or config.continue_from):
        source = trained_projector(Path(config.eyes_from))
        if source != config.projector:
            ground = "" if config.continue_from else ", or ground a new one (projector_ground_steps)"
            raise OptionError(f"{config.eyes_from} has an {source} projector, not the recipe's {config.projector}: "
                              f"take its type{ground}")
    if config.continue_from:
        factors, grid = trained_lora(Path(config.continue_from))
        recipe_grid = instruct_config(config).qat
        if not factors or grid != recipe_grid:
            raise OptionError(f"{config.continue_from} has no LoRA trained through the recipe's grid "
                              f"({recipe_grid}) to go on from")
    with atomic_output_dir(out_dir, is_recipe_output) as out:
        return _run_steps(out, config, progress)


def _run_steps(out: Path, config: RecipeConfig, progress: bool) -> dict:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    workers = render_workers()  # processes rendering scenes: only where a GPU trains (train.scene_pixels)
    train_dir = timed("data", lambda: write_split(out / "data" / "train", "train", config.seed, config.train_scenes,
                                                  progress, workers, first=config.first_scene))
    test_dir = write_split(out / "data" / "test", "test", config.seed, config.test_scenes, progress, workers)
    loaded = untrained_default(config.seed, projector=config.projector)
    model = loaded.model.to(device := pick_device())  # every step, eval included, runs on a GPU where there is one
    vision = model.config.vision
    processor = ImageProcessor(vision.image_size, vision.image_mean, vision.image_std, model.config.image_aspect_ratio)
    vision_metrics = ground_metrics = projector_metrics = None
    # vision_from: its projector too where it is of the recipe's type (a fresh one is grounded otherwise)
    same_projector = bool(config.eyes_from) and trained_projector(Path(config.eyes_from)) == config.projector
    if config.eyes_from:
        load_trained_vision(model, Path(config.eyes_from), projector=same_projector)
    else:
        vision_metrics = timed("vision_pretrain", lambda: pretrain_vision(
            model.vision_tower, processor, steps=config.vision_steps, batch_size=config.vision_batch,
            lr=config.vision_lr, seed=config.seed, progress=progress, render_workers=workers))
    if config.projector_ground_steps and not same_projector:
        projector_metrics = timed("ground_projector", lambda: ground_projector(
            model, loaded.tokenizer, processor, steps=config.projector_ground_steps,
            scenes=config.projector_ground_scenes, batch_size=config.ground_batch,
            norm_weight=config.image_norm_weight, seed=config.seed, progress=progress, render_workers=workers))
    if config.ground_steps and not config.eyes_from:
        ground_metrics = timed("ground", lambda: ground_image_tokens(
            model, loaded.tokenizer, processor, steps=config.ground_steps, batch_size=config.ground_batch,
            norm_weight=config.image_norm_weight, seed=config.seed, progress=progress, render_workers=workers))
    # Whether the image tokens still name what they show after each step, and whether the model's
    # loss depends on its images: the two checks that found the 2026-12-04 runs blind (TRAINING.md).
    diagnostics = {"read_out": {"ground": read_out(model, loaded.tokenizer, processor, seed=config.seed)}}
    template = ChatTemplate(loaded.chat_template)
    align_metrics = None
    if config.align_epochs > 0:
        align = TrainConfig(stage="pretrain", epochs=config.align_epochs, lr=config.align_lr, batch_size=8,
                            image_norm_weight=config.image_norm_weight, precision=config.precision,
                            seed=config.seed, checkpoint_every=0)
        align_metrics = timed("align", lambda: Trainer(model, loaded.tokenizer, template, align).train(
            load_conversations(train_dir / CAPTIONS_FILE), progress=progress))
        diagnostics["read_out"]["align"] = read_out(model, loaded.tokenizer, processor, seed=config.seed)
    instruct = instruct_config(config)
    conversations = load_conversations(train_dir / CONVERSATIONS_FILE)
    if config.instruct_captions:
        conversations = join_by_image(conversations, load_conversations(train_dir / CAPTIONS_FILE))
    held_out_text, held_out_before = [], []
    if config.text_prompts:
        # The teacher's answers, before stage 2 changes the LLM: replayed prompts and held-out ones.
        teacher = answers_of(Pipeline(loaded), config.text_max_new_tokens, progress)
        held_out_text = held_out_prompts()
        held_out_before = [text for text, _ in teacher(held_out_text)]
        save_records(timed("text_replay", lambda: teacher_records(
            teacher, train_prompts(config.seed)[: config.text_prompts])), train_dir / TEXT_FILE)
        conversations += load_conversations(train_dir / TEXT_FILE)
    instruct_trainer = Trainer(model, loaded.tokenizer, template, instruct)
    if config.continue_from:  # after the text replay: its targets are SmolLM2's own answers
        load_lora_factors(model.language_model, trained_lora(Path(config.continue_from))[0])
    held_out = single_turns(load_conversations(test_dir / CONVERSATIONS_FILE))  # as evaluation asks
    before = instruct_trainer.image_reliance(held_out, count=config.test_scenes)  # one question per scene
    instruct_metrics = timed("instruct", lambda: instruct_trainer.train(conversations, progress=progress))
    after = instruct_trainer.image_reliance(held_out, count=config.test_scenes)
    diagnostics["image_reliance"] = {"before_instruct": before, "after_instruct": after}
    diagnostics["read_out"]["instruct"] = read_out(model, loaded.tokenizer, processor, seed=config.seed)
    weights = trained_tensors(model)
    metadata = {"format": "pt", "seed": str(config.seed), PROJECTOR_KEY: config.projector}
    if instruct.qat:
        metadata["qat"] = instruct.qat  # apply_trained snaps the merged LoRA updates onto this grid
    save_file(weights, str(out / TRAINED_WEIGHTS_FILE), metadata=metadata)
    # Evaluate exactly what ships: the fp16 file applied to a fresh SmolLM2.
    shipped = apply_trained(untrained_default(progress=progress, projector=config.projector),
                            out / TRAINED_WEIGHTS_FILE)
    shipped.model.to(device)
    report = timed("eval", lambda: evaluate(pipeline_answer(Pipeline(shipped)), load_eval_set(test_dir),
                                            progress=progress))
    if config.caption_test_scenes:
        report["captions"] = timed("eval_captions", lambda: evaluate_captions(
            pipeline_answer(Pipeline(shipped), CAPTION_TOKENS),
            load_conversations(test_dir / CAPTIONS_FILE)[: config.caption_test_scenes], progress=progress))
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    if held_out_text:
        shipped_answers = answers_of(Pipeline(shipped), config.text_max_new_tokens)
        diagnostics["text_agreement"] = text_agreement(held_out_text, held_out_before,
                                                       [text for text, _ in shipped_answers(held_out_text)])
    summary = {
        "recipe": asdict(config),
        "hardware": {"device": "cuda" if torch.cuda.is_available() else "cpu", "machine": platform.machine(),
                     "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                     "precision": instruct_metrics["precision"]},
        "seconds": timings,
        "total_seconds": round(sum(timings.values()), 1),
        # Beside the steps above: loading SmolLM2 twice, the diagnostics, the held-out text answers.
        "wall_seconds": round(time.perf_counter() - started, 1),
        "vision_pretrain": vision_metrics,
        "ground": ground_metrics,
        "ground_projector": projector_metrics,
        "align": align_metrics,
        "instruct": instruct_metrics,
        "diagnostics": diagnostics,
        "test": {"vqa": report["vqa"], "pope": report["pope"],
                 "captions": {k: v for k, v in report.get("captions", {}).items() if k != "predictions"} or None},
        "weights_bytes": (out / TRAINED_WEIGHTS_FILE).stat().st_size,
    }
    (out / TRAINING_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
