"""The field's weight quantizers ("engines") run on our weights, to measure ours against them.

One small class per engine, all with the same interface (a registry, like llama.cpp's converters):
``ENGINES[name].quantize(loaded, calibration)`` returns a quantized *copy* of the model whose
``language_model`` is still our ``LlamaForCausalLM``, so ``edge_mllm.quant.quality`` evaluates every
engine the same way. Only the language model is quantized; the vision tower is left as it is.

- ``torchao-*``: torchao ``Int8DynamicActivationIntxWeightConfig`` (8da4w: int8 dynamic per-token
  activations, int4 group-wise weights, what ExecuTorch lowers to XNNPACK) on every linear (LM head
  included), and ``IntxWeightOnlyConfig`` on the embedding, as ExecuTorch's Llama export does. The
  weights stay torchao tensor subclasses, so the copy runs torchao's own quantized forward.
- ``ort-*``: onnxruntime's ``MatMulNBitsQuantizer`` weight core (``DefaultWeightOnlyQuantizer``): the
  packed MatMulNBits / GatherBlockQuantized tensors are unpacked back into float weights.
- ``nncf-*``: ``nncf.compress_weights`` on the PyTorch model (INT4 group-wise, optionally AWQ and
  scale estimation), then ``nncf.strip(..., IN_PLACE)`` for the float weights.
- ``llamacpp-*``: llama.cpp's own quantizer on a GGUF written by ``edge_mllm.export.gguf``, read back
  by our GGUF loader (gguf-py dequantization).
- ``edge-mllm-*``: our own ``quantize_model`` with a scheme, for the same table.

``nbytes`` is what the engine stores for the language model's weights (embedding and LM head
included, a tied pair once unless the engine itself unties it); tensors it leaves in float (norms)
count at 2 bytes each, except for llama.cpp, whose GGUF tensor sizes are used as they are.
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from edge_mllm.quant.groupwise import QuantizedTensor, check_group, unpack_unsigned
from edge_mllm.quant.quantize import LLM_PREFIX, quantize_model
from edge_mllm.quant.scheme import QuantScheme
from torch import nn

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.errors import QuantError
from edge_mllm.model.mllm import MultimodalLM


@dataclass
class EngineResult:
    """A quantized copy of the model (the input is not modified) and what the engine stores."""

    model: MultimodalLM
    nbytes: int  # bytes of the language model's weights as the engine stores them (embeddings included)
    note: str  # e.g. "torchao 0.18.0 8da4w g32 (hqq_scale_only), embedding int4 g32"


class Engine(Protocol):
    """A quantizer of another project, applied to a model's language model."""

    name: str
    needs_calibration: bool

    def quantize(self, loaded: LoadedModel, calibration: Sequence[torch.Tensor] | None = None) -> EngineResult:
        """Quantize a copy of ``loaded.model``'s language model; ``calibration`` is a list of inputs_embeds
        [1, T, D] (``edge_mllm.quant.calibration.calibration_set``), used by data-aware engines only."""
        ...


def _copy(model: MultimodalLM) -> MultimodalLM:
    """A deep copy in eval mode (ties kept: deepcopy shares what the original shares)."""
    return copy.deepcopy(model).eval()


def _float_bytes(llm: nn.Module, quantized: set[str]) -> int:
    """fp16 bytes of the parameters not named in ``quantized`` (tied ones once, by any of their names)."""
    done = {id(llm.get_parameter(name)) for name in quantized}
    return 2 * sum(p.numel() for p in llm.parameters() if id(p) not in done)


def _needs(engine: Engine, calibration: Sequence[torch.Tensor] | None) -> None:
    if engine.needs_calibration and not calibration:
        raise QuantError(f"engine {engine.name} needs calibration data (inputs_embeds sequences)")


# ------------------------------------------------------------------------------------------------
# torchao / ExecuTorch


