"""Finishing an exported graph: fold its weight transposes, strip what varies between runs, write
it with its weights as external data under a fixed file name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from edge_mllm.export.onnx import surgery
from onnx import numpy_helper

# Tensors from this size on go to ``<model>.onnx.data`` (onnx's own default threshold): the graph
# file stays small to parse, the weights can be memory-mapped, and no file nears protobuf's 2 GB.
EXTERNAL_DATA_THRESHOLD = 1024


def fold_weight_transposes(model: onnx.ModelProto) -> None:
    """Store each ``Transpose(W)`` of an initializer as the transposed initializer ``<W>.T``.

    The exporter writes a linear as ``MatMul(x, Transpose(W))``; left so, ONNX Runtime would
    transpose every float weight at each session start (time and a second copy in memory on the
    phone). Done by hand: onnxscript's general optimizer takes 80–120 s on the 135M default model
    and skips tensors above its size limit, and ONNX Runtime folds the remaining small shape
    arithmetic at load anyway."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            kept.append(node)
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        name = f"{node.input[0]}.T" if perm in (None, [1, 0]) else node.output[0]
        if name not in inits:
            array = numpy_helper.to_array(inits[node.input[0]]).transpose(perm)
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
            graph.initializer.append(inits[name])
        renamed[node.output[0]] = name
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    surgery.prune(model)


def strip_metadata(model: onnx.ModelProto) -> None:
    """Drop doc strings and per-node metadata (where exporters record stack traces naming local
    paths): the files then depend only on the model."""
    model.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]


def save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``path`` and, if any tensor is large, ``<path>.data``; returns the files written."""
    strip_metadata(model)
    data = path.with_name(path.name + ".data")
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
        size_threshold=EXTERNAL_DATA_THRESHOLD, convert_attribute=True,
    )
    if not data.exists():
        return [path]
    data.chmod(path.stat().st_mode & 0o777)  # onnx creates it owner-only; match the graph file
    return [path, data]
