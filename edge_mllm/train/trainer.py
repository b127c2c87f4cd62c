"""The training loop for stage 1 (alignment: connector only, caption loss) and stage 2 (instruction
tuning: connector + LLM, full or LoRA, response loss), with optional vision-encoder training.

Checkpoints hold the trainable tensors, the optimizer and the step, so a run resumes exactly where it
stopped (the data order is a function of the seed and the epoch).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from edge_mllm.chat import ChatTemplate
from edge_mllm.data.llava import Conversation, single_turns
from edge_mllm.errors import EdgeMLLMError, OptionError
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.preprocess import ImageProcessor
from edge_mllm.quant.scheme import QuantScheme
from edge_mllm.tokenizer import Tokenizer
from edge_mllm.train.examples import (
    Example,
    embed_batch,
    image_norm_penalty,
    learns_within,
    lm_loss,
    mean_word_norm,
    pack_shared_prefix,
    tokenize_conversation,
)
from edge_mllm.train.lora import apply_lora, quantization_grids
from edge_mllm.train.precision import PRECISIONS, autocast, resolve_precision

STAGES = ("pretrain", "instruct")
CHECKPOINT_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    stage: str = "instruct"
    epochs: float = 1.0
    batch_size: int = 8
    lr: float = 2e-4
    projector_lr: float | None = None  # the connector's own rate (None: lr); it starts from scratch
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lora_rank: int = 8  # instruct only; 0 trains the whole LLM
    freeze_llm: bool = False  # instruct only: train the connector (and vision) under a frozen LLM
    lora_alpha: float = 16.0
    # instruct + LoRA: a round-to-nearest scheme (e.g. rtn-w4-g32-min) whose grid the merged weights are
    # trained on, so that exporting with that scheme keeps what was learnt (quantization-aware LoRA)
    qat: str | None = None
    # with qat: also round each of those linears' inputs to int8 per token, as ExecuTorch's 8da4w
    # linears do on XNNPACK, so that its answers keep more of what was learnt (TRAINING.md, run 14)
    qat_activations: bool = False
    train_vision: bool = False
    train_projector: bool = True  # False keeps the connector as it is (e.g. as grounding left it)
    image_norm_weight: float = 0.0  # > 0: keep image tokens near a word embedding's norm (image_norm_penalty)
    # Each question of a conversation learnt on its own, as evaluation asks it (``single_turns``), the
    # questions about one image packed after the prompt they share (``pack_shared_prefix``); batch_size
    # then counts such rows, each holding one conversation's questions
    single_turns: bool = False
    max_len: int = 512
    grad_clip: float = 1.0
    # fp32, bf16 (autocast: bfloat16 matmuls, fp32 weights and optimizer) or auto (bf16 where the device
    # multiplies it natively: train.precision)
    precision: str = "fp32"
    seed: int = 0
    checkpoint_every: int = 200  # steps; 0: only at the end

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise EdgeMLLMError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise EdgeMLLMError("epochs, batch_size and lr must be positive")
        if not (self.train_projector or self.train_vision or self.trains_llm):
            raise EdgeMLLMError("nothing to train: the stage freezes the connector, the vision encoder and the LLM")
        if self.precision not in PRECISIONS:
            raise EdgeMLLMError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.qat_activations and self.qat is None:
            raise EdgeMLLMError("activation-aware training (--qat-activations) rounds the inputs of the QAT grid's "
                                "linears: give the grid too (--qat SCHEME)")
        if self.qat is not None:
            scheme = QuantScheme.parse(self.qat)
            if self.stage != "instruct" or self.freeze_llm or self.lora_rank < 1:
                raise EdgeMLLMError("quantization-aware training trains LoRA updates: instruct stage, LoRA rank >= 1")
            if scheme.method != "rtn" or scheme.smooth or scheme.double_quant:
                raise EdgeMLLMError(f"quantization-aware LoRA needs a plain round-to-nearest grid (e.g. "
                                    f"rtn-w4-g32-min), not {scheme.name}: exporting with it must give back the "
                                    "trained weights")


    @property
    def trains_llm(self) -> bool:
        """Whether the LLM's weights change (instruct without --freeze-llm: LoRA or all of them)."""
        return self.stage == "instruct" and not self.freeze_llm


