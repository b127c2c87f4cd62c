"""Activation-aware weight scaling (AWQ, Lin et al., 2024) for LLaMA blocks.

Input channels that carry large activations matter most, so before rounding, multiply those columns
of the weights by ``s`` (and divide the producer of the input by ``s``, which keeps the float model
exact). ``s = mean|x|^α``, with α picked per group of linears by grid search on the block's
calibration inputs to minimise the quantized output error.
"""

from __future__ import annotations

import torch
from edge_mllm.quant.groupwise import quantize_rtn
from torch import nn

GRID = 20
MAX_ROWS = 2048  # calibration rows used by the search (a random subset when there are more)


def search_scales(
    linears: list[nn.Linear], x: torch.Tensor, bits: int, group_size: int, symmetric: bool,
    float_min: bool = False,
) -> torch.Tensor:
    """Best per-input-channel scales [K] for ``linears`` that all read ``x`` [M, K]."""
    if x.shape[0] > MAX_ROWS:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_ROWS]]
    x = x.float()
    mean_abs = x.abs().mean(0).clamp_min(1e-8)
    weights = [lin.weight.detach().float() for lin in linears]
    reference = [x @ w.T for w in weights]
    best, best_scales = float("inf"), torch.ones_like(mean_abs)
    for step in range(GRID + 1):
        alpha = step / GRID
        s = mean_abs.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()  # keep the scales centred around 1
        err = 0.0
        for w, y in zip(weights, reference, strict=True):
            w_q = quantize_rtn(w * s, bits, group_size, symmetric, float_min).dequantize() / s
            err += float((x @ w_q.T - y).pow(2).mean())
        if err < best:
            best, best_scales = err, s
    return best_scales


@torch.no_grad()
def apply_scales(producer: nn.Module, consumers: list[nn.Linear], scales: torch.Tensor) -> None:
    """Fold ``scales`` in: consumers' input columns × s, producer's output ÷ s (float-exact).

    ``producer`` is an RMSNorm / LayerNorm (its affine weight, and bias if any) or a Linear (its rows).
    """
    producer.weight.div_(scales.view(-1, *([1] * (producer.weight.ndim - 1))))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(scales)
    for lin in consumers:
        lin.weight.mul_(scales)
