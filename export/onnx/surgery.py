"""Put our quantized codes into an exported float graph: each linear's ``MatMul`` becomes a
``com.microsoft.MatMulNBits`` and the token embedding's ``Gather`` a ``GatherBlockQuantized``, with
initializers packed by :func:`~edge_mllm.export.onnx.nbits.pack_nbits` from the exact integers our
quantizer chose.

ONNX Runtime's own ``MatMulNBitsQuantizer`` would re-quantize the float weights (and lose what GPTQ
/ AWQ chose), so the swap is done here with ``onnx.helper``. The exporter leaves every linear as
``MatMul(x, Transpose(W))`` and every parameter as an initializer named after it, which is how a
weight is found again.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping

import numpy as np
import onnx
import torch
from edge_mllm.export.onnx.nbits import NBitsWeight, pack_nbits, stack_rows
from edge_mllm.quant.groupwise import QuantizedTensor
from onnx import helper, numpy_helper

from edge_mllm.errors import QuantError

MS_DOMAIN = "com.microsoft"


def packable(qt: QuantizedTensor) -> bool:
    """Whether ONNX Runtime's block-quantized kernels can take these codes as they are."""
    g = qt.group_size
    return len(qt.shape) == 2 and qt.bits in (4, 8) and g >= 16 and not g & (g - 1) and qt.shape[1] % g == 0


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _add_initializers(graph: onnx.GraphProto, prefix: str, packed: NBitsWeight, data_shape) -> list[str]:
    """The packed codes as initializers named ``<weight>.qweight/.scales[/.zero_points]`` (our
    checkpoints' names); returns them in the operators' input order (zero points last)."""
    tensors = [(f"{prefix}.qweight", packed.data.reshape(data_shape)), (f"{prefix}.scales", packed.scales)]
    if packed.zero_points is not None:
        tensors.append((f"{prefix}.zero_points", packed.zero_points.reshape(packed.rows, -1)))
    inputs = [name for name, _ in tensors]
    if packed.offsets is not None:  # not an operator input: the [blocks, N] factor of the offsets' MatMul
        tensors.append((f"{prefix}.offsets", np.ascontiguousarray(packed.offsets.T)))
    graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in tensors)
    return inputs


