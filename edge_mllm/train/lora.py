"""LoRA (Hu et al., 2021): a frozen linear plus a trainable low-rank update ``(alpha/r)·B·A``.

Written here rather than taken from ``peft`` because the update must merge into our own
``nn.Linear`` modules (export and quantization see plain linears) and be stored on its own as a few
MB of package data for the default model.

Quantization-aware LoRA (``grid``): the forward pass sees the merged weight ``W + (alpha/r)·B·A``
rounded to the 4-bit grid an export will use (straight-through: the gradient passes the rounding
unchanged), so the update learns to move weights between grid points. Without it, an update smaller
than half a 4-bit step vanishes when the merged model is quantized; with it, the merged and snapped
model is exactly what the export's codes compute.

Activation-aware (``activations``): the grid linears' inputs are also rounded as ExecuTorch's 8da4w
linears round them on XNNPACK (int8, asymmetric, one scale per token; torchao's own fake quantizer,
straight-through), so the updates also learn to keep the answers that rounding would change.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edge_mllm.quant.groupwise import quantize_rtn
from edge_mllm.quant.scheme import QuantScheme, TensorPlan, plan_tensor

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def snap(weight: torch.Tensor, grid: TensorPlan) -> torch.Tensor:
    """``weight`` rounded to ``grid`` (group-wise round to nearest), back in its own dtype."""
    with torch.no_grad():
        group = grid.group_size or weight.shape[1]
        rounded = quantize_rtn(weight.float(), grid.bits, group, grid.symmetric, grid.float_min).dequantize()
    return rounded.to(weight.dtype)


def per_token_int8() -> nn.Module:
    """A fake quantizer of the activations ExecuTorch's 8da4w linears compute with: int8, asymmetric,
    one scale and zero point per token (XNNPACK's dynamically quantized GEMMs; torchao's 8da4w)."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

    return IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, grid: TensorPlan | None = None,
                 activations: nn.Module | None = None):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.grid = grid  # quantization-aware: the forward uses the merged weight on this grid
        self.activations = activations  # with a grid: rounds the input as the runtime will (per_token_int8)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: starts as the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale
        # Straight-through estimator: the output is x·snap(W + ΔW)ᵀ and every gradient is the one the
        # unrounded merged weight would get. Written with the low-rank branch on a detached input
        # (it adds exactly zero to the output) so A and B get their gradients through rank-r
        # products, never through a full-size weight gradient.
        # The grid point each weight lands on is chosen in fp32 under mixed precision too, as the merge
        # after training chooses it (train.precision).
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            snapped = snap(self.base.weight + self.delta().to(self.base.weight.dtype), self.grid)
        branch = (x.detach() @ self.lora_A.t() @ self.lora_B.t()) * self.scale
        inputs = x if self.activations is None else self.activations(x)
        return F.linear(inputs, snapped, self.base.bias) + (branch - branch.detach())

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale


def apply_lora(module: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS,
               grid_for: Callable[[str], TensorPlan | None] | None = None, quantize_activations: bool = False) -> int:
    """Wrap every ``nn.Linear`` child named in ``targets`` (in place); returns how many.
    ``grid_for``: a linear's name within ``module`` → its quantization grid (quantization-aware LoRA);
    ``quantize_activations``: the inputs of the linears that have a grid are rounded too (``per_token_int8``)."""
    wrapped = 0
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                full = f"{parent_name}.{name}" if parent_name else name
                grid = grid_for(full) if grid_for is not None else None
                activations = per_token_int8() if quantize_activations and grid is not None else None
                setattr(parent, name, LoRALinear(child, rank, alpha, grid, activations))
                wrapped += 1
    return wrapped


def quantization_grids(language_model: nn.Module, scheme: QuantScheme,
                       num_layers: int) -> Callable[[str], TensorPlan | None]:
    """A linear's name within a MultimodalLM's ``language_model`` → the grid ``scheme`` quantizes its
    weight to, by the exporters' own per-tensor policy (``-mixed`` keeps its 8-bit blocks at 8 bits)."""
    shapes = {name: tuple(p.shape) for name, p in language_model.named_parameters()}

    def grid_for(name: str) -> TensorPlan | None:
        return plan_tensor(scheme, f"language_model.{name}.weight", shapes[f"{name}.weight"], num_layers)

    return grid_for


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
    """Fold every LoRA update into its base linear and unwrap it (in place); returns how many.
    A quantization-aware update is folded onto its grid: the linear then computes what it trained with."""
    merged = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight += child.delta().to(child.base.weight.dtype)
                    if child.grid is not None:
                        child.base.weight.copy_(snap(child.base.weight, child.grid))
                setattr(parent, name, child.base)
                merged += 1
    return merged


def add_lora_factors(module: nn.Module, factors: dict[str, torch.Tensor],
                     grid_for: Callable[[str], TensorPlan | None] | None = None) -> None:
    """Add stored low-rank updates (from ``lora_factors``) into a plain model's weights; with
    ``grid_for`` (quantization-aware updates), each merged weight is snapped onto its grid, as
    ``merge_lora`` does."""
    params = dict(module.named_parameters())
    for key, a in factors.items():
        if not key.endswith(".lora_A"):
            continue
        name = key[: -len(".lora_A")]
        weight = params[f"{name}.weight"]
        with torch.no_grad():
            weight += (factors[f"{name}.lora_B"].float() @ a.float()).to(weight.dtype)
            grid = grid_for(name) if grid_for is not None else None
            if grid is not None:
                weight.copy_(snap(weight, grid))


def load_lora_factors(module: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Set the LoRA modules of ``module`` (wrapped by ``apply_lora``) to stored factors (from
    ``lora_factors``), so that training goes on from them: every wrapped linear must have its pair,
    of its rank."""
    wrapped = {name: child for name, child in module.named_modules() if isinstance(child, LoRALinear)}
    stored = {key[: -len(".lora_A")] for key in factors if key.endswith(".lora_A")}
    if stored != set(wrapped):
        missing, extra = sorted(set(wrapped) - stored), sorted(stored - set(wrapped))
        raise ValueError(f"the stored LoRA factors are for other linears (missing: {missing[:3]}, "
                         f"not wrapped: {extra[:3]})")
    for name, child in wrapped.items():
        a, b = factors[f"{name}.lora_A"], factors[f"{name}.lora_B"]
        if a.shape != child.lora_A.shape or b.shape != child.lora_B.shape:
            raise ValueError(f"{name}'s stored LoRA factors have rank {a.shape[0]}, not {child.lora_A.shape[0]}")
        with torch.no_grad():
            child.lora_A.copy_(a)
            child.lora_B.copy_(b.float() / child.scale)  # lora_factors folds the scale into B
