"""Per-input-channel scale migration for LLaMA blocks: pick scales ``s`` for the linears that read one
activation, multiply those weight columns by ``s`` and divide the activation's producer by ``s``
(float-exact). Two rules pick ``s``:

- AWQ (Lin et al., 2024): input channels that carry large activations matter most to the weights'
  rounding, so ``s = mean|x|^α`` with α found by grid search on the block's calibration inputs to
  minimise the quantized output error.
- SmoothQuant (Xiao et al., 2023): for runtimes that also quantize activations (ExecuTorch's 8da4w:
  int8 per token), move the activations' outlier channels into the weights,
  ``s = max|x|^α / max|w|^(1-α)``, so each token's int8 step is not set by a few huge channels.

torchao's SmoothQuant prototype keeps ``1/s`` as a runtime multiply in front of each linear and
quantizes its own way; folding ``s`` into the producer, as the paper does, keeps every export format's
graph unchanged and lets GPTQ round the smoothed weights.
"""

from __future__ import annotations

import torch
from edge_mllm.quant.groupwise import quantize_rtn
from torch import nn

from edge_mllm.model.llama import LlamaDecoderLayer

GRID = 20
MAX_ROWS = 2048  # calibration rows used by the search (a random subset when there are more)
SMOOTH_ALPHA = 0.5  # SmoothQuant's default migration strength


def migration_groups(layer: LlamaDecoderLayer) -> list[tuple[nn.Module, list[nn.Linear], str]]:
    """(producer, the linears reading its output, the name of one of them) for each activation of the
    block whose scale can be folded."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [
        (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "q_proj"),
        (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "gate_proj"),
        (mlp.up_proj, [mlp.down_proj], "down_proj"),
    ]
    if attn.num_heads == attn.num_kv_heads:  # with GQA, v's rows feed several heads' o_proj columns
        groups.append((attn.v_proj, [attn.o_proj], "o_proj"))
    return groups


def search_scales(
    linears: list[nn.Linear], x: torch.Tensor, bits: int, group_size: int, symmetric: bool,
    float_min: bool = False,
) -> torch.Tensor:
    """AWQ: the best per-input-channel scales [K] for ``linears`` that all read ``x`` [M, K]."""
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


def smoothquant_scales(linears: list[nn.Linear], x: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant: per-input-channel scales [K] for ``linears`` that all read ``x`` [M, K]."""
    act_max = x.detach().float().abs().amax(0).clamp_min(1e-5)
    weight_max = torch.stack([lin.weight.detach().float().abs().amax(0) for lin in linears]).amax(0).clamp_min(1e-5)
    return act_max.pow(alpha) / weight_max.pow(1 - alpha)


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
