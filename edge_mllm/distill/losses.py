"""Distillation losses over response positions (Hinton et al., 2015; hidden-state matching as in
TinyBERT / MiniLLM-style recipes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of temperature-softened next-token distributions, mean over positions,
    scaled by T² so its gradients keep their size as T changes. Logits: [N, V]."""
    t = temperature
    teacher_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    student_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean") * t * t


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: torch.nn.Module) -> torch.Tensor:
    """Mean squared error between projected student states and teacher states: [N, D_s] vs [N, D_t]."""
    return F.mse_loss(projection(student_hidden.float()), teacher_hidden.float())


def layer_cosine(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layer pairs and positions of 1 − cos(h_s, h_t) between matched blocks' outputs [N, D].

    Cosine, as DistilBERT's hidden-state loss, rather than MSE: the residual stream's norm grows with
    depth and a few channels carry activations hundreds of times the rest, which would decide an MSE."""
    return torch.stack([1 - F.cosine_similarity(s.float(), t.float(), dim=-1).mean()
                        for s, t in zip(student_states, teacher_states, strict=True)]).mean()
