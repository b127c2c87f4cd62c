"""Our group-wise codes → ONNX Runtime's block-quantized operators' initializers.

ONNX Runtime's ``MatMulNBitsQuantizer`` quantizes floats itself; to keep the codes our GPTQ / AWQ
chose, we pack them by hand in the layout its kernels read (``contrib_defs.cc``):
- ``MatMulNBits`` (Y = A·Bᵀ, B [N, K]): ``B`` uint8 ``[N, n_blocks, block·bits/8]``, elements in K
  order, low nibble first; ``scales`` ``[N, n_blocks]``; ``zero_points`` uint8, each row's
  ``n_blocks`` values packed like B and padded to whole bytes, omitted for symmetric codes (the
  kernel's default zero point is 2^(bits−1)); for our float-minimum (Q4_1) codes, float zero points
  ``[N, n_blocks]`` (the kernel's other accepted type): ``(q − zp)·s = q·s + min`` with ``zp = −min/s``;
- ``GatherBlockQuantized`` (embedding rows, quantize_axis 1): ``data`` uint8 ``[V, D·bits/8]`` packed
  the same way, ``scales`` ``[V, D/block]``, ``zero_points`` ``[V, D/block·bits/8]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from edge_mllm.quant.groupwise import QuantizedTensor, pack_unsigned

from edge_mllm.errors import QuantError


@dataclass
class NBitsWeight:
    """Initializers and attributes of one ``MatMulNBits`` / ``GatherBlockQuantized`` weight."""

    data: np.ndarray  # uint8, packed codes
    scales: np.ndarray  # float32 [rows, n_blocks]
    zero_points: np.ndarray | None  # uint8, packed, or float32 [rows, n_blocks]; None: the default 2^(bits−1)
    bits: int
    block_size: int
    rows: int  # N (MatMulNBits) or V (GatherBlockQuantized)
    cols: int  # K or D


def pack_nbits(qt: QuantizedTensor) -> NBitsWeight:
    """Pack ``qt`` (rows = output channels / vocabulary rows) for ONNX Runtime's N-bit operators."""
    rows, cols = qt.codes.shape
    if qt.group_size < 16 or qt.group_size & (qt.group_size - 1):
        raise QuantError(f"ONNX Runtime's block size must be a power of two ≥ 16, not {qt.group_size}")
    n_blocks = cols // qt.group_size
    codes = qt.unsigned_codes().reshape(rows, n_blocks, qt.group_size)
    scales = qt.scales.float().numpy()
    if qt.mins is not None:
        mins = qt.mins.float().numpy()
        flat = scales == 0  # a constant group is its minimum: code 0 with zp −1 and scale = min
        scales = np.where(flat, mins, scales)
        zero_points = np.where(flat, -1.0, -mins / np.where(flat, 1.0, scales)).astype(np.float32)
    else:
        zero_points = None if qt.symmetric else pack_unsigned(qt.zero_points, qt.bits).numpy()
    return NBitsWeight(
        data=pack_unsigned(codes, qt.bits).numpy(),
        scales=scales,
        zero_points=zero_points,
        bits=qt.bits,
        block_size=qt.group_size,
        rows=rows,
        cols=cols,
    )
