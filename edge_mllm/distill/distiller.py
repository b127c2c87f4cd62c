"""Distillation training: the stage-2 trainer with the teacher's soft targets added to the loss.

loss = alpha · CE(labels) + (1 − alpha) · KL_T(teacher ‖ student) + hidden_weight · MSE(P·h_s, h_t)
       + layer_weight · mean_l (1 − cos(b_s[l], b_t[keep[l]]))
over the response tokens only, where h are the final-norm hidden states, P a learned projection
(identity-initialised when the widths match), and b the decoder blocks' outputs: each student block
matched to the teacher block it was copied from (``DistillConfig.teacher_layers``), as TinyBERT matches
layers, so the student keeps what the teacher has read at each depth, not only its last word.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from edge_mllm.chat import ChatTemplate
from edge_mllm.distill.losses import hidden_mse, kd_kl, layer_cosine
from edge_mllm.errors import OptionError
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.tokenizer import Tokenizer
from edge_mllm.train.examples import IGNORE_INDEX, Example, embed_batch
from edge_mllm.train.trainer import TrainConfig, Trainer


@dataclass
class DistillConfig:
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the hard-label cross-entropy
    hidden_weight: float = 0.0  # 0 turns final hidden-state matching off
    layer_weight: float = 0.0  # 0 turns block-by-block matching off
    # The teacher block each student block was copied from (student.make_student's), for block matching
    teacher_layers: tuple[int, ...] = ()
    # Whether the data's answers were replaced by the teacher's (teacher_answers): not used by the loss,
    # recorded so that a resumed run trains on the same answers
    teacher_answers: bool = False


class Distiller(Trainer):
    """Trains ``student`` (all LLM weights, and the connector unless ``config`` freezes it) against a frozen
    ``teacher``."""

    def __init__(self, student: MultimodalLM, teacher: MultimodalLM, tokenizer: Tokenizer, template: ChatTemplate,
                 config: TrainConfig, distill: DistillConfig):
        super().__init__(student, tokenizer, template, config)
        self.teacher = teacher.eval().requires_grad_(False).to(self.device)
        self.distill = distill
        if distill.layer_weight > 0 and len(distill.teacher_layers) != student.config.text.num_hidden_layers:
            raise OptionError(f"block matching needs the teacher block each of the student's "
                              f"{student.config.text.num_hidden_layers} blocks was copied from "
                              f"(got {list(distill.teacher_layers)})")
        d_s, d_t = student.config.text.hidden_size, teacher.config.text.hidden_size
        self.projection = torch.nn.Linear(d_s, d_t, bias=False).to(self.device)
        if d_s == d_t:
            torch.nn.init.eye_(self.projection.weight)
        if distill.hidden_weight > 0:
            self.optimizer.add_param_group({"params": list(self.projection.parameters()), "peak_lr": config.lr})
            self.params += list(self.projection.parameters())

    def run_config(self) -> dict:
        return super().run_config() | {"distill": asdict(self.distill)}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"projection.weight": self.projection.weight} if self.distill.hidden_weight > 0 else {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if "projection.weight" in state:
            with torch.no_grad():
                self.projection.weight.copy_(state["projection.weight"])

    def batch_loss(self, batch: list[Example]) -> tuple[torch.Tensor, int]:
        student_embeds, teacher_embeds = [], []
        for example in batch:
            features = self.image_features(example.image)
            if features is None:
                student_embeds.append(None)
                teacher_embeds.append(None)
                continue
            student_embeds.append(self.model.mm_projector(features[None])[0])
            with torch.no_grad():
                teacher_embeds.append(self.teacher.mm_projector(features[None])[0])
        student = embed_batch(self.model, batch, student_embeds, self.max_len)
        cfg = self.distill
        teacher_blocks: list[torch.Tensor] | None = [] if cfg.layer_weight > 0 else None
        student_blocks: list[torch.Tensor] | None = [] if cfg.layer_weight > 0 else None
        with torch.no_grad():
            teacher = embed_batch(self.teacher, batch, teacher_embeds, self.max_len)
            teacher_hidden = self.teacher.language_model.hidden_states(
                teacher.inputs, teacher.input_pos, teacher.attn_mask, teacher_blocks)[:, :-1]
        student_hidden = self.model.language_model.hidden_states(
            student.inputs, student.input_pos, student.attn_mask, student_blocks)[:, :-1]
        targets = student.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        s_hidden, t_hidden = student_hidden[keep], teacher_hidden[keep]
        student_logits = self.model.language_model.lm_head(s_hidden)
        with torch.no_grad():
            teacher_logits = self.teacher.language_model.lm_head(t_hidden)
        loss = cfg.alpha * F.cross_entropy(student_logits.float(), targets[keep])
        loss = loss + (1 - cfg.alpha) * kd_kl(student_logits, teacher_logits, cfg.temperature)
        if cfg.hidden_weight > 0:
            loss = loss + cfg.hidden_weight * hidden_mse(s_hidden, t_hidden, self.projection)
        if cfg.layer_weight > 0:
            loss = loss + cfg.layer_weight * layer_cosine(
                [b[:, :-1][keep] for b in student_blocks],
                [teacher_blocks[i][:, :-1][keep] for i in cfg.teacher_layers])
        return loss, int(keep.sum())
