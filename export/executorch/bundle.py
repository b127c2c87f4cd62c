"""The ExecuTorch export formats: ``model.pte`` (+ the shared tokenizer and manifest).

One registered format per delegation target, because the target is all that differs and ``--format``
is the only choice ``export_bundle`` passes on: ``executorch`` (XNNPACK, CPU: every phone),
``executorch-coreml``, ``executorch-vulkan``, ``executorch-qnn`` and ``executorch-mediatek``. Their
manifest section is always ``"executorch"``, with the target under ``"backend"``.

Quantization: our schemes (``rtn-w4-g32``…) use the model's own integer codes (see ``quantize``);
``8da4w`` / ``8da4w-g64`` / ``8da4w-g128`` / ``8da8w`` run torchao's quantizer; none exports fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from edge_mllm.quant.scheme import QuantScheme
from edge_mllm.quant.storage import QuantizedWeights

from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.errors import ConfigError
from edge_mllm.preprocess import NORMALIZED, RGB_UINT8

from ..bundle import Backend, register
from .quantize import NATIVE_NAMES, parse_native
from .targets import CoreMLTarget, MediaTekTarget, QnnTarget, Target, VulkanTarget, XnnpackTarget

PROGRAM_FILE = "model.pte"
# KV-cache positions exported (capped at the model's context): the cache is preallocated, so a phone
# pays for every position (SmolLM2-135M: 46 KB each). ExecuTorch's LLaVA example uses 768.
DEFAULT_MAX_SEQ_LEN = 2048


@register
class ExecuTorchBackend(Backend):
    """ExecuTorch ``.pte`` lowered to XNNPACK (CPU)."""

    name = "executorch"
    native_quant = NATIVE_NAMES
    target: ClassVar[type[Target]] = XnnpackTarget
    max_seq_len: ClassVar[int] = DEFAULT_MAX_SEQ_LEN
    # Measured here on the default model's fused vision method (XNNPACKQuantizer, dynamic per-channel
    # int8): 1.09x faster, 6.9% relative error on the image tokens, against 1.32x and 0.64% for ONNX
    # Runtime's dynamic int8: too little gained for the error, so it is not offered.
    int8_vision_unsupported = ("XNNPACK's dynamic int8 vision measured 1.09x faster at 6.9% error on the image "
                               "tokens here: not offered; use --format onnx or gguf for int8 vision")
    uint8_vision: ClassVar[bool] = True  # the fused vision method reads uint8 RGB; False keeps it unfused

    def check(self, loaded: LoadedModel, scheme: QuantScheme | None, native_quant: str | None) -> None:
        self.target().check()
        if native_quant is not None:
            parse_native(native_quant)
        text = loaded.model.config.text
        if (scheme is not None or native_quant is not None) and text.hidden_size % 2:
            raise ConfigError(f"hidden size {text.hidden_size} is odd: ExecuTorch's 4-bit embedding packs pairs")
        if loaded.model.config.has_vision and loaded.model.num_image_tokens >= self.cache_length(loaded):
            raise ConfigError(f"an image takes {loaded.model.num_image_tokens} positions, more than the "
                              f"{self.cache_length(loaded)}-position KV cache")

    def cache_length(self, loaded: LoadedModel) -> int:
        return min(self.max_seq_len, loaded.model.config.text.max_position_embeddings)

    def write(
        self,
        loaded: LoadedModel,
        out_dir: Path,
        weights: QuantizedWeights | None,
        native_quant: str | None,
        progress: bool,
    ) -> dict:
        from .program import build_program

        target = self.target()
        native = parse_native(native_quant) if native_quant else None
        fuse_vision = self.fuse_vision and self.uint8_vision
        built = build_program(loaded, weights, native, target.partitioners, self.cache_length(loaded), progress,
                              fuse_vision=fuse_vision)
        (out_dir / PROGRAM_FILE).write_bytes(built.pte)
        has_vision = loaded.model.config.has_vision
        fused = fuse_vision and has_vision
        return {
            "vision_input": RGB_UINT8 if fused else NORMALIZED,
            "vision_fused": fused if has_vision else None,
            "key": "executorch",
            "program": PROGRAM_FILE,
            "backend": target.name,
            "runtime": target.runtime,
            "max_seq_len": built.max_seq_len,  # KV-cache positions (prompt + image tokens + answer)
            "methods": built.methods,
            "delegates": built.delegates,  # backend partitions per method; the rest runs on portable kernels
            "metadata_methods": built.metadata,
            "quantization": describe_quantization(weights, native_quant, built.quantized_tensors),
            # the tokenizer folder, not tokenizer.json alone: its tokenizer_config.json names BOS/EOS
            "runner": "MultimodalRunner(model.pte, tokenizer/) or Android LlmModule; images as "
                      + ("make_image_input(uint8 RGB [3, S, S]) / prefillImages(int[]): resized, cropped and "
                         "padded as image_preprocessing says, not normalised" if fused else
                         "make_image_input(float32 [3, S, S]) preprocessed as image_preprocessing says"),
        }


def describe_quantization(weights: QuantizedWeights | None, native_quant: str | None, used: list[str]) -> dict:
    """What the program's weights are, for the manifest."""
    if native_quant:
        native = parse_native(native_quant)
        group = f"group {native.group_size}" if native.group_size else "per channel"
        return {"source": "torchao", "linears": f"{native.name}: int8 dynamic activations, {native.bits}-bit "
                f"weights ({group}, hqq scales)", "embedding": f"{native.bits}-bit {group}", "vision": "fp32"}
    if weights is None:
        return {"source": None, "linears": "fp32", "embedding": "fp32", "vision": "fp32"}
    embed = next((n for n in used if n.endswith("embed_tokens.weight")), None)
    return {
        "source": weights.scheme,
        "linears": "4-bit codes: 8da4w (int8 dynamic activations; XNNPACK rounds group scales to bf16) + "
                   "exact per-group offsets; "
                   "8-bit codes: their fp32 values (XNNPACK has no group-wise 8-bit GEMM)",
        "embedding": "fp32" if embed is None else
                     f"{weights.tensors[embed].bits}-bit codes (quantized_decomposed embedding)",
        "vision": "fp32 values of its 8-bit codes",
        "tensors": used,
    }


@register
class ExecuTorchCoreMLBackend(ExecuTorchBackend):
    """ExecuTorch ``.pte`` with Core ML delegates (Apple Neural Engine), XNNPACK for the rest."""

    name = "executorch-coreml"
    target = CoreMLTarget
    uint8_vision = False  # coremltools' ExecuTorch frontend has no uint8 inputs (KeyError: torch.uint8)


@register
class ExecuTorchVulkanBackend(ExecuTorchBackend):
    """ExecuTorch ``.pte`` with Vulkan delegates (Android GPUs), XNNPACK for the rest."""

    name = "executorch-vulkan"
    target = VulkanTarget


@register
class ExecuTorchQnnBackend(ExecuTorchBackend):
    """ExecuTorch ``.pte`` with QNN delegates (Qualcomm HTP, fp16), XNNPACK for the rest."""

    name = "executorch-qnn"
    target = QnnTarget


@register
class ExecuTorchMediaTekBackend(ExecuTorchBackend):
    """ExecuTorch ``.pte`` with MediaTek Neuron delegates, XNNPACK for the rest."""

    name = "executorch-mediatek"
    target = MediaTekTarget