@dataclass
class TorchaoEngine:
    """torchao 8daXw on every linear + IntxWeightOnly on the embedding: ExecuTorch's XNNPACK recipe
    (or, with ``dynamic_activations=False``, IntxWeightOnly on the linears too: ExecuTorch's "4w").

    A tied LM head is untied, as ExecuTorch's Llama export does: the embedding becomes a quantized
    lookup and the head an 8da4w linear, stored separately.
    """

    name: str
    group_size: int = 32
    bits: int = 4
    embedding_bits: int = 4
    embedding_group: int = 32  # 0: one group per row (ExecuTorch's "8,0")
    algorithm: str = "hqq_scale_only"  # ExecuTorch's export default (use_hqq=True); or "affine"
    dynamic_activations: bool = True  # False: weight-only ("4w"), to isolate the int8 activations' cost
    needs_calibration: bool = False

    def quantize(self, loaded: LoadedModel, calibration: Sequence[torch.Tensor] | None = None) -> EngineResult:
        import torchao
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup

        model = _copy(loaded.model)
        llm = model.language_model
        emb_granularity = PerGroup(self.embedding_group) if self.embedding_group else PerAxis(0)
        # The embedding first: quantize_ replaces the module's parameter, which unties the LM head.
        quantize_(
            llm,
            IntxWeightOnlyConfig(
                weight_dtype=getattr(torch, f"int{self.embedding_bits}"),
                granularity=emb_granularity,
                intx_choose_qparams_algorithm=self.algorithm,
            ),
            filter_fn=lambda m, _fqn: isinstance(m, nn.Embedding),
        )
        weight_dtype = getattr(torch, f"int{self.bits}")
        linear_config = (
            Int8DynamicActivationIntxWeightConfig(
                weight_dtype=weight_dtype,
                weight_granularity=PerGroup(self.group_size),
                intx_choose_qparams_algorithm=self.algorithm,
            )
            if self.dynamic_activations
            else IntxWeightOnlyConfig(
                weight_dtype=weight_dtype,
                granularity=PerGroup(self.group_size),
                intx_choose_qparams_algorithm=self.algorithm,
            )
        )
        quantize_(
            llm,
            linear_config,
            # ExecuTorch's filter: linears whose rows are whole groups
            filter_fn=lambda m, _fqn: isinstance(m, nn.Linear) and m.in_features % self.group_size == 0,
        )
        nbytes, names = 0, set()
        for name, module in llm.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torchao.quantization.IntxUnpackedToInt8Tensor):
                continue
            names.add(f"{name}.weight")
            if isinstance(module, nn.Linear):
                # XNNPACK stores blockwise scales as bf16 (ExecuTorch's node_visitor): compute with those.
                weight.scale.copy_(weight.scale.to(torch.bfloat16).float())
                nbytes += weight.qdata.numel() * self.bits // 8 + 2 * weight.scale.numel()
            else:  # ExecuTorch's embedding_{4bit,byte}: packed codes, fp32 scales
                nbytes += weight.qdata.numel() * self.embedding_bits // 8 + 4 * weight.scale.numel()
        nbytes += _float_bytes(llm, names)
        emb = f"g{self.embedding_group}" if self.embedding_group else "per-row"
        scheme = f"{'8da' if self.dynamic_activations else ''}{self.bits}w g{self.group_size}"
        note = (
            f"torchao {torchao.__version__} {scheme} ({self.algorithm}, bf16 scales as XNNPACK), "
            f"embedding int{self.embedding_bits} {emb}"
        )
        return EngineResult(model, nbytes, note)


# ------------------------------------------------------------------------------------------------
# ONNX Runtime


