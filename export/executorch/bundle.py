"""The ExecuTorch export formats: ``model.pte`` (+ the shared tokenizer and manifest).

One registered format per delegation target, because the target is all that differs and ``--format``
is the only choice ``export_bundle`` passes on: ``executorch`` (XNNPACK, CPU: every phone),
``executorch-coreml``, ``executorch-vulkan``, ``executorch-qnn`` and ``executorch-mediatek``. Their
manifest section is always ``"executorch"``, with the target under ``"backend"``.

Quantization: our schemes (``rtn-w4-g32``…) use the model's own integer codes (see ``quantize``);
``8da4w`` / ``8da4w-g64`` / ``8da4w-g128`` / ``8da8w`` run torchao's quantizer; none exports fp32.
``--int8-vision`` (XNNPACK only): the vision method's linears as int8 with int8 dynamic activations.
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
from .quantize import NATIVE_NAMES, OUTLIER_CHANNELS, input_outliers, input_peaks, parse_native, two_digit_steps
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
    # --int8-vision: the vision method's linears as XNNPACK's qd8-f32-qc8w GEMMs (quantize.VISION_INT8)
    int8_vision_unsupported = None
    uint8_vision: ClassVar[bool] = True  # the fused vision method reads uint8 RGB; False keeps it unfused
    # input channels per 4-bit linear computed in fp32 rather than rounded to int8 (quantize.input_outliers)
    outlier_channels: ClassVar[int] = OUTLIER_CHANNELS
    two_digit_unsupported = None  # our 4-bit linears as two-digit CodesLinear (quantize.py)

    def check(self, loaded: LoadedModel, scheme: QuantScheme | None, native_quant: str | None) -> None:
        self.target().check()
        if native_quant is not None:
            parse_native(native_quant)
        if self.two_digit_activations and not _has_4bit_codes(loaded, scheme, native_quant):
            raise ConfigError("two-digit activations are for our 4-bit codes (e.g. --quant rtn-w4-g32): "
                              + (f"{native_quant} is torchao's own quantizer" if native_quant else
                                 "this export has no 4-bit linears"))
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
        outliers, high_steps = self.activation_plan(loaded, weights)
        built = build_program(loaded, weights, native, target.partitioners, self.cache_length(loaded), progress,
                              fuse_vision=fuse_vision, int8_vision=self.int8_vision, outliers=outliers,
                              high_steps=high_steps)
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
            "two_digit_activations": high_steps is not None,
            "quantization": describe_quantization(weights, native_quant, built.quantized_tensors, self.int8_vision,
                                                  outliers, high_steps is not None),
            # the tokenizer folder, not tokenizer.json alone: its tokenizer_config.json names BOS/EOS
            "runner": "MultimodalRunner(model.pte, tokenizer/) or Android LlmModule; images as "
                      + ("make_image_input(uint8 RGB [3, S, S]) / prefillImages(int[]): resized, cropped and "
                         "padded as image_preprocessing says, not normalised" if fused else
                         "make_image_input(float32 [3, S, S]) preprocessed as image_preprocessing says"),
        }

    def activation_plan(self, loaded: LoadedModel, weights: QuantizedWeights | None
                        ) -> tuple[dict | None, dict | None]:
        """For our 4-bit codes: each decoder linear's largest input channels on the calibration set
        (the quantization's own, or 8 text chunks + 8 synthetic scene conversations), which the program
        keeps out of int8, and with ``two_digit_activations`` the high digit's step of the rest."""
        if weights is None or not any(t.bits == 4 for t in weights.tensors.values()):
            return None, None
        if self.outlier_channels == 0 and not self.two_digit_activations:
            return None, None
        from edge_mllm.quant.calibration import calibration_set

        calibration = self.calibration
        if calibration is None:
            calibration = calibration_set(loaded, text_count=8, image_count=8)
        peaks = input_peaks(loaded.model.language_model, calibration)
        outliers = input_outliers(peaks, self.outlier_channels) if self.outlier_channels else None
        return outliers, (two_digit_steps(peaks, outliers) if self.two_digit_activations else None)


def describe_quantization(weights: QuantizedWeights | None, native_quant: str | None, used: list[str],
                          int8_vision: bool = False, outliers: dict | None = None, two_digit: bool = False) -> dict:
    """What the program's weights are, for the manifest."""
    if native_quant:
        native = parse_native(native_quant)
        group = f"group {native.group_size}" if native.group_size else "per channel"
        described = {"source": "torchao", "linears": f"{native.name}: int8 dynamic activations, {native.bits}-bit "
                     f"weights ({group}, hqq scales)", "embedding": f"{native.bits}-bit {group}", "vision": "fp32"}
    elif weights is None:
        described = {"source": None, "linears": "fp32", "embedding": "fp32", "vision": "fp32"}
    else:
        embed = next((n for n in used if n.endswith("embed_tokens.weight")), None)
        described = {
            "source": weights.scheme,
            "linears": "4-bit codes: 8da4w (int8 dynamic activations; XNNPACK rounds group scales to bf16) + "
                       "exact per-group offsets; "
                       "8-bit codes: their fp32 values (XNNPACK has no group-wise 8-bit GEMM)",
            "embedding": "fp32" if embed is None else
                         f"{weights.tensors[embed].bits}-bit codes (quantized_decomposed embedding)",
            "vision": "fp32 values of its 8-bit codes",
            "tensors": used,
        }
        if outliers:
            count = max(len(channels) for channels in outliers.values())
            described["int8_activations"] = (f"except each 4-bit linear's {count} largest input channels on "
                                             "calibration data, multiplied in fp32 by their exact weights")
        if two_digit:
            described["int8_activations"] = ("two int8 digits per input (a fixed-step high digit and the per-token "
                                             "remainder, about 12 bits)" + (f"; {described['int8_activations']}"
                                                                           if outliers else ""))
    if int8_vision:
        described["vision"] = ("linears: int8 weights per output channel (hqq scales) with int8 dynamic "
                               "activations per token (XNNPACK qd8-f32-qc8w); the rest fp32")
    return described


def _has_4bit_codes(loaded: LoadedModel, scheme: QuantScheme | None, native_quant: str | None) -> bool:
    if native_quant is not None:
        return False
    if scheme is not None:
        return scheme.bits == 4
    codes = loaded.quantization
    return codes is not None and any(t.bits == 4 for t in codes.tensors.values())


# The int8 vision method is lowered for XNNPACK's int8 GEMMs; the NPU/GPU delegates take the fp32 one.
NOT_XNNPACK_INT8 = "the int8 vision method is XNNPACK's (qd8-f32-qc8w GEMMs): use --format executorch"
NOT_XNNPACK_TWO_DIGITS = "two-digit activations are built for XNNPACK's 8da4w GEMMs: use --format executorch"


@register
class ExecuTorchCoreMLBackend(ExecuTorchBackend):
    """ExecuTorch ``.pte`` with Core ML delegates (Apple Neural Engine), XNNPACK for the rest."""

    name = "executorch-coreml"
    target = CoreMLTarget
    int8_vision_unsupported = NOT_XNNPACK_INT8
    two_digit_unsupported = NOT_XNNPACK_TWO_DIGITS
    uint8_vision = False  # coremltools' ExecuTorch frontend has no uint8 inputs (KeyError: torch.uint8)


@register
class ExecuTorchVulkanBackend(ExecuTorchBackend):
    """ExecuTorch ``.pte`` with Vulkan delegates (Android GPUs), XNNPACK for the rest."""

    name = "executorch-vulkan"
    target = VulkanTarget
    int8_vision_unsupported = NOT_XNNPACK_INT8
    two_digit_unsupported = NOT_XNNPACK_TWO_DIGITS


@register
class ExecuTorchQnnBackend(ExecuTorchBackend):
    """ExecuTorch ``.pte`` with QNN delegates (Qualcomm HTP, fp16), XNNPACK for the rest."""

    name = "executorch-qnn"
    target = QnnTarget
    int8_vision_unsupported = NOT_XNNPACK_INT8
    two_digit_unsupported = NOT_XNNPACK_TWO_DIGITS


@register
class ExecuTorchMediaTekBackend(ExecuTorchBackend):
    """ExecuTorch ``.pte`` with MediaTek Neuron delegates, XNNPACK for the rest."""

    name = "executorch-mediatek"
    target = MediaTekTarget
    int8_vision_unsupported = NOT_XNNPACK_INT8
    two_digit_unsupported = NOT_XNNPACK_TWO_DIGITS

