"""Our group-wise codes → GGML quantization blocks (Q4_0, Q4_1, Q8_0), byte for byte.

gguf-py can *quantize* floats into these blocks, but not pack codes that another quantizer (GPTQ,
AWQ) chose, so this packs them by hand, after ggml's block structs (``ggml-common.h``):
- Q4_0: ``{fp16 d; uint8 qs[16]}``, x = d·(q − 8); byte j holds element j (low nibble) and j+16;
- Q4_1: ``{fp16 d; fp16 m; uint8 qs[16]}``, x = d·q + m;
- Q8_0: ``{fp16 d; int8 qs[32]}``, x = d·q.
All three have 32-element blocks, so only group size 32 packs.
"""

from __future__ import annotations

import numpy as np
from edge_mllm.quant.groupwise import QuantizedTensor
from gguf import GGMLQuantizationType

from edge_mllm.errors import QuantError

BLOCK = 32


def ggml_type(qt: QuantizedTensor) -> GGMLQuantizationType:
    """The GGML block type that holds ``qt``'s codes exactly, or a QuantError saying why none does."""
    if qt.group_size != BLOCK:
        raise QuantError(f"GGUF blocks hold {BLOCK} weights; group size {qt.group_size} cannot be packed (use g32)")
    if qt.bits == 4:
        return GGMLQuantizationType.Q4_0 if qt.symmetric else GGMLQuantizationType.Q4_1
    if qt.bits == 8 and qt.symmetric:
        return GGMLQuantizationType.Q8_0
    raise QuantError(f"no GGML block type for {qt.bits}-bit {'symmetric' if qt.symmetric else 'asymmetric'} codes")


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def pack_blocks(qt: QuantizedTensor) -> tuple[np.ndarray, GGMLQuantizationType]:
    """uint8 ``[rows, bytes_per_row]`` GGML block data of ``qt`` (rows = output channels) and its type."""
    qtype = ggml_type(qt)
    rows, k = qt.codes.shape
    codes = qt.codes.numpy().astype(np.int32).reshape(rows, k // BLOCK, BLOCK)
    d = _fp16_bytes(qt.scales.numpy())
    if qtype == GGMLQuantizationType.Q8_0:
        parts = [d, codes.astype(np.int8).view(np.uint8)]
    else:
        nibbles = codes + 8 if qt.symmetric else codes
        qs = (nibbles[..., :16] | (nibbles[..., 16:] << 4)).astype(np.uint8)
        parts = [d, qs]
        if qtype == GGMLQuantizationType.Q4_1:
            # ggml's Q4_1 has a float minimum (our -min form's, as is), not an integer zero point: m = −d·zero_point
            if qt.mins is not None:
                m = qt.mins.numpy()
            else:
                m = -qt.scales.float().numpy() * qt.zero_points.numpy().astype(np.float32)
            parts = [d, _fp16_bytes(m), qs]
    return np.concatenate(parts, axis=-1).reshape(rows, -1), qtype


def llm_raw_tensors(tensors: dict[str, QuantizedTensor]) -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    """``write_llama_gguf``'s ``raw_tensors`` from a quantization result's codes: the language model's
    quantized matrices, keyed by their Hugging Face names (the vision tower goes to the mmproj file)."""
    prefix = "language_model."
    return {name.removeprefix(prefix): pack_blocks(qt) for name, qt in tensors.items() if name.startswith(prefix)}
