"""Quantized weights for the ExecuTorch program: our integer codes, or torchao's own quantizer.

4-bit linears become torchao ``IntxUnpackedToInt8Tensor`` weights with int8 per-token dynamic
activation quantization: what ``Int8DynamicActivationIntxWeightConfig`` (ExecuTorch's ``8da4w`` qmode)
produces, and what XNNPACK's dynamically-quantized partitioner turns into its ``qd8-f32-qb4w`` GEMMs.
They are built from our codes and scales (the tensor's constructor takes ``qdata`` / ``scale`` /
``zero_point``), not re-quantized; where XNNPACK's format cannot hold a group as is (negative Q4_0
scales, zero points) an exact per-group offset term is added (``xnnpack_int4``). Two roundings
remain, both XNNPACK's: each token's activations to int8 (the ``qd8`` in the GEMM's name), and each
group's scale to bf16 when ExecuTorch serializes the weights (its XNNPACK ``node_visitor``): an fp16
scale keeps its top 8 of 11 significant bits (≤ 0.4% per group). Measured on the default model's
decoder (relative L2 change of the last prompt position's logits, 10 test prompts with an image):
int8 activations 17%, bf16 scales 2.5% (TRAINING.md, run 14).

Most of the activation error comes from a few input channels: SmolLM2-class models carry "massive
activations" (a handful of channels 100–3000× the median, down_proj inputs above all), which set each
token's int8 range and flatten the rest. ``input_outliers`` finds each linear's largest input channels
on calibration data; ``CodesLinear`` masks them out of the int8 GEMM and multiplies them in fp32 by
their exact weight columns (LLM.int8()'s decomposition, with XNNPACK GEMMs only). What is left of the
int8 rounding, spread over every channel, goes with two-digit activations (``CodesLinear``'s
``high_step``), at the price of reading the codes twice.

The token embedding becomes ExecuTorch's ``quantized_decomposed::embedding_{4bit,byte}.dtype`` lookup
(the ops behind ``EmbeddingQuantHandler``, kernels in the runtime's quantized library), again from
our codes.

Native quantization (``8da4w``, ``8da4w-g64``…, ``8da8w``) runs torchao's ``quantize_`` with the
configs ExecuTorch's Llama export uses (``hqq_scale_only`` scales) on the float model instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from edge_mllm.quant.groupwise import QuantizedTensor
from edge_mllm.quant.storage import QuantizedWeights
from torch import nn

from edge_mllm.errors import QuantError

# ExecuTorch's embedding kernels and torchao's int4 type take signed codes; ours are signed for
# symmetric schemes and unsigned (0..2^bits-1, with a zero point) for asymmetric ones.
_BITS_DTYPE = {4: torch.int4, 8: torch.int8}


def signed_codes(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, zero points) as int8 in the signed range [-2^(b-1), 2^(b-1)-1]: asymmetric codes and
    their zero points shift together, so ``(code - zero) * scale`` is unchanged."""
    codes = qt.codes
    zero = torch.zeros(qt.scales.shape, dtype=torch.int16)
    if qt.zero_points is not None:
        offset = 2 ** (qt.bits - 1)
        codes, zero = codes - offset, qt.zero_points.to(torch.int16) - offset
    return codes.to(torch.int8), zero.to(torch.int8)