def _replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], uses_ms_domain: bool) -> None:
    """Install the rewritten node list, import ``com.microsoft`` if used, drop what became unused."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if uses_ms_domain and all(op.domain != MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    prune(model)


def to_matmul_nbits(
    model: onnx.ModelProto, codes: Mapping[str, QuantizedTensor], accuracy_level: int
) -> set[str]:
    """Replace ``MatMul(A, Transpose(W))`` by ``MatMulNBits(A, codes of W)`` for every initializer
    ``W`` named in ``codes`` whose codes ONNX Runtime can take; returns the weights replaced.

    Linears that read the same ``A`` with codes of one layout (a block's Q / K / V, its gate / up)
    become one ``MatMulNBits`` over their rows stacked, its output split back into theirs: one
    kernel instead of two or three per step, as onnxruntime-genai's model builder packs them.

    Float-minimum codes add their blocks' offsets (``nbits``) beside it, in fp32:
    ``MatMulNBits(A) + (A · P) · offsetsᵀ``, with ``P`` the 0/1 [K, blocks] matrix that sums each
    block of A (one initializer per K and block size).

    ``accuracy_level``: MatMulNBits' minimum precision of A (1 fp32 … 4 int8, the mobile default)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    packed: dict[str, NBitsWeight] = {}  # a weight read twice is packed once
    groups: dict[tuple, list[int]] = {}  # (A, codes' layout) → its MatMuls' positions, in graph order
    weight_at: dict[int, str] = {}
    nodes = list(graph.node)
    for i, node in enumerate(nodes):
        src = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        weight = src.input[0] if src is not None and src.op_type == "Transpose" else None
        if weight not in codes or not packable(codes[weight]) or list(_attr(src, "perm", [])) != [1, 0]:
            continue
        if weight not in packed:
            packed[weight] = pack_nbits(codes[weight])
        w = packed[weight]
        key = (node.input[0], *w.layout)
        if weight in (weight_at[j] for j in groups.get(key, [])):
            key += (i,)  # the same product twice: computed twice, as the graph said
        groups.setdefault(key, []).append(i)
        weight_at[i] = weight

    first_of_group = {members[0]: members for members in groups.values()}
    initialized: dict[str, list[str]] = {}
    rewritten = []
    for i, node in enumerate(nodes):
        if i not in weight_at:
            rewritten.append(node)
        elif i in first_of_group:
            members = [(nodes[j], weight_at[j]) for j in first_of_group[i]]
            rewritten += _matmul_nbits_nodes(graph, members, packed, initialized, accuracy_level)
    _replace_nodes(model, rewritten, bool(groups))
    return set(packed)


def _matmul_nbits_nodes(graph: onnx.GraphProto, members: list[tuple[onnx.NodeProto, str]],
                        packed: Mapping[str, NBitsWeight], initialized: dict[str, list[str]],
                        accuracy_level: int) -> list[onnx.NodeProto]:
    """The nodes computing ``members`` (MatMuls of one input, each with its weight) as one
    ``MatMulNBits`` (+ offsets), split into the members' outputs when there are several."""
    weights = [weight for _, weight in members]
    name = weights[0] if len(weights) == 1 else _joined_name(weights)
    w = packed[name] if len(weights) == 1 else stack_rows([packed[weight] for weight in weights])
    if name not in initialized:
        initialized[name] = _add_initializers(graph, name, w, (w.rows, w.cols // w.block_size, -1))
    a, first = members[0][0].input[0], members[0][0].name
    outputs = [node.output[0] for node, _ in members]
    result = outputs[0] if len(members) == 1 else f"{first}_stacked"
    nbits = result if w.offsets is None else f"{result}_nbits"
    nodes = [helper.make_node(
        "MatMulNBits", [a, *initialized[name]], [nbits], name=f"{first}_nbits", domain=MS_DOMAIN,
        K=w.cols, N=w.rows, bits=w.bits, block_size=w.block_size, accuracy_level=accuracy_level,
    )]
    if w.offsets is not None:
        sums = f"block_sums.K{w.cols}.g{w.block_size}"
        if sums not in initialized:
            blocks = w.cols // w.block_size
            pick = np.repeat(np.eye(blocks, dtype=np.float32), w.block_size, axis=0)
            graph.initializer.append(numpy_helper.from_array(pick, sums))
            initialized[sums] = [sums]
        a_sums, offsets = f"{result}_block_sums", f"{result}_offsets"
        nodes += [
            helper.make_node("MatMul", [a, sums], [a_sums], name=f"{first}_block_sums"),
            helper.make_node("MatMul", [a_sums, f"{name}.offsets"], [offsets], name=f"{first}_offsets"),
            helper.make_node("Add", [nbits, offsets], [result], name=f"{first}_add_offsets"),
        ]
    if len(members) > 1:
        sizes = f"{name}.split"
        if sizes not in initialized:
            graph.initializer.append(numpy_helper.from_array(
                np.array([packed[weight].rows for weight in weights], dtype=np.int64), sizes))
            initialized[sizes] = [sizes]
        nodes.append(helper.make_node("Split", [result, sizes], outputs, name=f"{first}_split", axis=-1))
    return nodes


def _joined_name(weights: list[str]) -> str:
    """One name for stacked weights: their shared dotted prefix and suffix around the differing
    parts, e.g. ``layers.0.self_attn.q_proj+k_proj+v_proj.weight``."""
    parts = [weight.split(".") for weight in weights]
    prefix = len(os.path.commonprefix(parts))
    suffix = len(os.path.commonprefix([p[prefix:][::-1] for p in parts]))
    middles = [".".join(p[prefix:len(p) - suffix]) for p in parts]
    return ".".join([*parts[0][:prefix], "+".join(middles), *parts[0][len(parts[0]) - suffix:]])


def feed_packed_qkv(model: onnx.ModelProto) -> None:
    """Hand each ``GroupQueryAttention`` whose query, key and value are the three outputs of one
    ``Split`` (``to_matmul_nbits``' stacked Q / K / V, read by nothing else) the unsplit tensor as
    its packed-QKV query, key and value left empty: the kernel reads the three from it in place."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers = collections.Counter(name for node in graph.node for name in node.input)
    readers.update(out.name for out in graph.output)
    rewired = False
    for node in graph.node:
        split = producers.get(node.input[0]) if node.op_type == "GroupQueryAttention" else None
        if (split is None or split.op_type != "Split" or _attr(split, "axis", 0) != -1
                or list(split.output) != list(node.input[:3]) or any(readers[out] != 1 for out in split.output)):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        rewired = True
    if rewired:  # the Splits are left unread
        prune(model)


def to_gather_block_quantized(model: onnx.ModelProto, codes: Mapping[str, QuantizedTensor]) -> set[str]:
    """Replace ``Gather(W, ids)`` (an embedding lookup) by ``GatherBlockQuantized`` for every
    initializer ``W`` named in ``codes`` whose codes ONNX Runtime can take; returns those replaced.

    ``GatherBlockQuantized`` takes integer zero points only, so float-minimum (Q4_1) codes gather
    ``q·s`` (zero point 0) and add their rows' minimums: ``Gather(mins) @ E`` with ``E`` the 0/1
    [blocks, D] matrix that repeats each block's minimum over its columns."""
    graph = model.graph
    packed_inputs: dict[str, tuple[NBitsWeight, list[str]]] = {}
    nodes = []
    for node in graph.node:
        weight = node.input[0] if node.op_type == "Gather" else None
        if weight not in codes or not packable(codes[weight]) or _attr(node, "axis", 0) != 0:
            nodes.append(node)
            continue
        qt = codes[weight]
        if weight not in packed_inputs:
            packed = pack_nbits(qt if qt.mins is None else _without_mins(qt))
            packed_inputs[weight] = packed, _add_initializers(graph, weight, packed, (packed.rows, -1))
            if qt.mins is not None:
                graph.initializer.extend(_min_tables(weight, qt))
        packed, (data, scales, *zero_points) = packed_inputs[weight]
        scaled = f"{node.output[0]}_scaled" if qt.mins is not None else node.output[0]
        nodes.append(helper.make_node(
            "GatherBlockQuantized", [data, node.input[1], scales, *zero_points], [scaled],
            name=f"{node.name}_block_quantized", domain=MS_DOMAIN,
            gather_axis=0, quantize_axis=1, block_size=packed.block_size, bits=packed.bits,
        ))
        if qt.mins is not None:
            rows_min, offsets = f"{node.output[0]}_mins", f"{node.output[0]}_offsets"
            nodes += [
                helper.make_node("Gather", [f"{weight}.mins", node.input[1]], [rows_min], name=f"{node.name}_mins"),
                helper.make_node("MatMul", [rows_min, f"{weight}.mins_expand"], [offsets], name=f"{node.name}_expand"),
                helper.make_node("Add", [scaled, offsets], list(node.output), name=f"{node.name}_add_mins"),
            ]
    _replace_nodes(model, nodes, bool(packed_inputs))
    return set(packed_inputs)


def _without_mins(qt: QuantizedTensor) -> QuantizedTensor:
    """The codes with an explicit zero point of 0: what ``GatherBlockQuantized`` computes ``q·s`` from."""
    zeros = torch.zeros_like(qt.scales, dtype=torch.uint8)
    return QuantizedTensor(qt.codes, qt.scales, zeros, qt.bits, qt.group_size, qt.shape)


def _min_tables(weight: str, qt: QuantizedTensor) -> list[onnx.TensorProto]:
    """``<weight>.mins`` [V, blocks] and ``<weight>.mins_expand`` [blocks, D] (0/1) initializers."""
    blocks = qt.mins.shape[1]
    expand = np.repeat(np.eye(blocks, dtype=np.float32), qt.group_size, axis=1)
    return [numpy_helper.from_array(qt.mins.float().numpy(), f"{weight}.mins"),
            numpy_helper.from_array(expand, f"{weight}.mins_expand")]


def float_weights_left(model: onnx.ModelProto, codes: Mapping[str, QuantizedTensor]) -> list[str]:
    """Initializers that still hold a quantized weight in floating point."""
    return sorted(init.name for init in model.graph.initializer if init.name in codes)


def require_quantized(model: onnx.ModelProto, codes: Mapping[str, QuantizedTensor], what: str) -> None:
    """Refuse a graph in which a quantized weight was left in floating point (an unexpected
    pattern or codes ONNX Runtime cannot take): the bundle would silently not be the scheme."""
    left = float_weights_left(model, codes)
    if left:
        shown = ", ".join(f"{n} ({codes[n].bits}-bit, group {codes[n].group_size})" for n in left[:3])
        raise QuantError(f"{what}: cannot express these quantized weights as ONNX Runtime block-quantized "
                         f"operators: {shown}{' …' if len(left) > 3 else ''}")


def prune(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nothing reads and initializers no node reads (the float weights and
    their Transposes once replaced); graph inputs and outputs are kept."""
    graph = model.graph
    needed = {out.name for out in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
