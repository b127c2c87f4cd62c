"""The ONNX Runtime bundle: ``vision.onnx``, ``embedding.onnx``, ``decoder.onnx`` (each with its
``.onnx.data`` weights) and ``genai_config.json``.

Weights, by quantization:
- none: fp32 everywhere;
- one of our schemes (``rtn-w4-g32``, ``gptq-w4-g64-asym``…) or a quantized checkpoint: every decoder
  linear (LM head included) is a ``com.microsoft.MatMulNBits`` and the token embedding a
  ``GatherBlockQuantized`` (4- or 8-bit, whatever the scheme gave it), packed from our own codes
  (float-minimum codes add their groups' offsets beside each operator: ``surgery``); linears that
  read the same input are one operator over their stacked rows (a block's gate / up, split after;
  its Q / K / V, which GroupQueryAttention takes packed);
  a tied embedding / LM head is the same codes in both files. The vision tower's 8-bit linears are
  ``MatMulNBits`` where their group size is a block size ONNX Runtime takes; its convs (and any
  other linear) stay fp32 holding the dequantized codes, which is what the PyTorch model computes;
- ``ort-int4[-gBLOCK]``: ONNX Runtime's own ``MatMulNBitsQuantizer`` (RTN, symmetric, block 32 by
  default as Microsoft's mobile builds) on the decoder's linears and the embedding; vision in fp32.

MatMulNBits' ``accuracy_level`` is 1 (activations stay fp32), so the bundle computes what the
PyTorch model carrying the same codes computes: on the default model its logits are within 2e-4 and
its 32 greedy tokens identical. Level 4 (activations quantized to int8 per block: Microsoft's
setting for mobile CPUs, faster prefill) is ``write_onnx(..., accuracy_level=4)``; there the default
model's logits moved by up to 6.8 (of 37) and greedy decoding agreed on 29 of 32 tokens (31 of 32
teacher-forced), below the 95% parity bar, so it is not the default.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import onnx
from edge_mllm.export.bundle import Backend, register
from edge_mllm.export.onnx import files, graphs, surgery
from edge_mllm.export.onnx.genai_config import DECODER_FILE, EMBEDDING_FILE, FILENAME, VISION_FILE, genai_config
from edge_mllm.quant.groupwise import QuantizedTensor
from edge_mllm.quant.scheme import QuantScheme
from edge_mllm.quant.storage import QuantizedWeights
from tqdm import tqdm

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.errors import ConfigError, QuantError
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX, MultimodalLM
from edge_mllm.preprocess import NORMALIZED, RGB_FLOAT

DEFAULT_ACCURACY_LEVEL = 1
# ONNX Runtime's quantizer, by the name given to --quant → its block size.
NATIVE_BLOCK_SIZES = {"ort-int4": 32, "ort-int4-g32": 32, "ort-int4-g64": 64, "ort-int4-g128": 128}
# The exporter builds each graph as one protobuf message before its weights go to external data.
MAX_GRAPH_BYTES = 2**31 - 1


def codes_by_name(model: MultimodalLM, weights: QuantizedWeights) -> dict[str, QuantizedTensor]:
    """The codes of every parameter, under each of its names: a tied LM head is exported under
    either ``lm_head.weight`` or ``embed_tokens.weight``, and takes the same codes."""
    first = {id(p): name for name, p in model.named_parameters()}
    return {name: weights.tensors[first[id(p)]] for name, p in model.named_parameters(remove_duplicate=False)
            if first[id(p)] in weights.tensors}


def _ort_quantize(model: onnx.ModelProto, op_type: str, block_size: int, accuracy_level: int) -> onnx.ModelProto:
    """ONNX Runtime's RTN block quantizer on ``op_type`` nodes with constant weights."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                          op_types_to_quantize=(op_type,))
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    # It logs a line per node, and warns that it raises opset 20 to 21 "but the generated model may
    # not be valid": it is (the tests run it), and MatMulNBits' uint8 packing does not need opset 21.
    log.setLevel(logging.ERROR)
    try:
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
    finally:
        log.setLevel(level)
    return quantizer.model.model