def xnnpack_int4(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Our 4-bit codes in the form XNNPACK's ``qb4w`` GEMM takes, exactly: (torchao int4 weight with
    positive scales, per-group offsets [N, K/group] or None).

    XNNPACK rejects scales that are not positive normal numbers and ignores zero points, while our
    groups are ``scale · (code − zero)`` with Q4_0's signed scale (``d = m / −8``: negative when the
    group's largest-magnitude weight is positive) or an asymmetric zero point. Every group is rewritten
    as ``s · q + o`` with ``s > 0`` and ``q`` in [−8, 7]:
    - symmetric, d > 0: ``d · c``;
    - symmetric, d < 0: ``|d| · (−c − 1) + |d|`` (−c reaches 8, which int4 cannot hold);
    - asymmetric: ``d · (u − 8) + (8 − z) · d``;
    - float minimum (Q4_1): ``d · (u − 8) + (8 · d + min)``;
    - d = 0 (an all-zero group): codes 0 with a tiny positive scale.
    Products of an fp16 scale and a small integer are exact in fp32, so the rewrite is exact too (as
    torchao holds it; XNNPACK then rounds the group scales to bf16, see the module docstring).
    ``linear(x) = qb4w(x) + group_sums(x) @ offsets.T``: the same weights, no re-quantization.
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActQuant,
    )

    if len(qt.shape) != 2 or qt.bits != 4:
        raise QuantError(f"expected 4-bit codes of a linear weight, got {qt.bits}-bit {list(qt.shape)}")
    n, k = qt.codes.shape
    g = qt.group_size
    codes = qt.codes.view(n, k // g, g).to(torch.int16)
    d = qt.scales.float()
    if qt.mins is not None:
        q = codes - 8
        scale, offset = d, 8 * d + qt.mins.float()
    elif qt.zero_points is None:
        negative = d < 0
        q = torch.where(negative.unsqueeze(-1), -codes - 1, codes)
        scale, offset = d.abs(), torch.where(negative, d.abs(), 0.0)
    else:
        q = codes - 8
        scale, offset = d, (8 - qt.zero_points.float()) * d
    # a zero scale makes the whole group 0: codes 0 with any positive scale give the same zeros (2^-100
    # is a normal number in bf16, which XNNPACK stores its group scales as)
    zero = scale == 0
    q = torch.where(zero.unsqueeze(-1), 0, q)
    scale = torch.where(zero, 2.0**-100, scale)
    weight = IntxUnpackedToInt8Tensor(
        qdata=q.reshape(n, k).to(torch.int8),
        scale=scale,
        zero_point=torch.zeros(scale.shape, dtype=torch.int8),
        target_dtype=torch.int4,
        block_size=(1, g),
        dtype=torch.float32,
        activation_quantization=ActQuant.INT8_ASYM_PER_TOKEN,
    )
    return weight, (offset if bool((offset != 0).any()) else None)


class CodesLinear(nn.Module):
    """A linear computing with our 4-bit codes: XNNPACK's dynamically quantized 4-bit GEMM, plus an
    exact fp32 side path: the per-group offsets of ``xnnpack_int4`` times the input's group sums, and
    the ``outliers`` input channels (kept out of the int8 activations: zeroed before the 4-bit GEMM)
    times their columns of the codes' values.

    The side path is two GEMMs: a constant 0/1 matrix picks the group sums and the outlier channels,
    then one matrix holds the offsets and the outlier columns. XNNPACK has no sum or gather kernel, and
    the alternatives (CPU-kernel sums or index_select, average pooling over a reshaped view, whose
    symbolic shape XNNPACK cannot take) put CPU ops between delegates: 2.7× the partitions. Linears that
    read the same input (q/k/v, gate/up) get the same outlier channels, so the program stores their 0/1
    matrix once. Measured on SmolLM2-135M's first 6 layers without outliers: decode about 30% slower
    than torchao's own ``8da4w`` (the price of keeping the codes exact), size +10%.

    ``high_step`` (two-digit activations): the GEMM reads each input value ``x`` as two int8 digits,
    ``x ≈ step · (high + low / 128)``: ``high = round(x / step)`` on a fixed step (calibrated per linear:
    ``two_digit_steps``) and the remainder ``low`` scaled up 128×, side by side along the reduction
    dimension against the codes twice (the low copy's group scales divided by 128: exact, a power of
    two). XNNPACK picks each token's int8 grid from the row's minimum and maximum, so two anchor inputs
    (127 and −128, in a group of zero weights) pin it to step 1, on which ``high`` is exact and ``low``
    (|low| ≤ 64) is rounded to 1/128 of a high step, at most 1/16 of the calibrated peak: about 12
    bits of that range instead of 8 of each token's. It costs the GEMM its
    reduction length twice over (and a few element-wise ops), all inside XNNPACK's delegate; a value
    past the calibrated range only widens that token's grid (the int8 rounding again, for that token).
    """

    def __init__(self, linear: nn.Linear, qt: QuantizedTensor, outliers: torch.Tensor | None = None,
                 high_step: float | None = None):
        super().__init__()
        if tuple(qt.shape) != tuple(linear.weight.shape):
            raise QuantError(f"codes of shape {list(qt.shape)} do not fit a linear of {list(linear.weight.shape)}")
        weight, offsets = xnnpack_int4(qt)
        picks, columns, keep = [], [], None
        if offsets is not None:
            picks.append(torch.eye(offsets.shape[1]).repeat_interleave(qt.group_size, dim=1))
            columns.append(offsets)
        if outliers is not None and len(outliers):
            keep = torch.ones(linear.in_features)
            keep[outliers] = 0
            picks.append(torch.eye(linear.in_features)[outliers])
            # the 4-bit GEMM's part of those columns (scale × code); their offsets stay in the group sums
            columns.append(weight.dequantize()[:, outliers])
        self.register_buffer("int8_channels", keep)
        to_high = rounding = anchors = None
        if high_step is not None:
            weight = two_digit_weight(weight, high_step)
            to_high = (torch.ones(linear.in_features) if keep is None else keep) / high_step
            rounding = torch.full((linear.in_features,), 0.5)  # floor(u + ½): XNNPACK has no round
            anchors = torch.zeros(linear.in_features + qt.group_size)
            anchors[-2:] = torch.tensor([127.0, -128.0])
        self.register_buffer("to_high", to_high)
        self.register_buffer("rounding", rounding)
        self.register_buffer("anchors", anchors)
        self.linear = nn.Linear(weight.shape[1], linear.out_features, bias=linear.bias is not None)
        self.linear.weight = nn.Parameter(weight, requires_grad=False)
        if linear.bias is not None:
            self.linear.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.side_inputs = self.side_weights = None
        if picks:
            pick = torch.cat(picks)
            self.side_inputs = nn.Linear(linear.in_features, pick.shape[0], bias=False)
            self.side_inputs.weight = nn.Parameter(pick, requires_grad=False)
            self.side_weights = nn.Linear(pick.shape[0], linear.out_features, bias=False)
            self.side_weights.weight = nn.Parameter(torch.cat(columns, dim=1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_high is not None:
            u = x * self.to_high
            high = torch.clamp(torch.floor(u + self.rounding), -128, 127)
            pad = self.anchors.shape[0] - u.shape[-1]
            y = self.linear(torch.cat([F.pad(high, (0, pad)) + self.anchors, (u - high) * LOW_DIGIT], dim=-1))
        else:
            y = self.linear(x if self.int8_channels is None else x * self.int8_channels)
        if self.side_weights is None:
            return y
        return y + self.side_weights(self.side_inputs(x))


# The low digit's weight: |u − round(u)| ≤ ½ becomes |low| ≤ 64, inside the int8 grid the anchors pin.
LOW_DIGIT = 128.0
# The high digit's fixed step covers this multiple of the calibration set's largest (non-outlier) input.
HIGH_DIGIT_HEADROOM = 4.0


def two_digit_weight(weight: torch.Tensor, high_step: float) -> torch.Tensor:
    """``xnnpack_int4``'s weight [N, K] as [N, K + group + K]: the codes for the high digit (scales ×
    ``high_step``), a group of zero codes for the anchors, the codes again for the low digit (scales ×
    ``high_step`` / 128). ``high_step`` is a power of two, so the scales stay exact in bf16."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    q, scale = weight.qdata, weight.scale
    n, group = q.shape[0], weight.block_size[1]
    qdata = torch.cat([q, torch.zeros(n, group, dtype=q.dtype), q], dim=1)
    scale = torch.cat([scale * high_step, torch.full((n, 1), 2.0**-100), scale * (high_step / LOW_DIGIT)], dim=1)
    return IntxUnpackedToInt8Tensor(
        qdata=qdata, scale=scale, zero_point=torch.zeros(scale.shape, dtype=torch.int8),
        target_dtype=weight.target_dtype, block_size=weight.block_size, dtype=torch.float32,
        activation_quantization=weight.activation_quantization,
    )


# Input channels per linear kept out of the int8 activations (``input_outliers``). On the default
# model's decoder (30 test prompts with an image, relative L2 change of the last position's logits from
# the int8 rounding, emulated in PyTorch): 18.5% with none, 8.5% with 4 per linear, 8.0% with 8; a
# threshold on the channel's peak over the median instead (8× / 16×: 197 / 54 channels in all) 11% / 14%.
# The default's ExecuTorch bundle with 4: logits 11% from PyTorch's with the same codes instead of 30%,
# decode as fast, +16 MB (README, export formats).
OUTLIER_CHANNELS = 4


@torch.no_grad()
def input_peaks(lm: nn.Module, calibration: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each input channel's largest magnitude [K] over ``calibration`` (inputs_embeds [1, T, D]) for
    each linear of ``lm`` (a ``LlamaForCausalLM``), named as in ``TextDecoder`` (``layers.N.mlp.down_proj``,
    ``lm_head``)."""
    peaks: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            peak = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        return hook

    hooks = [module.register_forward_pre_hook(record(name.removeprefix("model.")))
             for name, module in lm.named_modules() if isinstance(module, nn.Linear)]
    try:
        for embeds in calibration:
            lm(embeds)
    finally:
        for hook in hooks:
            hook.remove()
    return peaks


def input_outliers(peaks: dict[str, torch.Tensor], count: int = OUTLIER_CHANNELS) -> dict[str, torch.Tensor]:
    """Each linear's ``count`` input channels of largest magnitude (``peaks``: ``input_peaks``), sorted."""
    return {name: peak.topk(min(count, len(peak))).indices.sort().values for name, peak in peaks.items()}


def two_digit_steps(peaks: dict[str, torch.Tensor], outliers: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """Per linear, the high digit's step (``CodesLinear``): the power of two whose 127 steps cover
    ``HIGH_DIGIT_HEADROOM`` × the largest input on calibration data, outlier channels aside."""
    steps = {}
    for name, peak in peaks.items():
        rest = peak.clone()
        if outliers and name in outliers:
            rest[outliers[name]] = 0
        top = float(rest.max()) * HIGH_DIGIT_HEADROOM
        steps[name] = 2.0 ** math.ceil(math.log2(top / 127)) if top > 0 else 1.0
    return steps


class QuantizedEmbedding(nn.Module):
    """Group-wise 4/8-bit embedding through ExecuTorch's quantized embedding ops."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int):
        super().__init__()
        if bits not in (4, 8):
            raise QuantError(f"ExecuTorch's embedding ops take 4- or 8-bit codes, not {bits}-bit")
        self.bits = bits
        codes = codes.to(torch.int8)
        if bits == 4:  # two codes a byte, offset to unsigned, even column in the high nibble (_pack_embedding_weight)
            u = (codes.to(torch.int16) + 8).to(torch.uint8).view(codes.shape[0], -1, 2)
            codes = (u[..., 0] << 4) | u[..., 1]
        self.register_buffer("weight", codes.contiguous())
        # ExecuTorch's kernel wants zero points in the output's dtype (fp32), PyTorch's op in the scales'
        scale_type = torch.float16 if zero_points is None else torch.float32
        self.register_buffer("scales", scales.to(scale_type).contiguous())
        zeros = None if zero_points is None else zero_points.to(torch.float32).contiguous()
        self.register_buffer("zero_points", zeros)

    @classmethod
    def from_codes(cls, qt: QuantizedTensor) -> QuantizedEmbedding:
        if qt.mins is not None:
            # The op computes (q − zp)·s with a float zp: the float minimum becomes zp = −8 − min/s
            # (fp32 rounding only); a constant group is code −8 with s = min, zp = −9.
            d, m = qt.scales.float(), qt.mins.float()
            flat = d == 0
            scale = torch.where(flat, m, d)
            zero = torch.where(flat, -9.0, -8 - m / torch.where(flat, 1.0, d))
            return cls(qt.codes - 8, scale, zero, qt.bits)
        codes, zero = signed_codes(qt)
        return cls(codes, qt.scales, None if qt.symmetric else zero, qt.bits)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            op, qmin, qmax = torch.ops.quantized_decomposed.embedding_4bit.dtype, -8, 7
        else:
            op, qmin, qmax = torch.ops.quantized_decomposed.embedding_byte.dtype, -128, 127
        return op(self.weight, self.scales, self.zero_points, qmin, qmax, indices, dtype=torch.float32)


def load_quantized_ops() -> None:
    """Register ``quantized_decomposed::embedding_*`` (definitions and fake kernels) with PyTorch."""
    from executorch.exir.passes import _quant_patterns_and_replacements  # noqa: F401


# ----------------------------------------------------------------------------------------------
# our codes


def apply_codes(decoder: nn.Module, embedding: nn.Module, weights: QuantizedWeights, prefix: str,
                outliers: dict[str, torch.Tensor] | None = None, high_steps: dict[str, float] | None = None
                ) -> list[str]:
    """Give the decoder's linears and the token embedding our codes; returns the parameter names used.

    ``decoder`` is a ``modules.TextDecoder`` (its linears keep the LLM's module names under ``layers.``
    and ``lm_head``), ``embedding`` a ``modules.TokenEmbedding``; ``prefix`` is the LLM's parameter
    prefix (``language_model.``). 4-bit linears become ``CodesLinear``, with their ``outliers`` (by
    linear name, from ``input_outliers``) kept out of the int8 activations and, with ``high_steps``
    (``two_digit_steps``), their other inputs as two int8 digits. XNNPACK has no group-wise 8-bit
    GEMM, so 8-bit linears (``-mixed`` schemes, ``w8``) keep their dequantized values in fp32: the same
    weights, at 4 bytes each. The embedding takes 4- and 8-bit codes.
    """
    used = []
    tied = f"{prefix}model.embed_tokens.weight"
    linears = [(name, module) for name, module in decoder.named_modules() if isinstance(module, nn.Linear)]
    for name, module in linears:
        if name.startswith("layers."):
            key = f"{prefix}model.{name}.weight"
        else:  # lm_head: under its own name, or the embedding's when tied
            key = f"{prefix}{name}.weight" if f"{prefix}{name}.weight" in weights.tensors else tied
        qt = weights.tensors.get(key)
        if qt is None or qt.bits != 4:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(decoder.get_submodule(parent_name), attr, CodesLinear(module, qt, (outliers or {}).get(name),
                                                                  (high_steps or {}).get(name)))
        used.append(key)
    qt = weights.tensors.get(tied)
    if qt is not None:
        embedding.embed_tokens = QuantizedEmbedding.from_codes(qt)
        used.append(tied)
    return sorted(set(used))


# ----------------------------------------------------------------------------------------------
# torchao's own quantizer


@dataclass(frozen=True)
class NativeQuant:
    """``8da{bits}w[-g{group}]``: int8 dynamic activations, ``bits``-bit weights (group 0: per channel)."""

    bits: int
    group_size: int

    @property
    def name(self) -> str:
        return f"8da{self.bits}w" + (f"-g{self.group_size}" if self.group_size else "")


NATIVE_NAMES = ("8da4w", "8da4w-g32", "8da4w-g64", "8da4w-g128", "8da8w")
# 32 (not ExecuTorch's 128) by default: it divides the widths of compact LLMs (SmolLM2's 576 is not a
# multiple of 128) and is what ExecuTorch's SpinQuant/QAT Llama 3.2 configs use.
DEFAULT_GROUP = 32


def parse_native(name: str) -> NativeQuant:
    m = re.fullmatch(r"8da([48])w(?:-g(\d+))?", name)
    if name not in NATIVE_NAMES or m is None:
        raise QuantError(f"unknown ExecuTorch quantization {name!r} (choose from {', '.join(NATIVE_NAMES)})")
    bits = int(m[1])
    group = int(m[2]) if m[2] else (DEFAULT_GROUP if bits == 4 else 0)
    return NativeQuant(bits, group)


def apply_native(decoder: nn.Module, embedding: nn.Module, native: NativeQuant) -> None:
    """torchao ``quantize_`` on the decoder's linears (those whose width the group divides, as in
    ExecuTorch's Llama export) and on the embedding (then packed for ExecuTorch's embedding op)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_

    dynamic_quantize_linears_(decoder, native)
    granularity = _granularity(native)
    dtype = _BITS_DTYPE[native.bits]
    table = embedding.embed_tokens
    if native.group_size and table.embedding_dim % native.group_size:
        return
    quantize_(table, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity), filter_fn=lambda m, _: True)
    w = table.weight
    embedding.embed_tokens = QuantizedEmbedding(w.qdata, w.scale.reshape(w.shape[0], -1), None, native.bits)


# The vision tower's int8 option (``--int8-vision``): int8 weights per output channel with int8 per-token
# dynamic activations, which XNNPACK runs as its ``qd8-f32-qc8w`` GEMMs (VNNI / SDOT int8 dot products).
VISION_INT8 = NativeQuant(8, 0)


def dynamic_quantize_linears_(module: nn.Module, native: NativeQuant) -> None:
    """Every ``nn.Linear`` under ``module`` whose width the group divides as torchao's
    ``Int8DynamicActivationIntxWeightConfig`` linear (``hqq_scale_only`` scales), in place: the form
    XNNPACK's partitioner lowers to its dynamically quantized GEMMs."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_

    def fits(module: nn.Module, _fqn: str) -> bool:
        return isinstance(module, nn.Linear) and (not native.group_size or module.in_features % native.group_size == 0)

    quantize_(
        module,
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=_BITS_DTYPE[native.bits], weight_granularity=_granularity(native),
            intx_choose_qparams_algorithm="hqq_scale_only",
        ),
        filter_fn=fits,
    )


def _granularity(native: NativeQuant):
    from torchao.quantization.granularity import PerAxis, PerGroup

    return PerGroup(native.group_size) if native.group_size else PerAxis(0)