def matmulnbits_tensor(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, block_size: int
) -> QuantizedTensor:
    """MatMulNBits 4-bit initializers → our codes for the torch Linear weight [N, K] (``B``'s transpose).

    Layout, as ``DefaultWeightOnlyQuantizer.qbits_block_quant`` writes it: ``packed`` uint8
    [N, n_blocks, block_size / 2], each output column's K values in blocks, two per byte, low nibble
    first; ``scales`` [N, n_blocks] (N·n_blocks values, fp32 for an fp32 model); ``zero_points`` uint8
    [N, ceil(n_blocks / 2)], packed the same way, or None: 8 for every block (symmetric).
    ``W[n, k] = (code − zero_point) · scale`` of k's block.
    """
    n, n_blocks = packed.shape[:2]
    codes = unpack_unsigned(torch.from_numpy(packed).reshape(n, -1), 4, n_blocks * block_size)
    scales_t = torch.from_numpy(np.asarray(scales, dtype=np.float32).reshape(n, n_blocks))
    shape = (n, n_blocks * block_size)
    if zero_points is None:
        return QuantizedTensor(codes - 8, scales_t, None, 4, block_size, shape)
    zp = unpack_unsigned(torch.from_numpy(zero_points).reshape(n, -1), 4, n_blocks).to(torch.uint8)
    return QuantizedTensor(codes, scales_t, zp, 4, block_size, shape)


def gather_block_tensor(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, block_size: int
) -> QuantizedTensor:
    """GatherBlockQuantized 4-bit initializers (``quantize_ndarray`` along axis 1) → our codes [V, D].

    ``packed``: the [V, D] values flattened row-major, two per byte, low nibble first: signed int4
    (two's complement, no zero point) when symmetric, else uint4 with ``zero_points`` packed the same
    way over [V, n_blocks]; ``scales`` [V, n_blocks].
    """
    v, n_blocks = scales.shape
    d = n_blocks * block_size
    codes = unpack_unsigned(torch.from_numpy(packed), 4, v * d).reshape(v, d)
    scales_t = torch.from_numpy(scales.astype(np.float32))
    if zero_points is None:
        return QuantizedTensor((codes ^ 8) - 8, scales_t, None, 4, block_size, (v, d))  # sign-extend
    zp = unpack_unsigned(torch.from_numpy(zero_points), 4, v * n_blocks).reshape(v, n_blocks).to(torch.uint8)
    return QuantizedTensor(codes, scales_t, zp, 4, block_size, (v, d))


@dataclass
class OrtMatMulNBitsEngine:
    """onnxruntime's 4-bit block quantization (``MatMulNBitsQuantizer``'s DEFAULT algorithm).

    Linears (LM head included) take the MatMulNBits path (C++ ``quantize_matmul_4bits``); an untied
    embedding takes the GatherBlockQuantized path (``quantize_ndarray``), as the quantizer does for
    ``op_types_to_quantize=("MatMul", "Gather")``. A tied embedding is quantized once as the LM head's
    MatMulNBits weight and shared, as onnxruntime-genai's ``shared_embeddings`` does. Scales are stored
    in the weights' dtype (fp32 here), as the quantizer writes them for an fp32 model.
    """

    name: str
    block_size: int = 32
    symmetric: bool = True
    needs_calibration: bool = False

    def quantize(self, loaded: LoadedModel, calibration: Sequence[torch.Tensor] | None = None) -> EngineResult:
        import onnxruntime
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        quantizer = DefaultWeightOnlyQuantizer(
            DefaultWeightOnlyQuantConfig(block_size=self.block_size, is_symmetric=self.symmetric, bits=4)
        )
        model = _copy(loaded.model)
        llm = model.language_model
        nbytes, names = 0, set()
        with torch.no_grad():
            for name, module in llm.named_modules():
                if not isinstance(module, nn.Linear):
                    continue
                w = module.weight
                check_group(w.shape[1], self.block_size)  # ORT would zero-pad K to whole blocks
                # ONNX MatMul's B is [K, N]: the transpose of a torch Linear's weight.
                packed, scales, zp = quantizer.qbits_block_quant(w.detach().float().T.contiguous().numpy())
                zp = None if self.symmetric else zp
                w.copy_(matmulnbits_tensor(packed, scales, zp, self.block_size).dequantize())
                nbytes += packed.nbytes + scales.nbytes + (0 if zp is None else zp.nbytes)
                names.add(f"{name}.weight")
            emb = llm.model.embed_tokens.weight
            if not llm.config.tie_word_embeddings:
                check_group(emb.shape[1], self.block_size, "embedding")
                table = emb.detach().float().numpy()
                packed, scales, zp = quantizer.quantize_ndarray(table, 1, self.block_size, self.symmetric)
                emb.copy_(gather_block_tensor(packed, scales, zp, self.block_size).dequantize())
                nbytes += packed.nbytes + scales.nbytes + (0 if zp is None else zp.nbytes)
                names.add("model.embed_tokens.weight")
        nbytes += _float_bytes(llm, names)
        kind = "sym" if self.symmetric else "asym"
        embedding = "shared with the LM head" if llm.config.tie_word_embeddings else "GatherBlockQuantized"
        note = (
            f"onnxruntime {onnxruntime.__version__} MatMulNBits 4-bit {kind} block {self.block_size}, fp32 scales, "
            f"embedding {embedding}"
        )
        return EngineResult(model, nbytes, note)


