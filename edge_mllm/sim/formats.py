"""How a model's weights are stored (bits per weight, scales included) and what arithmetic reads them.

A quantization label (our scheme names, a format's own type, or none) becomes a :class:`WeightPlan`:
one :class:`WeightFormat` for the decoder blocks, the token embedding, the LM head and the vision
tower. The simulator needs bytes (memory, decode traffic) and the precision the matmuls run at
(which peak throughput applies).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from edge_mllm.errors import ConfigError

# The precisions the device profiles give peak throughput for.
PRECISIONS = ("fp32", "fp16", "int8")
FAMILIES = ("gguf", "executorch", "onnx")


@dataclass(frozen=True)
class WeightFormat:
    """``bits``: stored bits per weight, scales and zero points included. ``compute``: the precision
    of the matmuls that consume the weights (integer-dot kernels quantize activations to int8)."""

    name: str
    bits: float
    compute: str

    @property
    def bytes_per_weight(self) -> float:
        return self.bits / 8


F32 = WeightFormat("f32", 32, "fp32")
F16 = WeightFormat("f16", 16, "fp16")
# ggml block sizes (ggml-common.h): Q8_0 = 32 int8 + fp16 scale, Q4_0 = 16 bytes + fp16 scale,
# Q4_1 adds an fp16 minimum. K-quant mixes: llama.cpp reports 4.64 BPW for MobileLLaMA-1.4B at Q4_K_S
# (MobileVLM issue #13 log, ../shared/reference/mobilevlm.md §2); Q4_K_M is 4.85 BPW (estimate:
# llama.cpp's quantize README, 3.80 GiB for Llama-2-7B). Every ggml integer type runs as an int8 dot
# product against Q8-quantized activations.
GGUF_TYPES: dict[str, WeightFormat] = {
    "f32": F32,
    "f16": F16,
    "bf16": WeightFormat("bf16", 16, "fp16"),
    "q8_0": WeightFormat("q8_0", 8.5, "int8"),
    "q4_0": WeightFormat("q4_0", 4.5, "int8"),
    "q4_1": WeightFormat("q4_1", 5.0, "int8"),
    "q4_k_s": WeightFormat("q4_k_s", 4.64, "int8"),
    "q4_k_m": WeightFormat("q4_k_m", 4.85, "int8"),
}
_OUR_SCHEME = re.compile(r"^[a-z+]+-w\d+-g\d+(-[a-z]+)*$")  # quant/scheme.py validates the rest
_ET_NATIVE = re.compile(r"^8da([48])w(?:-g(\d+))?$")
_ORT_NATIVE = re.compile(r"^ort-int4(?:-g(\d+))?$")


def _grouped(name: str, bits: int, group: int, scale_bits: int) -> WeightFormat:
    """``bits``-bit codes with one ``scale_bits`` scale per ``group`` weights (group 0: per row,
    whose scale cost is negligible)."""
    return WeightFormat(name, bits + (scale_bits / group if group else 0), "int8")


@dataclass(frozen=True)
class WeightPlan:
    """The format of each part of a model. ``lm_head`` None: it shares the embedding's storage (tied).
    ``edge_blocks``: the first and last decoder blocks, when they differ (``-mixed`` schemes)."""

    label: str
    blocks: WeightFormat
    embedding: WeightFormat
    lm_head: WeightFormat | None
    vision: WeightFormat
    edge_blocks: WeightFormat | None = None
    # How many times the LLM's matmuls multiply each weight (two-digit activations: 2, see _read_twice)
    llm_flops_factor: int = 1


def weight_plan(quant: str | None, family: str, tied: bool, two_digit_activations: bool = False) -> WeightPlan:
    """The weight plan of a ``family`` bundle (``gguf``, ``executorch`` or ``onnx``) exported with
    ``quant``: one of our schemes (``awq-w4-g32``…), the family's own type, or None (floats).

    Follows what ``edge-mllm export`` writes (export/*/bundle.py): GGUF keeps the mmproj in F16 next to
    a quantized LLM (F32 next to F32); ExecuTorch and ONNX keep the vision tower in fp32; our schemes
    store the vision tower as 8-bit codes, which only the GGUF mmproj runs as integers.
    ``two_digit_activations``: an ExecuTorch bundle of our 4-bit codes exported with them."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown bundle family {family!r} (choose from {', '.join(FAMILIES)})")
    label = quant or "float"
    if quant is None:
        fmt = F16 if family == "gguf" else F32
        return WeightPlan(label, fmt, fmt, None if tied else fmt, fmt)
    name = quant.strip().lower()
    if _OUR_SCHEME.match(name):
        from edge_mllm.errors import QuantError
        from edge_mllm.quant.scheme import QuantScheme

        try:
            scheme = QuantScheme.parse(name)
        except QuantError as exc:
            raise ConfigError(str(exc)) from exc
        # Per group: GGUF's Q4_0/Q4_1/Q8_0 blocks keep an fp16 scale (and an fp16 minimum when
        # asymmetric); ONNX Runtime's MatMulNBits an fp32 scale (its activations' type), a packed
        # integer zero point, and our float minimums as an fp32 offset (export/onnx/nbits.py).
        scale_bits, offset_bits = (32, 32 if scheme.float_min else scheme.bits) if family == "onnx" else (16, 16)
        fmt = _grouped(scheme.name, scheme.bits, scheme.group_size,
                       scale_bits + (0 if scheme.symmetric else offset_bits))
        eight = _grouped(f"{scheme.name} (8-bit part)", 8, scheme.group_size, scale_bits)
        sensitive = eight if scheme.mixed else fmt
        vision = WeightFormat("8-bit codes", 8.5, "int8") if family == "gguf" else F32
        plan = WeightPlan(scheme.name, fmt, sensitive, None if tied else sensitive, vision,
                          edge_blocks=eight if scheme.mixed else None)
        return _read_twice(plan) if two_digit_activations and family == "executorch" else plan
    if family == "gguf" and name in GGUF_TYPES:
        fmt = GGUF_TYPES[name]
        return WeightPlan(name, fmt, fmt, None if tied else fmt, F32 if fmt is F32 else F16)
    m = _ET_NATIVE.match(name)
    if family == "executorch" and m:
        bits, group = int(m[1]), int(m[2]) if m[2] else (32 if m[1] == "4" else 0)
        # torchao keeps fp32 scales (export/executorch/quantize.py: 8da4w = int8 dynamic
        # activations x 4-bit weights); the embedding gets the same bits and group.
        fmt = _grouped(name, bits, group, 32)
        return WeightPlan(name, fmt, fmt, None if tied else fmt, F32)
    m = _ORT_NATIVE.match(name)
    if family == "onnx" and m:
        # MatMulNBits with fp32 scales; onnxruntime's quantizer leaves the embedding Gather in fp32.
        fmt = _grouped(name, 4, int(m[1] or 32), 32)
        return WeightPlan(name, fmt, F32, None if tied else fmt, F32)
    raise ConfigError(f"unknown quantization {quant!r} for a {family} model; {quant_help(family)}")


def quant_help(family: str) -> str:
    """The quantization labels ``family`` accepts, for error messages."""
    native = {"gguf": ", ".join(GGUF_TYPES), "executorch": "8da4w[-gN], 8da8w", "onnx": "ort-int4[-gN]"}[family]
    return f"use one of our schemes (METHOD-wBITS-gGROUP[-asym][-mixed], e.g. awq-w4-g32) or {native}"



def bundle_weight_plan(manifest: dict, family: str, tied: bool) -> WeightPlan:
    """The weight plan of an exported bundle, from its manifest (its quantization label, and whether
    an ExecuTorch bundle's 4-bit linears take two-digit activations)."""
    two_digits = bool(manifest.get("executorch", {}).get("two_digit_activations"))
    return weight_plan(manifest.get("quantization"), family, tied, two_digits)


def _read_twice(plan: WeightPlan) -> WeightPlan:
    """ExecuTorch's two-digit activations (``export/executorch/quantize.py``): each 4-bit GEMM holds its
    codes twice, for the high and the low digit, so the decoder blocks and the LM head (its own copy)
    read twice the bytes where they are 4-bit, and the LLM's matmuls do twice the work (the 8-bit parts
    of ``-mixed`` schemes, which do not, are counted twice too: a small overestimate)."""
    def twice(fmt: WeightFormat) -> WeightFormat:
        return replace(fmt, name=f"{fmt.name} (two-digit activations)", bits=2 * fmt.bits) if fmt.bits < 8 else fmt

    return replace(plan, blocks=twice(plan.blocks), lm_head=twice(plan.lm_head or plan.embedding), llm_flops_factor=2)
