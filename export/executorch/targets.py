"""Delegation targets: which ExecuTorch backend each method is lowered to.

Every target keeps XNNPACK as the CPU fallback after its own partitioner, so what an NPU/GPU delegate
cannot take (ExecuTorch's ``llama::`` cache/attention ops, say) still runs delegated on the CPU.

- ``xnnpack``: CPU, in every ExecuTorch runtime.
- ``coreml``: Apple Neural Engine / GPU via ``coremltools`` (a dependency of the executorch wheel) for
  the vision encoder; lowers on Linux, runs on iOS/macOS only. The decoder stays on XNNPACK.
- ``vulkan``: Android GPUs; the partitioner is pure Python, the runtime is the ``-vulkan`` AAR.
- ``qnn``: Qualcomm HTP. Needs Qualcomm's QNN/QAIRT SDK on the host (``QNN_SDK_ROOT``).
- ``mediatek``: MediaTek APU. Needs the NeuroPilot Express SDK's ``mtk_converter`` / ``mtk_neuron``
  wheels (not on PyPI).
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from typing import ClassVar

from edge_mllm.errors import ConfigError

from .program import EMBEDDING_METHOD, VISION_METHOD


def xnnpack_partitioners(method: str, quantized: bool) -> list:
    """One XNNPACK partitioner for fp32 and dynamically quantized ops together. (ExecuTorch's LLaVA
    export first puts every quantized linear in its own delegate, to bound peak memory while a 7B
    model's weights are packed; for compact models that only multiplies delegates: 28 per layer instead
    of about 2, and half an hour of export for SmolLM2-135M.)"""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if method == EMBEDDING_METHOD:
        return []  # a lookup (quantized or not): ExecuTorch's portable/quantized kernels run it
    return [XnnpackPartitioner()]


class Target(ABC):
    """One delegation target."""

    name: ClassVar[str]
    # The runtime the .pte needs on the phone (for the manifest).
    runtime: ClassVar[str]

    def check(self) -> None:  # noqa: B027 (most targets need nothing beyond executorch)
        """Raise ConfigError naming what to install when this target cannot lower here. Fast."""

    @abstractmethod
    def partitioners(self, method: str, quantized: bool) -> list:
        """The partitioners for ``method``, in priority order."""


class XnnpackTarget(Target):
    name = "xnnpack"
    runtime = "ExecuTorch with XNNPACK (default Android AAR / iOS frameworks / pip wheel)"

    def partitioners(self, method: str, quantized: bool) -> list:
        return xnnpack_partitioners(method, quantized)


class CoreMLTarget(Target):
    name = "coreml"
    runtime = "ExecuTorch with the Core ML backend (iOS 17+ / macOS 14+), XNNPACK for the rest"

    def check(self) -> None:
        if importlib.util.find_spec("coremltools") is None:
            raise ConfigError("the Core ML target needs coremltools: pip install coremltools (executorch pins 9.0)")

    def partitioners(self, method: str, quantized: bool) -> list:
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.compiler.coreml_preprocess import MULTIMETHOD_WEIGHT_SHARING_STRATEGY
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        specs = CoreMLBackend.generate_compile_specs(
            minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT16
        )
        # our methods share no weights (and have different partition counts, which the default
        # positional sharing requires to match)
        specs.append(CoreMLBackend.generate_multimethod_weight_sharing_strategy_compile_spec(
            MULTIMETHOD_WEIGHT_SHARING_STRATEGY.DISABLED
        ))
        if method != VISION_METHOD:
            # coremltools cannot take the decoder's partitions: their inputs include the dynamic prompt
            # length (a SymInt), and the cache ops are ExecuTorch's own. (ExecuTorch's Core ML LLM path,
            # examples/apple/coreml/llama, is a separate static-shape export.) The decoder runs on XNNPACK.
            return xnnpack_partitioners(method, quantized)
        return [CoreMLPartitioner(compile_specs=specs)] + xnnpack_partitioners(method, quantized)


class VulkanTarget(Target):
    name = "vulkan"
    runtime = "ExecuTorch with the Vulkan backend (executorch-android-vulkan AAR), XNNPACK for the rest"

    def partitioners(self, method: str, quantized: bool) -> list:
        from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

        return ([] if method == EMBEDDING_METHOD else [VulkanPartitioner()]) + xnnpack_partitioners(method, quantized)


class QnnTarget(Target):
    name = "qnn"
    runtime = "ExecuTorch with the QNN backend (executorch-android-qnn AAR + QNN runtime libraries)"
    SOC = "SM8650"  # Snapdragon 8 Gen 3: HTP fp16 needs 8 Gen 1 or newer

    def check(self) -> None:
        root = os.environ.get("QNN_SDK_ROOT")
        if not root or not os.path.isdir(root):
            # Checked before importing ExecuTorch's Qualcomm backend: without QNN_SDK_ROOT it tries
            # to download the SDK from Qualcomm when a backend starts.
            raise ConfigError(
                "the QNN target needs Qualcomm's QNN (QAIRT) SDK, which is not on PyPI: install "
                "QAIRT 2.37 from https://softwarecenter.qualcomm.com (Qualcomm AI Engine Direct SDK), "
                "then export QNN_SDK_ROOT=/path/to/qairt/2.37.x and "
                "LD_LIBRARY_PATH=$QNN_SDK_ROOT/lib/x86_64-linux-clang:$LD_LIBRARY_PATH"
            )

    def partitioners(self, method: str, quantized: bool) -> list:
        from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
        from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
        from executorch.backends.qualcomm.utils.utils import (
            generate_htp_compiler_spec,
            generate_qnn_executorch_compiler_spec,
        )

        specs = generate_qnn_executorch_compiler_spec(
            soc_model=getattr(QcomChipset, self.SOC), backend_options=generate_htp_compiler_spec(use_fp16=True)
        )
        return ([] if method == EMBEDDING_METHOD else [QnnPartitioner(specs)]) + xnnpack_partitioners(method, quantized)


class MediaTekTarget(Target):
    name = "mediatek"
    runtime = "ExecuTorch with the MediaTek Neuron backend (libneuron_backend.so + vendor libraries)"
    PLATFORM = "mt6989"  # Dimensity 9300

    def check(self) -> None:
        missing = [m for m in ("mtk_converter", "mtk_neuron") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"the MediaTek target needs {' and '.join(missing)}, from MediaTek's NeuroPilot Express SDK "
                "(not on PyPI): download mtk_converter-8.13.0 and mtk_neuron-8.2.23 from the NeuroPilot "
                "portal (https://neuropilot.mediatek.com) and pip install the two wheels"
            )

    def partitioners(self, method: str, quantized: bool) -> list:
        from executorch.backends.mediatek.partitioner import NeuropilotPartitioner
        from executorch.exir.backend.compile_spec_schema import CompileSpec

        neuron = NeuropilotPartitioner([CompileSpec("platform-config", self.PLATFORM.encode())])
        return ([] if method == EMBEDDING_METHOD else [neuron]) + xnnpack_partitioners(method, quantized)


TARGETS: dict[str, type[Target]] = {t.name: t for t in (XnnpackTarget, CoreMLTarget, VulkanTarget, QnnTarget,
                                                       MediaTekTarget)}
