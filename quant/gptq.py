"""GPTQ (Frantar et al., 2023): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian ``H = 2·XᵀX`` of the
layer's calibration inputs. Lazy block updates as in the paper. Group parameters are taken from the
error-updated weights when a group starts; act-order is off, so codes keep their natural column
order and pack into any group-wise format.
"""

from __future__ import annotations

import torch
from edge_mllm.quant.groupwise import (
    QuantizedTensor,
    as_matrix,
    check_float_min,
    check_group,
    group_scales,
    minmax_params,
    quantize_groups,
    quantize_minmax,
)

from edge_mllm.errors import QuantError


class HessianAccumulator:
    """Running ``XᵀX / n`` over the rows of every input batch a layer sees."""

    def __init__(self, columns: int):
        self.sum = torch.zeros(columns, columns, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sum += x.T @ x
        self.count += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if not self.count:
            raise QuantError("GPTQ needs calibration inputs: this layer saw none")
        return (2 * self.sum / self.count).float()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    float_min: bool = False,
) -> QuantizedTensor:
    """Quantize ``weight`` [N, K] (convs flattened) with GPTQ given the [K, K] input Hessian;
    ``float_min``: the Q4_1 form (scale and minimum per group)."""
    if float_min:
        check_float_min(bits)
    w = as_matrix(weight).clone()
    n, k = w.shape
    check_group(k, group_size)
    if hessian.shape != (k, k):
        raise QuantError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's K={k}")
    block_size = max(block_size // group_size, 1) * group_size  # groups never straddle blocks

    h = hessian.clone().float()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n, k)
    scales = torch.zeros(n, k // group_size)
    zeros = torch.zeros(n, k // group_size)  # integer zero points, or the float minimums
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:
                g = col // group_size
                group = w_block[:, i : i + group_size]
                if float_min:
                    scale, zero = minmax_params(group, bits)
                    zero = zero.half().float()
                else:
                    scale, zero = group_scales(group, bits, symmetric)
                scale = scale.half().float()  # quantize against the scale the runtime will use
                scales[:, g] = scale
                if zero is not None:
                    zeros[:, g] = zero
            g = col // group_size
            column = w_block[:, i : i + 1]
            if float_min:
                q = quantize_minmax(column, scales[:, g], zeros[:, g], bits).squeeze(-1)
                deq = q * scales[:, g] + zeros[:, g]
            else:
                zero = None if symmetric else zeros[:, g]
                q = quantize_groups(column, scales[:, g], zero, bits).squeeze(-1)
                deq = (q - (0 if zero is None else zero)) * scales[:, g]
            codes[:, col] = q
            err = (w_block[:, i] - deq) / hinv_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, end:] -= err_block @ hinv[start:end, end:]

    return QuantizedTensor(
        codes=codes.to(torch.int16),
        scales=scales.to(torch.float16),
        zero_points=None if symmetric or float_min else zeros.to(torch.uint8),
        bits=bits,
        group_size=group_size,
        shape=tuple(weight.shape),
        mins=zeros.to(torch.float16) if float_min else None,
    )