# ------------------------------------------------------------------------------------------------
# NNCF


class _Lookup(nn.Module):
    """Our LLM's forward takes inputs_embeds, so NNCF's trace never sees an untied embedding: this
    makes the lookup the traced forward."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


def _nncf_stored_bytes(module: nn.Module) -> tuple[int, set[str]]:
    """Bytes of NNCF's compressed weights (packed codes + fp16 scales + zero points) and their names."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseWeightsDecompressor

    total, names = 0, set()
    for hook_name, hook in get_hook_storage(module).named_hooks():
        if isinstance(hook, BaseWeightsDecompressor):
            name = decode_hook_name(hook_name)[1].replace(":", ".")  # "model:layers:0:...:weight"
            total += module.get_parameter(name).nbytes + sum(b.nbytes for b in hook.buffers())
            names.add(name)
    return total, names


@dataclass
class NncfEngine:
    """``nncf.compress_weights`` (PyTorch backend) with NNCF's defaults otherwise: ratio 1.0, and unless
    ``all_layers``, the embedding and the LM head kept at the backup precision (INT8_ASYM per row)."""

    name: str
    mode: str = "int4_sym"  # nncf.CompressWeightsMode value: "int4_sym" / "int4_asym"
    group_size: int = 64
    awq: bool = False
    scale_estimation: bool = False
    all_layers: bool = False

    @property
    def needs_calibration(self) -> bool:
        return self.awq or self.scale_estimation

    def quantize(self, loaded: LoadedModel, calibration: Sequence[torch.Tensor] | None = None) -> EngineResult:
        import nncf

        _needs(self, calibration)
        model = _copy(loaded.model)
        llm = model.language_model
        llm.clear_cache()
        work = copy.deepcopy(llm)  # NNCF wraps and repacks in place; the float copy is kept for loading back
        d = llm.config.hidden_size
        # Data-free modes still need one input to trace the model.
        samples = [x.detach().float() for x in calibration] if calibration else [torch.zeros(1, 8, d)]
        compressed = nncf.compress_weights(
            work,
            mode=nncf.CompressWeightsMode(self.mode),
            ratio=1.0,
            group_size=self.group_size,
            all_layers=self.all_layers or None,
            dataset=nncf.Dataset(samples),
            subset_size=len(samples),
            awq=self.awq or None,
            scale_estimation=self.scale_estimation or None,
        )
        nbytes, names = _nncf_stored_bytes(compressed)
        nncf.strip(compressed, do_copy=False, strip_format=nncf.StripFormat.IN_PLACE)
        # AWQ also rescales norms: take every tensor from NNCF's model.
        llm.load_state_dict(compressed.state_dict())
        if not llm.config.tie_word_embeddings:
            lookup = _Lookup(copy.deepcopy(llm.model.embed_tokens))
            backup = not self.all_layers
            lookup = nncf.compress_weights(
                lookup,
                mode=nncf.CompressWeightsMode.INT8_ASYM if backup else nncf.CompressWeightsMode(self.mode),
                group_size=None if backup else self.group_size,
                all_layers=None if backup else True,
                dataset=nncf.Dataset([torch.zeros(1, 4, dtype=torch.long)]),
            )
            emb_bytes, emb_names = _nncf_stored_bytes(lookup)
            if not emb_names:
                raise QuantError("NNCF did not compress the embedding")
            nncf.strip(lookup, do_copy=False, strip_format=nncf.StripFormat.IN_PLACE)
            with torch.no_grad():
                llm.model.embed_tokens.weight.copy_(lookup.embedding.weight)
            nbytes += emb_bytes
            names.add("model.embed_tokens.weight")
        nbytes += _float_bytes(llm, names)
        extras = "".join(f", {n}" for n, on in (("AWQ", self.awq), ("scale estimation", self.scale_estimation)) if on)
        head = "all layers" if self.all_layers else "embedding/LM head INT8_ASYM (NNCF backup)"
        note = f"nncf {nncf.__version__} {self.mode} g{self.group_size}{extras}, {head}"
        return EngineResult(model, nbytes, note)


