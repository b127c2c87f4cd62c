"""Group-wise integer weight quantization: the representation every method produces and every
runtime format is packed from.

A weight ``W [N, K]`` (linear rows, embedding rows, or a conv flattened to ``[C_out, C_in·kh·kw]``) is
split along K into groups of ``group_size``; each group has one scale (and, asymmetric, one integer
zero point): ``W ≈ scale · (code − zero_point)``.

Conventions are ggml's where ggml has one, so the codes pack into GGUF blocks byte for byte and
ONNX Runtime / XNNPACK take them unchanged:
- symmetric 4-bit (Q4_0): ``d = m / −8`` with ``m`` the group's signed value of largest magnitude,
  codes in [−8, 7], so the largest weight is exact;
- symmetric 8-bit (Q8_0): ``d = max|w| / 127``, codes in [−127, 127], rounded half away from zero;
- asymmetric: min/max (zero kept inside the range), integer zero point, codes in [0, 2^bits − 1];
- float minimum (Q4_1): ``W ≈ scale · code + min`` with ``scale = (max − min) / 15`` and the group's
  own minimum, codes ``trunc((w − min) / scale + 0.5)`` in [0, 15]. No integer zero point can place a
  grid at an arbitrary offset; this form can, which is how weights shipped as Q4_1 (SmolLM2's) are
  re-quantized without loss.
Scales (and minimums) are stored as fp16 (as every target format does) and dequantization uses the
fp16 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_mllm.errors import QuantError

SUPPORTED_BITS = (4, 8)


@dataclass
class QuantizedTensor:
    """Integer codes + per-group scales (+ zero points or minimums) of one weight."""

    codes: torch.Tensor  # int16 [N, K]: signed for symmetric, 0..2^bits−1 otherwise
    scales: torch.Tensor  # fp16 [N, K // group_size]
    zero_points: torch.Tensor | None  # uint8 [N, K // group_size], asymmetric only
    bits: int
    group_size: int
    shape: tuple[int, ...]  # the original weight shape (convs are flattened to 2-D)
    mins: torch.Tensor | None = None  # fp16 [N, K // group_size], float-minimum form only
    double: DoubleQuant | None = None  # set when the scales (and minimums) are themselves 8-bit codes

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None and self.mins is None

    def dequantize(self) -> torch.Tensor:
        """fp32 weight in its original shape: exactly what a runtime computes from these codes."""
        n, k = self.codes.shape
        codes = self.codes.float().view(n, k // self.group_size, self.group_size)
        if self.zero_points is not None:
            codes = codes - self.zero_points.float().unsqueeze(-1)
        w = codes * self.scales.float().unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.float().unsqueeze(-1)
        return w.reshape(self.shape)

    def unsigned_codes(self) -> torch.Tensor:
        """Codes as unsigned ``bits``-bit values: symmetric ones offset by 2^(bits−1) (the implicit
        zero point of ONNX Runtime's and ggml's symmetric types)."""
        return self.codes + (2 ** (self.bits - 1) if self.symmetric else 0)

    def nbytes(self) -> int:
        """Bytes of the packed codes, fp16 scales and packed zero points."""
        n, k = self.codes.shape
        groups = n * (k // self.group_size)
        zero_bytes = 0 if self.zero_points is None else (groups * self.bits + 7) // 8
        per_group = 2 if self.double is None else 1  # an fp16 scale (minimum), or an 8-bit code for it
        min_bytes = 0 if self.mins is None else per_group * groups
        row_bytes = 0 if self.double is None else self.double.row_bytes()
        return n * k * self.bits // 8 + per_group * groups + zero_bytes + min_bytes + row_bytes


@dataclass
class DoubleQuant:
    """Double-quantized group parameters (as QLoRA's double quantization and ggml's K-quants): per
    group an 8-bit code ``k`` for the scale (signed for symmetric codes) and ``j`` for the minimum, per
    row fp16 steps: ``scale = fp16(scale_step · k)``, ``min = fp16(min_base + min_step · j)``. Saves a
    byte per group parameter (4.5 instead of 5 bits per weight for the -min form at group 32); the
    fp16 values these give are what every runtime is handed, so exports are unchanged."""

    scale_codes: torch.Tensor  # int16 [N, groups]
    scale_step: torch.Tensor  # fp16 [N]
    min_codes: torch.Tensor | None = None  # int16 [N, groups]
    min_base: torch.Tensor | None = None  # fp16 [N]
    min_step: torch.Tensor | None = None  # fp16 [N]

    def row_bytes(self) -> int:
        """The per-row fp16 steps (the per-group codes are counted with the tensor's groups)."""
        return 2 * self.scale_step.numel() * (1 if self.min_codes is None else 3)

    def scales(self) -> torch.Tensor:
        return (self.scale_step.float().unsqueeze(-1) * self.scale_codes.float()).half()

    def mins(self) -> torch.Tensor:
        step, base = self.min_step.float().unsqueeze(-1), self.min_base.float().unsqueeze(-1)
        return (base + step * self.min_codes.float()).half()


def _row_step(values: torch.Tensor, levels: int) -> torch.Tensor:
    """fp16 step per row so that ``levels`` steps cover the row's largest |value|."""
    step = (values.abs().amax(dim=-1) / levels).half()
    return torch.where(step == 0, torch.ones_like(step), step)


def double_quantize(qt: QuantizedTensor, target: torch.Tensor) -> QuantizedTensor:
    """``qt`` with its group scales (and minimums) as 8-bit codes on per-row fp16 steps, and codes
    re-chosen against those parameters for ``target`` (the weight, or the values GPTQ chose)."""
    if qt.zero_points is not None:
        raise QuantError("double quantization applies to symmetric and float-minimum codes, not integer zero points")
    n, k = qt.codes.shape
    groups = as_matrix(target).view(n, k // qt.group_size, qt.group_size)
    signed = qt.mins is None
    step = _row_step(qt.scales.float(), 127 if signed else 255)
    scale_codes = torch.round(qt.scales.float() / step.float().unsqueeze(-1))
    double = DoubleQuant(scale_codes.clamp(-127 if signed else 0, 127 if signed else 255).to(torch.int16), step)
    scales = double.scales()
    if signed:
        codes = quantize_groups(groups, scales.float(), None, qt.bits)
        return QuantizedTensor(codes.reshape(n, k).to(torch.int16), scales, None, qt.bits, qt.group_size, qt.shape,
                               double=double)
    base = qt.mins.float().amin(dim=-1).half()
    above = qt.mins.float() - base.float().unsqueeze(-1)
    step = _row_step(above, 255)
    double.min_codes = torch.round(above / step.float().unsqueeze(-1)).clamp(0, 255).to(torch.int16)
    double.min_base, double.min_step = base, step
    mins = double.mins()
    codes = quantize_minmax(groups, scales.float(), mins.float(), qt.bits)
    return QuantizedTensor(codes.reshape(n, k).to(torch.int16), scales, None, qt.bits, qt.group_size, qt.shape,
                           mins=mins, double=double)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Rows = output channels, columns = the reduction dim (convs flattened)."""
    if weight.ndim < 2:
        raise QuantError(f"cannot group-quantize a {weight.ndim}-D tensor")
    return weight.detach().float().reshape(weight.shape[0], -1)


def check_group(k: int, group_size: int, what: str = "weight") -> None:
    if group_size <= 0 or k % group_size:
        raise QuantError(
            f"group size {group_size} does not divide the {what}'s reduction dim {k}; "
            f"pick a divisor of {k} (e.g. 32, 64, 128 where they divide it)"
        )


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantError(f"{bits}-bit quantization is not supported (bits: {', '.join(map(str, SUPPORTED_BITS))})")


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``roundf``, computed the way gguf-py does (floor(|x|+0.5) can round 2.4999999 up)."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor())


def group_scales(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 scale (and integer zero point) per group; ``groups`` is [..., group_size]."""
    if symmetric:
        if bits == 4:
            idx = groups.abs().argmax(dim=-1, keepdim=True)
            return torch.gather(groups, -1, idx).squeeze(-1) / -8, None
        return groups.abs().amax(dim=-1) / 127, None
    qmax = 2**bits - 1
    lo = groups.amin(dim=-1).clamp(max=0)
    hi = groups.amax(dim=-1).clamp(min=0)
    scale = (hi - lo) / qmax
    zero = torch.where(scale > 0, torch.round(-lo / torch.where(scale > 0, scale, 1)), 0).clamp(0, qmax)
    return scale, zero


def quantize_groups(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Codes for ``groups`` [..., g] given per-group fp32 ``scale`` (and zero point) [...]."""
    inv = torch.where(scale == 0, 0, 1 / torch.where(scale == 0, 1, scale)).unsqueeze(-1)
    if zero is not None:
        return (torch.round(groups * inv) + zero.unsqueeze(-1)).clamp(0, 2**bits - 1)
    if bits == 4:  # ggml Q4_0: trunc(x/d + 8.5) − 8, clamped
        return (torch.trunc(groups * inv + 8.5).clamp(0, 15) - 8)
    return round_half_away(groups * inv).clamp(-127, 127)


def minmax_params(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float-minimum form: fp32 (scale, minimum) per group, as ggml's Q4_1 quantizer."""
    lo = groups.amin(dim=-1)
    return (groups.amax(dim=-1) - lo) / (2**bits - 1), lo


def quantize_minmax(groups: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    """Float-minimum codes for ``groups`` [..., g]: ggml Q4_1's ``min(15, (int)((x − min)/d + 0.5))``."""
    inv = torch.where(scale == 0, 0, 1 / torch.where(scale == 0, 1, scale)).unsqueeze(-1)
    return torch.trunc((groups - lo.unsqueeze(-1)) * inv + 0.5).clamp(0, 2**bits - 1)


def check_float_min(bits: int) -> None:
    if bits != 4:
        raise QuantError("the float-minimum form (-min) is 4-bit only: it is GGUF's Q4_1 (no 8-bit weight type)")


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True, float_min: bool = False
) -> QuantizedTensor:
    """Round-to-nearest group-wise quantization of ``weight``; ``float_min``: the Q4_1 form."""
    _check_bits(bits)
    w = as_matrix(weight)
    n, k = w.shape
    check_group(k, group_size)
    groups = w.view(n, k // group_size, group_size)
    if float_min:
        check_float_min(bits)
        scale, lo = minmax_params(groups, bits)
        codes = quantize_minmax(groups, scale, lo, bits).reshape(n, k)
        return QuantizedTensor(codes.to(torch.int16), scale.to(torch.float16), None, bits, group_size,
                               tuple(weight.shape), mins=lo.to(torch.float16))
    scale, zero = group_scales(groups, bits, symmetric)
    codes = quantize_groups(groups, scale, zero, bits).reshape(n, k)
    return QuantizedTensor(
        codes=codes.to(torch.int16),
        scales=scale.to(torch.float16),
        zero_points=None if zero is None else zero.to(torch.uint8),
        bits=bits,
        group_size=group_size,
        shape=tuple(weight.shape),
    )


def relative_error(weight: torch.Tensor, qt: QuantizedTensor) -> float:
    """‖W − Ŵ‖ / ‖W‖."""
    w = weight.detach().float()
    return float((w - qt.dequantize()).norm() / w.norm().clamp_min(1e-12))


def pack_unsigned(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values [..., n] → uint8 [..., ceil(n·bits/8)], two 4-bit values per byte
    with the first in the low nibble (ONNX Runtime's MatMulNBits layout; also our checkpoints')."""
    values = values.to(torch.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = torch.cat([values, values.new_zeros(*values.shape[:-1], 1)], dim=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_unsigned(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_unsigned`: the first ``n`` values of each row, as int16."""
    data = data.to(torch.int16)
    if bits == 8:
        return data[..., :n]
    return torch.stack([data & 0xF, data >> 4], dim=-1).flatten(-2)[..., :n]
