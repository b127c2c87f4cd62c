"""LoRA (Hu et al., 2021): a frozen linear plus a trainable low-rank update ``(alpha/r)·B·A``.

Written here rather than taken from ``peft`` because the update must merge into our own
``nn.Linear`` modules (export and quantization see plain linears) and be stored on its own as a few
MB of package data for the default model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: starts as the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale


def apply_lora(module: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS) -> int:
    """Wrap every ``nn.Linear`` child named in ``targets`` (in place); returns how many."""
    wrapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
                wrapped += 1
    return wrapped


def lora_factors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The merged updates ``{linear weight name: (alpha/r)·B·A}`` as low-rank pairs, keyed
    ``<name>.lora_A`` / ``<name>.lora_B`` with the scale folded into B."""
    out = {}
    for name, child in module.named_modules():
        if isinstance(child, LoRALinear):
            out[f"{name}.lora_A"] = child.lora_A.detach().clone()
            out[f"{name}.lora_B"] = (child.lora_B * child.scale).detach().clone()
    return out


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA update into its base linear and unwrap it (in place); returns how many."""
    merged = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight += child.delta().to(child.base.weight.dtype)
                setattr(parent, name, child.base)
                merged += 1
    return merged


def add_lora_factors(module: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Add stored low-rank updates (from ``lora_factors``) into a plain model's weights."""
    params = dict(module.named_parameters())
    for key, a in factors.items():
        if not key.endswith(".lora_A"):
            continue
        name = key[: -len(".lora_A")]
        weight = params[f"{name}.weight"]
        with torch.no_grad():
            weight += (factors[f"{name}.lora_B"].float() @ a.float()).to(weight.dtype)