# ------------------------------------------------------------------------------------------------
# llama.cpp


@dataclass
class LlamaCppEngine:
    """llama.cpp's ``llama_model_quantize`` on an f32 GGUF of the language model, dequantized back by
    our GGUF loader. llama.cpp picks per-tensor types itself (see ``llamacpp_quantize``): a tied
    embedding is the output tensor and gets its type (q6_K, or q8_0 when rows are not 256-multiples)."""

    name: str
    ftype: str = "q4_0"
    nthread: int = 2
    needs_calibration: bool = False

    def quantize(self, loaded: LoadedModel, calibration: Sequence[torch.Tensor] | None = None) -> EngineResult:
        import llama_cpp
        from edge_mllm.export.gguf.llm import llamacpp_quantize, write_llama_gguf
        from gguf import GGUFReader

        from edge_mllm.checkpoint.gguf import load_gguf

        model = _copy(loaded.model)
        with tempfile.TemporaryDirectory(prefix="edge-mllm-llamacpp-") as tmp:
            src, dst = Path(tmp) / "f32.gguf", Path(tmp) / f"{self.ftype}.gguf"
            # Only the weights are read back; "default" is a pre-tokenizer our loader can rebuild.
            write_llama_gguf(loaded, src, float_type="f32", pre_tokenizer="default")
            llamacpp_quantize(src, dst, self.ftype, nthread=self.nthread)
            tensors = GGUFReader(str(dst)).tensors
            nbytes = sum(int(t.n_bytes) for t in tensors)
            types = Counter(t.tensor_type.name for t in tensors if len(t.shape) > 1)  # matrices only
            state = load_gguf(dst, progress=False).model.language_model.state_dict()
        model.language_model.load_state_dict(state)
        kinds = ", ".join(f"{k}×{v}" for k, v in sorted(types.items()))
        return EngineResult(
            model, nbytes, f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) {self.ftype}: {kinds}"
        )


# ------------------------------------------------------------------------------------------------
# ours