def quantize_vision_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's dynamic int8 quantization of a vision graph: per-channel int8 weights, activations
    quantized per tensor at run time (MatMulInteger, and QAttention for the fused attention)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(model, out, op_types_to_quantize=["MatMul", "Attention"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True)
        return onnx.load(str(out))


def _graph(
    export: Callable[[MultimodalLM], onnx.ModelProto],
    loaded: LoadedModel,
    codes: dict[str, QuantizedTensor] | None,
    native_quant: str | None,
    accuracy_level: int,
    what: str,
    int8_vision: bool = False,
) -> onnx.ModelProto:
    """Export one component and give it its quantized weights."""
    model = export(loaded.model)
    if codes is not None:
        if what == "embedding":
            surgery.to_gather_block_quantized(model, codes)
        else:
            surgery.to_matmul_nbits(model, codes, accuracy_level)
            if what == "decoder":  # the one graph with GroupQueryAttention
                surgery.feed_packed_qkv(model)
        if what != "vision":  # the vision tower's convs and odd-sized linears stay in float
            surgery.require_quantized(model, codes, f"{what}.onnx")
    files.fold_weight_transposes(model)
    if native_quant is not None and what != "vision":
        op_type = "Gather" if what == "embedding" else "MatMul"
        model = _ort_quantize(model, op_type, NATIVE_BLOCK_SIZES[native_quant], accuracy_level)
    if int8_vision and what == "vision":
        model = quantize_vision_int8(model)
    return model


def _operators(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of the ONNX Runtime contrib operators (block-quantized, attention) in a graph (for the
    manifest and tests)."""
    ops = collections.Counter(n.op_type for n in model.graph.node if n.domain == surgery.MS_DOMAIN)
    return dict(sorted(ops.items()))


def write_onnx(
    loaded: LoadedModel,
    out_dir: Path,
    weights: QuantizedWeights | None = None,
    native_quant: str | None = None,
    *,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    progress: bool = False,
    fuse_vision: bool = True,
    int8_vision: bool = False,
) -> dict:
    """Write the ONNX files and ``genai_config.json`` of ``loaded`` into ``out_dir``; returns the
    format's part of the manifest. ``weights``: the codes the model's weights were quantized to.
    ``fuse_vision``: ``vision.onnx`` as the fused graph (RGB in [0, 1]; its weights are the folded
    fp32 values, also of a quantized vision tower) or the reference one (normalised pixels).
    ``int8_vision``: ``vision.onnx``'s float matrices through ONNX Runtime's dynamic int8 quantization."""
    out_dir = Path(out_dir)
    model = loaded.model.eval()
    codes = codes_by_name(model, weights) if weights is not None else None
    components = [("embedding", EMBEDDING_FILE, graphs.export_embedding),
                  ("decoder", DECODER_FILE, graphs.export_decoder)]
    if model.config.has_vision:
        components.insert(0, ("vision", VISION_FILE, partial(graphs.export_vision, fused=fuse_vision)))
    info: dict = {"genai_config": FILENAME, "opset": graphs.OPSET, "operators": {}}
    for what, filename, export in tqdm(components, desc="ONNX export", unit="graph", disable=not progress):
        graph = _graph(export, loaded, codes, native_quant, accuracy_level, what, int8_vision)
        info[what] = filename
        info["operators"][what] = _operators(graph)
        files.save(graph, out_dir / filename)
    (out_dir / FILENAME).write_text(json.dumps(genai_config(loaded), indent=2, sort_keys=True) + "\n")
    quantized = weights is not None or native_quant is not None
    info["weights"] = ("float32" if not quantized else "onnxruntime MatMulNBitsQuantizer" if native_quant
                       else "edge-mllm codes (MatMulNBits / GatherBlockQuantized)")
    info["accuracy_level"] = accuracy_level if quantized else None
    # Image positions in embedding.onnx's input_ids: any negative id (one per image token).
    info["image_token_id"] = IMAGE_TOKEN_INDEX if model.config.has_vision else None
    info["decoder_positions"] = "cache slots (past_sequence_length + i); no attention_mask / position_ids inputs"
    if model.config.has_vision:
        info["vision_fused"] = fuse_vision
        info["vision_input"] = RGB_FLOAT if fuse_vision else NORMALIZED
        info["vision_weights"] = ("int8 (onnxruntime quantize_dynamic: MatMulInteger / QAttention, per-channel "
                                  "weights, activations quantized at run time)" if int8_vision else "as the model's")
    return info


@register
class ONNXBackend(Backend):
    """ONNX Runtime (and onnxruntime-genai) bundles."""

    name = "onnx"
    native_quant = tuple(NATIVE_BLOCK_SIZES)
    int8_vision_unsupported = None
    tokenizer_dir = ""  # beside genai_config.json, where ONNX Runtime GenAI's tokenizer looks for it

    def check(self, loaded: LoadedModel, scheme: QuantScheme | None, native_quant: str | None) -> None:
        model = loaded.model
        for part in (model.language_model, model.vision_tower):
            size = 0 if part is None else 4 * sum(p.numel() for p in part.parameters())
            if size > MAX_GRAPH_BYTES:
                raise ConfigError(f"the model's fp32 weights ({size / 2**30:.1f} GiB in one graph) exceed the 2 GiB "
                                  "a protobuf message can hold while torch.onnx exports it")
        if loaded.quantization is not None:
            # A quantized checkpoint's codes go into the graph as they are: check ONNX Runtime takes them.
            for name, qt in sorted(loaded.quantization.tensors.items()):
                if name.startswith("language_model.") and not surgery.packable(qt):
                    raise QuantError(f"{name}: {qt.bits}-bit codes in groups of {qt.group_size} have no ONNX Runtime "
                                     "block-quantized operator (block sizes: powers of two ≥ 16; 4 or 8 bits)")

    def write(self, loaded: LoadedModel, out_dir: Path, weights: QuantizedWeights | None,
              native_quant: str | None, progress: bool) -> dict:
        return write_onnx(loaded, out_dir, weights, native_quant, progress=progress, fuse_vision=self.fuse_vision,
                          int8_vision=self.int8_vision)
