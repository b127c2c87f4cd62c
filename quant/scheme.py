"""Quantization schemes by name, and the policy that says which tensor gets how many bits.

Names: ``{method}-w{bits}-g{group}[-asym|-min][-dq][-sq][-mixed]``, e.g. ``rtn-w4-g32``,
``gptq-w4-g64-asym``, ``awq-w4-g32-mixed``, ``rtn-w4-g32-min``, ``gptq-w4-g32-sq``, ``rtn-w8-g32``.
``-asym``: integer zero point; ``-min``: a float minimum per group (GGUF's Q4_1 form, 4-bit only);
``-dq``: the language model's group scales (and minimums) stored as 8-bit codes on per-row fp16 steps
(half a bit per weight less); ``-sq``: SmoothQuant's scale migration folded into the decoder before
rounding (``quant.scaling``), for runtimes that also quantize activations to int8 (ExecuTorch's
8da4w); it needs calibration data and does not combine with AWQ, which picks its own scales.
Methods: ``rtn`` (round to nearest), ``gptq``, ``awq``
(activation-aware scaling, then round to nearest), ``awq+gptq`` (AWQ's scaling, then GPTQ's
rounding); all but ``rtn`` need calibration data.
``-mixed`` keeps the sensitive tensors at 8 bits: the token embedding / LM head and the first and
last decoder blocks. The vision tower, patch embedding and projector are 8-bit in every scheme
(convs per output channel, since their reduction dims rarely divide a group size).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edge_mllm.errors import QuantError

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
GROUP_SIZES = (32, 64, 128)
_NAME = re.compile(
    r"^(?P<method>[a-z+]+)-w(?P<bits>\d+)-g(?P<group>\d+)(?:(?P<asym>-asym)|(?P<min>-min))?(?P<dq>-dq)?"
    r"(?P<sq>-sq)?(?P<mixed>-mixed)?$"
)
VISION_BITS = 8


@dataclass(frozen=True)
class QuantScheme:
    method: str
    bits: int
    group_size: int
    symmetric: bool = True
    mixed: bool = False
    float_min: bool = False  # the Q4_1 form (implies not symmetric)
    double_quant: bool = False  # scales (and minimums) as 8-bit codes on per-row steps
    smooth: bool = False  # SmoothQuant scale migration before rounding

    @property
    def name(self) -> str:
        zero = "-min" if self.float_min else "" if self.symmetric else "-asym"
        return (f"{self.method}-w{self.bits}-g{self.group_size}{zero}" + ("-dq" if self.double_quant else "")
                + ("-sq" if self.smooth else "") + ("-mixed" if self.mixed else ""))

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn" or self.smooth

    @classmethod
    def parse(cls, name: str) -> QuantScheme:
        m = _NAME.match(name.strip().lower())
        if not m:
            raise QuantError(
                f"unknown quantization scheme {name!r}: expected METHOD-wBITS-gGROUP[-asym|-min][-dq][-sq][-mixed], "
                "e.g. rtn-w4-g32, gptq-w4-g64-asym, rtn-w4-g32-min, awq-w4-g32-mixed"
            )
        method, bits, group = m["method"], int(m["bits"]), int(m["group"])
        if method not in METHODS:
            raise QuantError(f"unknown quantization method {method!r} (methods: {', '.join(METHODS)})")
        if bits not in (4, 8):
            raise QuantError(f"{bits}-bit weights are not supported (4 or 8)")
        if group not in GROUP_SIZES:
            raise QuantError(f"group size {group} is not supported ({', '.join(map(str, GROUP_SIZES))})")
        if m["min"] and bits != 4:
            raise QuantError("-min (a float minimum per group, GGUF's Q4_1 form) is 4-bit only")
        if m["asym"] and m["dq"]:
            raise QuantError("-dq double-quantizes symmetric or -min scales; integer zero points (-asym) are not")
        if m["sq"] and "awq" in method:
            raise QuantError("-sq and AWQ both pick per-channel scales: use gptq-…-sq or rtn-…-sq, or awq alone")
        float_min = bool(m["min"])
        return cls(method, bits, group, symmetric=not (m["asym"] or float_min), mixed=bool(m["mixed"]),
                   float_min=float_min, double_quant=bool(m["dq"]), smooth=bool(m["sq"]))


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is quantized; ``group_size`` 0 means one group per output row."""

    bits: int
    group_size: int
    symmetric: bool
    method: str  # the scheme's method, or "rtn" where it does not apply
    float_min: bool = False
    double_quant: bool = False


def plan_tensor(scheme: QuantScheme, name: str, shape: tuple[int, ...], num_layers: int) -> TensorPlan | None:
    """The plan for parameter ``name`` of a MultimodalLM, or None to keep it in floating point."""
    if len(shape) < 2 or name.endswith("position_embedding.weight"):
        return None  # norms, biases, class/position embeddings: tiny, and sensitive
    k = 1
    for d in shape[1:]:
        k *= d
    if not name.startswith("language_model."):
        group = scheme.group_size if len(shape) == 2 and k % scheme.group_size == 0 else 0
        return TensorPlan(VISION_BITS, group, True, "rtn")
    block = re.search(r"\.layers\.(\d+)\.", name)
    embedding = name.endswith(("embed_tokens.weight", "lm_head.weight"))
    sensitive = embedding or (block is not None and int(block[1]) in (0, num_layers - 1))
    bits = 8 if scheme.mixed and sensitive else scheme.bits
    if k % scheme.group_size:
        raise QuantError(f"group size {scheme.group_size} does not divide {name}'s reduction dim {k}")
    # The (usually tied) embedding / LM head cannot take AWQ's scales, which the lookup would see,
    # so data-aware schemes give it GPTQ on the LM head's inputs.
    method = ("rtn" if scheme.method == "rtn" else "gptq") if embedding else scheme.method
    float_min = scheme.float_min and bits == 4  # -mixed's 8-bit tensors are symmetric (Q8_0) instead
    return TensorPlan(bits, scheme.group_size, scheme.symmetric or (scheme.float_min and not float_min), method,
                      float_min, scheme.double_quant)
