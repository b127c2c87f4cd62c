"""Quantized weights in an edge-mllm checkpoint: packed codes + fp16 scales in ``model.safetensors``,
their layout in ``config.json``.

A quantized parameter ``p`` is stored as ``p.qweight`` (uint8 ``[N, K·bits/8]``, unsigned codes,
low nibble first: ONNX Runtime's MatMulNBits layout), ``p.scales`` (fp16 ``[N, K/group]``) and, for
asymmetric codes, ``p.zero_points`` (uint8 ``[N, K/group·bits/8]``, packed the same way), or for the
float-minimum form ``p.mins`` (fp16 ``[N, K/group]``). Double-quantized (``-dq``) tensors store
``p.scales`` (and ``p.mins``) as 8-bit codes (int8 / uint8) with ``p.scale_step`` (and
``p.min_base``, ``p.min_step``) fp16 per row, from which the fp16 values are recomputed exactly. The float
tensor is not stored. Loading gives back the exact codes, so every export emits its 4-bit operators
from the same integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from edge_mllm.quant.groupwise import DoubleQuant, QuantizedTensor, pack_unsigned, unpack_unsigned
from torch import nn

from edge_mllm.errors import CheckpointError


def fp16_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters in fp16 (tied ones once): the baseline sizes are compared to."""
    return 2 * sum(p.numel() for p in model.parameters())


@dataclass
class QuantizedWeights:
    """The codes of a quantized model, by parameter name, and the scheme that made them."""

    scheme: str
    tensors: dict[str, QuantizedTensor]

    def layout(self) -> dict:
        """The JSON description stored in ``config.json``."""
        return {
            "scheme": self.scheme,
            "tensors": {
                name: {"bits": qt.bits, "group_size": qt.group_size, "symmetric": qt.symmetric, "shape": list(qt.shape)}
                | ({"float_min": True} if qt.mins is not None else {})
                | ({"double_quant": True} if qt.double is not None else {})
                for name, qt in sorted(self.tensors.items())
            },
        }

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors stored in ``model.safetensors`` in place of the float weights."""
        out = {}
        for name, qt in self.tensors.items():
            out[f"{name}.qweight"] = pack_unsigned(qt.unsigned_codes(), qt.bits).contiguous()
            out[f"{name}.scales"] = qt.scales.contiguous()
            if qt.zero_points is not None:
                out[f"{name}.zero_points"] = pack_unsigned(qt.zero_points, qt.bits).contiguous()
            if qt.mins is not None:
                out[f"{name}.mins"] = qt.mins.contiguous()
            if qt.double is not None:
                dq = qt.double
                code_type = torch.int8 if qt.mins is None else torch.uint8
                out[f"{name}.scales"] = dq.scale_codes.to(code_type).contiguous()
                out[f"{name}.scale_step"] = dq.scale_step.contiguous()
                if qt.mins is not None:
                    out[f"{name}.mins"] = dq.min_codes.to(torch.uint8).contiguous()
                    out[f"{name}.min_base"] = dq.min_base.contiguous()
                    out[f"{name}.min_step"] = dq.min_step.contiguous()
        return out

    @classmethod
    def from_state(cls, layout: dict, state: dict[str, torch.Tensor], source: str) -> QuantizedWeights:
        """Rebuild the codes from a checkpoint's ``layout`` and tensors."""
        tensors = {}
        try:
            for name, spec in layout["tensors"].items():
                bits, group, shape = int(spec["bits"]), int(spec["group_size"]), tuple(spec["shape"])
                scales, double = state[f"{name}.scales"], None
                if spec.get("double_quant"):
                    double = DoubleQuant(scales.to(torch.int16), state[f"{name}.scale_step"])
                    scales = double.scales()
                    if spec.get("float_min"):
                        double.min_codes = state[f"{name}.mins"].to(torch.int16)
                        double.min_base, double.min_step = state[f"{name}.min_base"], state[f"{name}.min_step"]
                rows, k = shape[0], scales.shape[1] * group
                codes = unpack_unsigned(state[f"{name}.qweight"], bits, k)
                zero_points = mins = None
                if spec.get("float_min"):
                    mins = state[f"{name}.mins"] if double is None else double.mins()
                    if mins.shape != scales.shape:
                        raise CheckpointError(f"{source}: {name}.mins does not match its scales")
                elif spec["symmetric"]:
                    codes = codes - 2 ** (bits - 1)
                else:
                    zero_points = unpack_unsigned(state[f"{name}.zero_points"], bits, scales.shape[1]).to(torch.uint8)
                if codes.shape != (rows, k) or rows * k != torch.Size(shape).numel():
                    raise CheckpointError(f"{source}: quantized tensor {name} does not match its shape {list(shape)}")
                tensors[name] = QuantizedTensor(codes, scales, zero_points, bits, group, shape, mins=mins,
                                                double=double)
            return cls(str(layout["scheme"]), tensors)
        except KeyError as exc:
            raise CheckpointError(f"{source}: quantized weights are incomplete (missing {exc})") from exc
        except (TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"{source}: malformed quantization layout: {exc}") from exc

    def nbytes(self, model: nn.Module) -> int:
        """Bytes of ``model`` with these weights: packed codes and scales, fp16 for everything else."""
        total = sum(qt.nbytes() for qt in self.tensors.values())
        return total + sum(2 * p.numel() for name, p in model.named_parameters() if name not in self.tensors)

    def dequantized_state(self) -> dict[str, torch.Tensor]:
        """Float weights (what the runtimes compute), by parameter name."""
        return {name: qt.dequantize() for name, qt in self.tensors.items()}