@dataclass
class EdgeMllmEngine:
    """Our own ``quantize_model`` with a scheme (``rtn-w4-g32``, ``awq-w4-g32``, …); the vision tower and
    projector it also quantizes are put back, as the other engines leave them."""

    name: str
    scheme: str = "awq-w4-g32"

    @property
    def needs_calibration(self) -> bool:
        return QuantScheme.parse(self.scheme).needs_calibration

    def quantize(self, loaded: LoadedModel, calibration: Sequence[torch.Tensor] | None = None) -> EngineResult:
        _needs(self, calibration)
        model = _copy(loaded.model)
        scheme = QuantScheme.parse(self.scheme)
        # Data-free schemes would only use calibration for their error report: skip the block passes.
        result = quantize_model(model, scheme, calibration if scheme.needs_calibration else None, progress=False)
        for part in ("vision_tower", "mm_projector"):  # engines quantize the language model only
            if getattr(model, part) is not None:
                getattr(model, part).load_state_dict(getattr(loaded.model, part).state_dict())
        llm_tensors = {n[len(LLM_PREFIX) :]: qt for n, qt in result.tensors.items() if n.startswith(LLM_PREFIX)}
        nbytes = sum(qt.nbytes() for qt in llm_tensors.values()) + _float_bytes(model.language_model, set(llm_tensors))
        return EngineResult(model, nbytes, f"edge-mllm {self.scheme}")


# ------------------------------------------------------------------------------------------------
# registry


def _registry(*engines: Engine) -> dict[str, Engine]:
    return {e.name: e for e in engines}


ENGINES: dict[str, Engine] = _registry(
    TorchaoEngine("torchao-8da4w-g32"),
    TorchaoEngine("torchao-8da4w-g32-emb8", embedding_bits=8, embedding_group=0),
    TorchaoEngine("torchao-8da4w-g64", group_size=64, embedding_group=64),
    TorchaoEngine("torchao-8da4w-g32-affine", algorithm="affine"),
    TorchaoEngine("torchao-4w-g32", dynamic_activations=False),
    OrtMatMulNBitsEngine("ort-matmulnbits-w4-g32"),
    OrtMatMulNBitsEngine("ort-matmulnbits-w4-g32-asym", symmetric=False),
    OrtMatMulNBitsEngine("ort-matmulnbits-w4-g64", block_size=64),
    NncfEngine("nncf-int4-sym-g64", group_size=64),
    NncfEngine("nncf-int4-sym-g64-awq-se", group_size=64, awq=True, scale_estimation=True),
    NncfEngine("nncf-int4-asym-g64-awq-se", mode="int4_asym", group_size=64, awq=True, scale_estimation=True),
    NncfEngine("nncf-int4-sym-g32-awq-se-all", group_size=32, awq=True, scale_estimation=True, all_layers=True),
    LlamaCppEngine("llamacpp-q4_0", "q4_0"),
    LlamaCppEngine("llamacpp-q4_1", "q4_1"),
    LlamaCppEngine("llamacpp-q8_0", "q8_0"),
    LlamaCppEngine("llamacpp-q4_k_m", "q4_k_m"),
    EdgeMllmEngine("edge-mllm-rtn-w4-g32", "rtn-w4-g32"),
    EdgeMllmEngine("edge-mllm-gptq-w4-g32", "gptq-w4-g32"),
    EdgeMllmEngine("edge-mllm-awq-w4-g32", "awq-w4-g32"),
    EdgeMllmEngine("edge-mllm-rtn-w4-g32-min", "rtn-w4-g32-min"),
    EdgeMllmEngine("edge-mllm-gptq-w4-g32-min", "gptq-w4-g32-min"),
    EdgeMllmEngine("edge-mllm-awq-w4-g32-min", "awq-w4-g32-min"),
    EdgeMllmEngine("edge-mllm-rtn-w4-g32-min-dq", "rtn-w4-g32-min-dq"),
    EdgeMllmEngine("edge-mllm-gptq-w4-g32-min-dq", "gptq-w4-g32-min-dq"),
    EdgeMllmEngine("edge-mllm-rtn-w4-g32-min-mixed", "rtn-w4-g32-min-mixed"),
)


def get_engine(name: str) -> Engine:
    """The registered engine ``name`` (see ``ENGINES``)."""
    try:
        return ENGINES[name]
    except KeyError:
        raise QuantError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}") from None
