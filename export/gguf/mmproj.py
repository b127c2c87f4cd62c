"""Vision tower + projector → llama.cpp's multimodal projector file (``mmproj.gguf``, architecture
``clip``), read by libmtmd (``tools/mtmd/clip.cpp``), and a helper that runs it there.

What llama.cpp computes from the file, and how it is made to compute what our model computes:
- Layers: clip.cpp's LLaVA graph runs ``block_count − 1`` encoder layers unless
  ``clip.vision.feature_layer`` is set, in which case it runs ``max(feature_layer)`` layers and takes
  the hidden state after the last one (before any ``v.post_ln``). Our tower keeps exactly the
  ``VisionConfig.num_layers_computed`` layers it runs, so the file holds those, with
  ``block_count = feature_layer = [num_layers_computed]``: llama.cpp runs every stored layer, no more
  and no fewer (the legacy converter's ``block_count − 1`` default is what drops a layer).
- Features: the CLS row is dropped before the projector (clip.cpp always does, for these
  projectors), so only ``select_feature="patch"`` models export.
- Projectors: ``mlp2x_gelu`` → ``mlp`` (``mm.0`` / ``mm.2``), MobileVLM's ``ldp`` (``mm.model.mlp.*``,
  ``mm.model.mb_block.*``) and ``ldpv2`` (``mm.model.mlp.*``, ``mm.model.peg.0``). clip.cpp's LDP
  graphs hard-code a 24×24 patch grid (``int n_patch = 24``), so those need 336 px / 14 px patches.
- Numerics that differ by design: ggml's GELU is the tanh approximation, looked up in an fp16 table
  (our projectors use the exact erf GELU; quick-GELU is also tabulated); ggml's depthwise convolution
  (LDP, PEG) rounds its input to fp16 (im2col); LDP's LayerNorms use the tower's epsilon (ours 1e-5).
  Together they give ~1e-3 relative differences in the image embeddings.
- Token order: llama.cpp's current LLaVA graph appends the CLS token *after* the patches while its
  inputs still assume CLS first (llama.cpp #25814; fix PR #25844 not merged in the llama.cpp that
  llama-cpp-python 0.3.36 vendors), so each patch gets its neighbour's position embedding, the first
  patch is dropped and the projected CLS becomes the last image token. No file layout can undo that
  (the class token cannot stand in for a patch), so this writes the standard layout, right for
  llama.cpp builds before that graph refactor and after the fix.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from edge_mllm.export.gguf.blocks import pack_blocks
from edge_mllm.export.gguf.llm import _temp_sibling
from edge_mllm.quant.groupwise import QuantizedTensor
from gguf import (
    MODEL_ARCH,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFType,
    GGUFWriter,
    LlamaFileType,
    TensorNameMap,
    get_tensor_name_map,
)
from gguf.quants import quantize

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.config import MLLMConfig
from edge_mllm.errors import ConfigError, QuantError

# our projector type → clip.cpp's ``clip.projector_type`` (gguf-py's VISION_PROJECTOR_TYPE_NAMES)
PROJECTOR_TYPES = {"mlp2x_gelu": "mlp", "ldp": "ldp", "ldpv2": "ldpv2"}
LDP_GRID = 24  # clip.cpp models/llava.cpp: ``int n_patch = 24`` in both LDP graphs
# gguf-py 0.19 has no constant for this key (clip-impl.h KEY_FEATURE_LAYER); its type must be INT32 array.
FEATURE_LAYER_KEY = "clip.vision.feature_layer"
# mmproj float types: matrices in F16 or F32; norms, biases, class and position embeddings always F32.
MMPROJ_FLOAT_TYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),  # int8 vision: gguf-py's Q8_0 blocks
}
TOWER = "vision_tower."
PROJECTOR = "mm_projector."


def check_mmproj(config: MLLMConfig) -> None:
    """Raise ConfigError if llama.cpp cannot run this vision tower + projector as we do."""
    if not config.has_vision:
        return
    v, kind = config.vision, config.projector.type
    if kind not in PROJECTOR_TYPES:
        raise ConfigError(
            f"llama.cpp has no projector for our {kind!r} connector; GGUF export supports "
            f"{', '.join(PROJECTOR_TYPES)} (llama.cpp's mlp, ldp, ldpv2)"
        )
    if kind in ("ldp", "ldpv2") and v.grid_size != LDP_GRID:
        raise ConfigError(
            f"llama.cpp's {kind} graph hard-codes a {LDP_GRID}x{LDP_GRID} patch grid; this model's grid is "
            f"{v.grid_size}x{v.grid_size} (image_size {v.image_size} / patch_size {v.patch_size}); "
            f"use image_size {LDP_GRID * v.patch_size} or another format"
        )
    if v.select_feature != "patch":
        raise ConfigError(f"llama.cpp drops the CLS token before the projector; select_feature "
                          f"{v.select_feature!r} cannot be exported to GGUF (use 'patch')")
    if v.num_layers_computed == 0:
        raise ConfigError("the vision tower runs no encoder layers (select_layer 0): llama.cpp needs at least one")
    if len(v.image_mean) != 3 or len(v.image_std) != 3:
        raise ConfigError("llama.cpp needs a 3-channel image_mean and image_std")


@lru_cache(maxsize=8)
def _tower_name_map(num_layers: int) -> TensorNameMap:
    return get_tensor_name_map(MODEL_ARCH.MMPROJ, num_layers)  # builds a table of every known name


def mmproj_tensor_name(name: str, config: MLLMConfig) -> str:
    """llama.cpp's name for a vision tower / projector parameter of our model
    (``vision_tower.encoder.layers.0.mlp.fc1.weight`` → ``v.blk.0.ffn_up.weight``)."""
    tower_map = _tower_name_map(config.vision.num_layers_computed)
    stem, _, suffix = name.rpartition(".")
    if name.startswith(TOWER):
        # our tower keeps Hugging Face CLIPVisionModel's names, which gguf-py maps under this prefix
        hf = "vision_tower.vision_model." + name.removeprefix(TOWER)
        mapped = tower_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if mapped is None and name.endswith("class_embedding"):
            mapped = tower_map.get_name(hf)
    elif name.startswith(PROJECTOR):
        mapped = _projector_tensor_name(stem.removeprefix(PROJECTOR), config.projector.type)
        mapped = None if mapped is None else f"{mapped}.{suffix}"
    else:
        mapped = None
    if mapped is None:
        raise ConfigError(f"parameter {name!r} has no llama.cpp mmproj tensor name")
    if config.vision.intermediate_size == config.vision.hidden_size:
        # clip.cpp swaps ffn_up/ffn_down back for files from the legacy converter (which named fc1
        # "ffn_down"), detected as "ffn_down has n_embd input columns" — always true for a square FFN,
        # so there it must be given the legacy naming to end up the right way round.
        for ours, legacy in ((".ffn_up.", ".ffn_down."), (".ffn_down.", ".ffn_up.")):
            if ours in mapped:
                return mapped.replace(ours, legacy)
    return mapped


# Our projector module paths (MobileVLM / LLaVA's own names) → gguf-py's projector tensor names.
_PROJECTOR_PATTERNS = {
    "mlp2x_gelu": {"{}": MODEL_TENSOR.V_MMPROJ},  # LLaVA's Sequential: 0 = Linear, 2 = Linear
    "ldpv2": {"mlp.mlp.{}": MODEL_TENSOR.V_MMPROJ_MLP, "peg.peg.{}": MODEL_TENSOR.V_MMPROJ_PEG},
    "ldp": {"model.mlp.{}": MODEL_TENSOR.V_MMPROJ_MLP},
}


def _projector_tensor_name(module: str, kind: str) -> str | None:
    index = module.rpartition(".")[2]
    for pattern, tensor in _PROJECTOR_PATTERNS[kind].items():
        if pattern.format(index) == module and index.isdigit():
            return TENSOR_NAMES[tensor].format(bid=index)
    if kind == "ldp" and module.startswith("model.mb_block."):
        # clip.cpp reads MobileVLM v1's inverted-residual blocks under their own names
        # (mm.model.mb_block.1.block.0.0, ...); gguf-py has no constants for them.
        return "mm." + module
    return None


def _layout(gguf_name: str, data: np.ndarray) -> np.ndarray:
    """Shapes as clip.cpp's graphs use them: 1×1 convolutions (LDP's squeeze-excite and pointwise
    convs) are matrices, depthwise 3×3 kernels are ``(C, 3, 3)`` (the legacy converter's squeeze)."""
    if data.ndim == 4 and gguf_name != "v.patch_embd.weight":
        if data.shape[2:] == (1, 1):
            return data.reshape(data.shape[:2])
        if data.shape[1] == 1:
            return data.reshape(data.shape[0], *data.shape[2:])
    return data


# Added or looked up, never multiplied: kept F32 whatever the type asked (as are norms and biases).
_F32_ONLY = ("v.class_embd", "v.position_embd.weight")


def _encode(
    gguf_name: str, data: np.ndarray, qtype: GGMLQuantizationType, codes: QuantizedTensor | None
) -> tuple[np.ndarray, GGMLQuantizationType]:
    """One tensor's data and GGML type. ``codes``: our quantization of it, if any (``data`` is then the
    model's dequantized weight)."""
    f32, f16 = GGMLQuantizationType.F32, GGMLQuantizationType.F16
    if data.ndim == 1 or gguf_name in _F32_ONLY:
        return data, f32
    if data.ndim == 3:
        # Depthwise 3×3 kernels (LDP, PEG): ggml_conv_2d_dw builds an F16 im2col, and ggml's CPU matmul
        # pairs that only with an F16 kernel (an F32 one aborts the graph), so F16 whatever was asked.
        return quantize(data, f16), f16
    if codes is None:
        if qtype == GGMLQuantizationType.Q8_0 and (data.ndim != 2 or data.shape[-1] % 32):
            qtype = f16  # Q8_0 holds rows of 32; clip.cpp's patch convolution takes F16 / F32 kernels only
        return quantize(data, qtype), qtype
    if data.ndim == 2 and codes.codes.shape == data.shape:
        try:
            return pack_blocks(codes)  # our codes, bit for bit (8-bit, groups of 32 → Q8_0)
        except QuantError:  # e.g. per-channel codes: no GGML block type holds them
            pass
    return data, f32  # the dequantized weight, exactly (patch embedding, per-channel codes)


def write_mmproj_gguf(
    loaded: LoadedModel,
    path: Path,
    *,
    float_type: str = "f16",
    quantized: Mapping[str, QuantizedTensor] | None = None,
    name: str = "edge-mllm",
    progress: bool = False,
) -> Path:
    """Write ``loaded``'s vision tower and projector as a llama.cpp mmproj GGUF.

    Args:
        loaded: a model with a vision tower (see :func:`check_mmproj` for what llama.cpp can run).
        path: output file, written atomically.
        float_type: "f16", "f32" or "q8_0" (int8 blocks of 32, llama.cpp's usual int8 mmproj) for the
            matrices (norms, biases and embeddings stay F32; the patch convolution is F16 under q8_0).
        quantized: our codes by parameter name (``QuantizedWeights.tensors``). Matrices whose codes fit
            a GGML block type (8-bit symmetric, groups of 32 → Q8_0) are written as those blocks; the
            rest (convolutions, per-channel codes) as F32 of the model's dequantized weights, which is
            exact. ``float_type`` then applies only to tensors that were not quantized.
        name: ``general.name``.
        progress: show a progress bar while the tensors are written.

    Returns:
        ``path``. The same inputs always give a byte-identical file.
    """
    config = loaded.model.config
    if not config.has_vision:
        raise ConfigError("the model has no vision encoder: there is no mmproj to write")
    check_mmproj(config)
    if float_type not in MMPROJ_FLOAT_TYPES:
        raise QuantError(f"unsupported mmproj float_type {float_type!r}; choose one of {', '.join(MMPROJ_FLOAT_TYPES)}")
    qtype, file_type = MMPROJ_FLOAT_TYPES[float_type]
    codes = {k: v for k, v in (quantized or {}).items() if not k.startswith("language_model.")}
    v, model = config.vision, loaded.model

    path = Path(path)
    with _temp_sibling(path) as tmp:
        writer = GGUFWriter(tmp, "clip")
        writer.add_type(GGUFType.MMPROJ)
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(PROJECTOR_TYPES[config.projector.type])
        writer.add_vision_projection_dim(config.text.hidden_size)
        writer.add_vision_image_size(v.image_size)
        writer.add_vision_patch_size(v.patch_size)
        writer.add_vision_embedding_length(v.hidden_size)
        writer.add_vision_feed_forward_length(v.intermediate_size)
        writer.add_vision_block_count(v.num_layers_computed)
        writer.add_vision_head_count(v.num_attention_heads)
        writer.add_vision_attention_layernorm_eps(v.layer_norm_eps)
        writer.add_vision_image_mean([float(x) for x in v.image_mean])  # Python floats → FLOAT32 array
        writer.add_vision_image_std([float(x) for x in v.image_std])
        # No flag = quick-GELU (OpenAI CLIP); use_gelu = ggml_gelu (tanh approximation)
        writer.add_vision_use_gelu(v.hidden_act != "quick_gelu")
        writer.add_array(FEATURE_LAYER_KEY, [int(v.num_layers_computed)])  # Python int → INT32 array

        for module_name, module in (("vision_tower", model.vision_tower), ("mm_projector", model.mm_projector)):
            for param_name, param in module.named_parameters(prefix=module_name):
                gguf_name = mmproj_tensor_name(param_name, config)
                data = _layout(gguf_name, param.detach().float().cpu().numpy())
                data, tensor_type = _encode(gguf_name, data, qtype, codes.get(param_name))
                writer.add_tensor(gguf_name, np.ascontiguousarray(data), raw_dtype=tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    return path


def llamacpp_image_embeddings(
    model_path: Path, mmproj_path: Path, image: np.ndarray | torch.Tensor, *, n_threads: int = 2
) -> np.ndarray:
    """Image embeddings ``[num_image_tokens, n_embd]`` as libmtmd (llama.cpp) computes them.

    ``image``: uint8 RGB ``[H, W, 3]``. libmtmd applies its own preprocessing (resize/pad to
    ``image_size``, then ``(x / 255 − mean) / std``); a square image of exactly ``image_size`` is not
    resized, so its pixels are what our ``ImageProcessor`` produces too. ``model_path`` is the
    language model the mmproj belongs to (libmtmd checks the embedding widths match).
    """
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {list(pixels.shape)}")
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=256, n_threads=n_threads, verbose=False)
    ctx = bitmap = chunks = None
    try:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = False
        ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)
        if not ctx:
            raise RuntimeError(f"libmtmd could not load {mmproj_path}")
        height, width = pixels.shape[:2]
        buffer = (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(width, height, buffer)
        text = mtmd.mtmd_input_text()
        marker = mtmd.mtmd_default_marker()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        chunks = mtmd.mtmd_input_chunks_init()
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise RuntimeError("libmtmd could not tokenize the image")
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                continue
            if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                raise RuntimeError("libmtmd failed to encode the image")
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            n_embd = llama_cpp.llama_model_n_embd(llm.model)
            out = mtmd.mtmd_get_output_embd(ctx)
            return np.ctypeslib.as_array(out, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()
        raise RuntimeError("libmtmd produced no image chunk")
    finally:
        if chunks:
            mtmd.mtmd_input_chunks_free(chunks)
        if bitmap:
            mtmd.mtmd_bitmap_free(bitmap)
        if ctx:
            mtmd.mtmd_free(ctx)
        llm.close()