# Options a resumed run may change: it may run longer, and save more or less often.
RESUMABLE_CHANGES = frozenset({"epochs", "checkpoint_every"})


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_trainable(model: MultimodalLM, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze what the stage trains (adding LoRA adapters if asked)."""
    model.requires_grad_(False)
    if model.mm_projector is not None and config.train_projector:
        model.mm_projector.requires_grad_(True)
    if config.train_vision and model.vision_tower is not None:
        model.vision_tower.requires_grad_(True)
    if config.trains_llm:
        if config.lora_rank > 0:
            grid_for = (quantization_grids(model.language_model, QuantScheme.parse(config.qat),
                                           model.config.text.num_hidden_layers) if config.qat else None)
            apply_lora(model.language_model, config.lora_rank, config.lora_alpha, grid_for=grid_for,
                       quantize_activations=config.qat_activations)
            for name, param in model.language_model.named_parameters():
                param.requires_grad_("lora_" in name)
        else:
            model.language_model.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches (indices into ``examples``): shuffled, with rows about an image and text-only
    rows batched apart. Rows are padded to the longest in their batch, and a text row is a fraction of a
    packed image row; mixed in, they cost an image row's compute each (runs 12-13, TRAINING.md)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    batches = []
    for with_image in (True, False):
        kind = [i for i in order if (examples[i].image is not None) == with_image]
        batches += [kind[i : i + batch_size] for i in range(0, len(kind), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Trainer:
    """Trains ``model`` on LLaVA-format conversations as ``config`` says."""

    def __init__(self, model: MultimodalLM, tokenizer: Tokenizer, template: ChatTemplate, config: TrainConfig):
        self.model, self.config = model, config
        self.device = pick_device()
        self.precision = resolve_precision(config.precision, self.device)  # fp32 or bf16 here
        torch.manual_seed(config.seed)  # LoRA's init: the same seed gives the same run
        self.params = set_trainable(model, config)
        if not self.params:
            raise EdgeMLLMError("nothing to train: the model has none of the parts this stage trains")
        self.model.to(self.device)
        self.tokenizer, self.template = tokenizer, template
        self.word_norm = mean_word_norm(model)
        vision = model.config.vision
        self.processor = None
        if vision is not None:
            self.processor = ImageProcessor(vision.image_size, vision.image_mean, vision.image_std,
                                            model.config.image_aspect_ratio)
        # A frozen vision tower gives the same features every epoch: compute them once per image.
        self.feature_cache: dict[Path, torch.Tensor] | None = None if config.train_vision else {}
        projector = {id(p) for p in model.mm_projector.parameters()} if model.mm_projector is not None else set()
        projector_lr = config.projector_lr or config.lr
        groups = [{"params": [p for p in self.params if id(p) in projector], "peak_lr": projector_lr},
                  {"params": [p for p in self.params if id(p) not in projector], "peak_lr": config.lr}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.step = 0

    @property
    def max_len(self) -> int:
        """Positions a training row may take."""
        return min(self.config.max_len, self.model.config.text.max_position_embeddings)

    def image_features(self, image: Path | None) -> torch.Tensor | None:
        """Vision-tower output for one image [N, D] (the projector runs in the training graph)."""
        if image is None:
            return None
        if self.feature_cache is not None and image in self.feature_cache:
            return self.feature_cache[image]
        pixels = self.processor(image)[None].to(self.device)
        if self.feature_cache is None:
            return self.model.vision_tower(pixels)[0]
        with torch.no_grad():
            features = self.model.vision_tower(pixels)[0]
        self.feature_cache[image] = features
        return features

    def batch_loss(self, batch: list[Example], penalise_norm: bool = True) -> tuple[torch.Tensor, int]:
        embeds = []
        for example in batch:
            features = self.image_features(example.image)
            embeds.append(None if features is None else self.model.mm_projector(features[None])[0])
        loss, count = lm_loss(self.model, embed_batch(self.model, batch, embeds, self.max_len))
        images = [e for e in embeds if e is not None]
        if penalise_norm and self.config.image_norm_weight and images:
            loss = loss + self.config.image_norm_weight * image_norm_penalty(torch.cat(images), self.word_norm)
        return loss, count

    def image_reliance(self, conversations: list[Conversation], count: int = 8) -> dict[str, float]:
        """The loss on the first conversation of each of the first ``count`` images with its own image,
        and with the next one's image instead. A model that reads its images does worse on the wrong
        ones; one that answers from priors does not (how the 2026-12-04 runs were found blind)."""
        first_per_image: dict[Path, Conversation] = {}
        for c in conversations:  # one per image, so every swap really changes the image
            if c.image is not None and len(first_per_image) < count:
                first_per_image.setdefault(c.image, c)
        if len(first_per_image) < 2:
            raise EdgeMLLMError("image reliance needs conversations about at least two different images")
        examples = [tokenize_conversation(c, self.tokenizer, self.template) for c in first_per_image.values()]
        swapped = [replace(e, image=examples[(i + 1) % len(examples)].image) for i, e in enumerate(examples)]
        result = {}
        with torch.no_grad():
            for name, batch in (("loss", examples), ("loss_swapped_images", swapped)):
                total, tokens = 0.0, 0
                for i in range(0, len(batch), self.config.batch_size):
                    loss, labelled = self.batch_loss(batch[i : i + self.config.batch_size], penalise_norm=False)
                    total, tokens = total + loss.item() * labelled, tokens + labelled
                result[name] = total / tokens  # per response token, as the training loss
        return result

    def examples(self, conversations: list[Conversation]) -> list[Example]:
        """What one training step draws from: a conversation each, or with ``single_turns`` each
        conversation's questions packed after their shared image prompt."""
        if not self.config.single_turns:
            return [tokenize_conversation(c, self.tokenizer, self.template) for c in conversations]
        return [row for c in conversations for row in pack_shared_prefix(
            [tokenize_conversation(t, self.tokenizer, self.template) for t in single_turns([c])], self.model,
            self.max_len)]

    def run_config(self) -> dict:
        """What a resumed run must match (see ``RESUMABLE_CHANGES``)."""
        return asdict(self.config)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Trained tensors outside the model (none here; a distiller's projection)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state` gave."""

    def save_checkpoint(self, folder: Path) -> None:
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        state = {"step": self.step, "config": self.run_config(), "params": trainable,
                 "extra": {k: v.detach().cpu() for k, v in self.extra_state().items()},
                 "optimizer": self.optimizer.state_dict()}
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(folder / CHECKPOINT_FILE)  # a crash mid-save keeps the previous checkpoint

    def load_checkpoint(self, folder: Path) -> None:
        path = folder / CHECKPOINT_FILE
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except FileNotFoundError as exc:
            raise EdgeMLLMError(f"no checkpoint to resume from at {path}") from exc
        saved, now = state.get("config", {}), self.run_config()
        changed = sorted(k for k in saved.keys() | now.keys()
                         if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if changed:
            was = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in changed)
            raise OptionError(f"{path} was written by a run with {was}: resume with the same options (only the "
                              "epochs may change), or train to a new output")
        named = dict(self.model.named_parameters())
        if set(state["params"]) != {n for n, p in named.items() if p.requires_grad}:
            raise EdgeMLLMError(f"{path} was written by a different stage or LoRA setting")
        with torch.no_grad():
            for name, tensor in state["params"].items():
                named[name].copy_(tensor)
        self.load_extra_state(state.get("extra", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def train_step(self, batch: list[Example]) -> float:
        """One optimizer step on ``batch`` at the optimizer's current learning rates; returns its loss."""
        with autocast(self.precision, self.device):
            loss, _ = self.batch_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def train(self, conversations: list[Conversation], checkpoint_dir: Path | None = None,
              resume: bool = False, progress: bool = True) -> dict[str, float]:
        """Run the configured epochs; returns the mean loss of the last 10% of steps, throughput and the
        precision the steps ran in."""
        cfg = self.config
        examples = self.examples(conversations)
        if not cfg.trains_llm:  # text-only rows reach no trained weight when the LLM is frozen
            examples = [e for e in examples if e.image is not None]
            if not examples and conversations:
                raise EdgeMLLMError("no training data with images: this stage trains only the connector (and vision "
                                    "encoder), which text-only conversations do not reach")
        if not examples:
            raise EdgeMLLMError("no training data")
        examples = [e for e in examples if learns_within(e, self.model.num_image_tokens, self.max_len)]
        if not examples:
            raise EdgeMLLMError(f"no training data: every answer starts past the {self.max_len} positions a row may "
                                f"take (--max-len; an image takes {self.model.num_image_tokens})")
        steps_per_epoch = len(epoch_batches(examples, cfg.batch_size, cfg.seed, 0))
        total = max(1, round(cfg.epochs * steps_per_epoch))
        warmup = max(1, round(cfg.warmup_ratio * total))
        if resume and checkpoint_dir is not None:
            self.load_checkpoint(checkpoint_dir)
        self.model.train()
        losses, seen, t0 = [], 0, time.perf_counter()
        # closed on an error too: an open bar redraws itself after the error line
        with tqdm(total=total, initial=self.step, desc=cfg.stage, unit="step", disable=not progress) as bar:
            while self.step < total:
                epoch, offset = divmod(self.step, steps_per_epoch)
                batch = [examples[i] for i in epoch_batches(examples, cfg.batch_size, cfg.seed, epoch)[offset]]
                for group in self.optimizer.param_groups:
                    group["lr"] = cosine_lr(self.step, total, warmup, group["peak_lr"])
                losses.append(self.train_step(batch))
                seen += sum(max(1, len(e.branches)) for e in batch)  # questions, when rows pack several
                bar.set_postfix(loss=f"{losses[-1]:.3f}", ex_per_s=f"{seen / (time.perf_counter() - t0):.1f}")
                bar.update(1)
                if checkpoint_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(checkpoint_dir)
        if checkpoint_dir is not None:
            self.save_checkpoint(checkpoint_dir)
        if cfg.trains_llm:  # the merged decoder lies on the QAT grid, or on none
            self.model.config.weight_grid = cfg.qat
        self.model.eval()
        tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
        elapsed = time.perf_counter() - t0
        return {"final_loss": sum(tail) / len(tail), "steps": self.step, "examples_per_s": seen / max(elapsed, 1e-9),
                "seconds": elapsed, "precision": self.precision}
