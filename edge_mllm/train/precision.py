"""Mixed-precision training: the forward and backward matmuls in bfloat16 under ``torch.autocast``,
the weights, optimizer state and losses in fp32 (as Hugging Face's ``--bf16`` and LLaVA's recipes
train). A stage-2 step on SmolLM2 takes 0.6× the fp32 time on a 2-core CPU with AVX512-BF16
(TRAINING.md); on a CPU without native bfloat16 dot products it would be emulated and slower, so
``auto`` picks it only where the hardware has them.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what ``precision`` (one of ``PRECISIONS``) means on ``device``."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a training step's forward pass runs in for a resolved ``precision``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
