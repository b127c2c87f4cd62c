"""Our group-wise codes → ONNX Runtime's block-quantized operators' initializers.

ONNX Runtime's ``MatMulNBitsQuantizer`` quantizes floats itself; to keep the codes our GPTQ / AWQ
chose, we pack them by hand in the layout its kernels read (``contrib_defs.cc``):
- ``MatMulNBits`` (Y = A·Bᵀ, B [N, K]): ``B`` uint8 ``[N, n_blocks, block·bits/8]``, elements in K
  order, low nibble first; ``scales`` ``[N, n_blocks]``; ``zero_points`` uint8, each row's
  ``n_blocks`` values packed like B and padded to whole bytes, omitted for symmetric codes (the
  kernel's default zero point is 2^(bits−1)). Our float-minimum (Q4_1) codes are not integer zero
  points; MatMulNBits also takes float zero points (``zp = −min/s``), but its CPU kernels then leave
  their fast path (22× slower per decode step for a 576×1536 linear on an x86 CPU). So they keep the
  default zero point and carry per-block ``offsets`` ``[N, n_blocks]`` instead:
  ``q·s + min = (q − 2^(bits−1))·s + offset`` with ``offset = min + 2^(bits−1)·s``, which the graph
  adds as ``(A's block sums) · offsetsᵀ`` (``surgery.to_matmul_nbits``);
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
    zero_points: np.ndarray | None  # uint8, packed; None: the default 2^(bits−1)
    bits: int
    block_size: int
    rows: int  # N (MatMulNBits) or V (GatherBlockQuantized)
    cols: int  # K or D
    offsets: np.ndarray | None = None  # float32 [rows, n_blocks], added to every weight of a block

    @property
    def layout(self) -> tuple[int, int, int, bool, bool]:
        """What weights must share to stack into one operator (``stack_rows``): input width, bit
        width, block size, and whether they carry zero points and offsets."""
        return self.cols, self.bits, self.block_size, self.zero_points is None, self.offsets is None


def pack_nbits(qt: QuantizedTensor) -> NBitsWeight:
    """Pack ``qt`` (rows = output channels / vocabulary rows) for ONNX Runtime's N-bit operators."""
    rows, cols = qt.codes.shape
    if qt.group_size < 16 or qt.group_size & (qt.group_size - 1):
        raise QuantError(f"ONNX Runtime's block size must be a power of two ≥ 16, not {qt.group_size}")
    n_blocks = cols // qt.group_size
    codes = qt.unsigned_codes().reshape(rows, n_blocks, qt.group_size)
    scales = qt.scales.float().numpy()
    offsets = None
    if qt.mins is not None:
        offsets = (qt.mins.float().numpy() + 2 ** (qt.bits - 1) * scales).astype(np.float32)
    zero_points = None if qt.symmetric or qt.mins is not None else pack_unsigned(qt.zero_points, qt.bits).numpy()
    return NBitsWeight(
        data=pack_unsigned(codes, qt.bits).numpy(),
        scales=scales,
        zero_points=zero_points,
        bits=qt.bits,
        block_size=qt.group_size,
        rows=rows,
        cols=cols,
        offsets=offsets,
    )


def stack_rows(weights: list[NBitsWeight]) -> NBitsWeight:
    """Several weights of one input width and layout as one, their rows (output channels) stacked in
    order: the initializers of one ``MatMulNBits`` computing all their outputs side by side."""
    first = weights[0]
    if any(w.layout != first.layout for w in weights):
        raise QuantError("only weights of one input width, bit width, block size and zero-point form stack")

    def stacked(arrays):
        return None if arrays[0] is None else np.concatenate(arrays)

    return NBitsWeight(
        data=stacked([w.data for w in weights]),
        scales=stacked([w.scales for w in weights]),
        zero_points=stacked([w.zero_points for w in weights]),
        bits=first.bits,
        block_size=first.block_size,
        rows=sum(w.rows for w in weights),
        cols=first.cols,
        offsets=stacked([w.offsets for w in weights]),
    )
