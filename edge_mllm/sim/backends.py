"""Runtimes the simulator knows: where each one computes and how much of the hardware it attains.

Each backend has two efficiency factors, shared by every device: ``compute`` (fraction of peak
throughput its matmuls reach in prefill and vision encoding) and ``bandwidth`` (fraction of peak DRAM
bandwidth its decode reaches). They are calibrated against the published measurements of
``../shared/reference/published_numbers.md`` by ``benchmarks/sim_validation.py --fit``: each factor is
the one that minimises the worst relative error over that backend's rows (the geometric midpoint of
the smallest and largest per-row factor, which minimises the largest |log(predicted / published)|).
``calibration`` says which rows; a factor no published row backs is listed in ``assumed``, and every
prediction that uses it says so.

Those rows are all arm64 devices, and a CPU backend's factors describe its arm64 kernels (NEON, SDOT,
I8MM). On an x86-64 CPU the same runtime runs other kernels (AVX2 / AVX-512), which reach other
fractions of the hardware, so CPU backends carry a second set, ``x86_64``, calibrated on this
project's x86-64 host by real bundle runs against the peaks its micro-benchmarks measure
(``edge_mllm.sim.host``; ``benchmarks/sim_validation.py --host BENCH_JSON --host-fit NAME... --fit``). ``on(device)``
picks the set for the device's CPU architecture; still one set per backend and architecture, shared
by every device of it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge_mllm.errors import ConfigError
from edge_mllm.sim.formats import F16, WeightFormat
from edge_mllm.sim.profiles import Accelerator, DeviceProfile


@dataclass(frozen=True)
class Efficiency:
    """A CPU backend's factors on another CPU architecture than arm64, and where they come from."""

    compute: float
    bandwidth: float
    overhead_mib: float
    calibration: str


@dataclass(frozen=True)
class Backend:
    name: str
    unit: str  # cpu | gpu | npu
    family: str  # the bundle format it runs (formats.FAMILIES)
    compute: float
    bandwidth: float
    kv_bytes: int  # bytes per cached K or V value
    overhead_mib: float  # resident memory beyond weights, KV cache and activations
    calibration: str
    assumed: tuple[str, ...] = ()  # factors with no published measurement behind them
    vendors: tuple[str, ...] = ()  # devices it runs on (empty: any device with the unit)
    arch: str = "arm64"  # the CPU architecture the factors above describe
    x86_64: Efficiency | None = None  # CPU backends: the factors of its x86-64 kernels
    # A delegate that takes only the vision encoder: the backend its decoder methods run on (Core ML:
    # coremltools cannot take the decoder's dynamic shapes, export/executorch/targets.py).
    decoder: str | None = None
    # Accelerators: what the delegate computes float weights in (the compile spec's precision).
    float_precision: str | None = None

    def decoder_backend(self) -> Backend:
        """The backend that runs the decoder: this one, unless it delegates only the vision encoder."""
        return BACKENDS[self.decoder] if self.decoder else self

    def vision_format(self, stored: WeightFormat) -> WeightFormat:
        """The vision weights as this backend holds and computes them: float weights in the delegate's
        ``float_precision`` (Core ML converts them to fp16), integer codes as stored."""
        if self.float_precision == "fp16" and stored.compute == "fp32":
            return F16
        return stored

    def on(self, device: DeviceProfile) -> Backend:
        """This backend with the factors of ``device``'s CPU architecture (accelerator backends: as is;
        an architecture with no calibrated set keeps the arm64 factors, marked assumed)."""
        if self.unit != "cpu" or device.cpu_arch == self.arch:
            return self
        if device.cpu_arch == "x86_64" and self.x86_64 is not None:
            e = self.x86_64
            return replace(self, compute=e.compute, bandwidth=e.bandwidth, overhead_mib=e.overhead_mib,
                           calibration=e.calibration, assumed=(), arch="x86_64")
        return replace(self, arch=device.cpu_arch, assumed=_BOTH,
                       calibration=f"not calibrated on {device.cpu_arch}: the arm64 factors ({self.calibration})")

    def accelerator(self, device: DeviceProfile) -> Accelerator:
        """The GPU/NPU this backend runs on, with the reason when it cannot."""
        acc = device.gpu if self.unit == "gpu" else device.npu
        if acc is None or not acc.peaks_tops:
            raise ConfigError(f"{device.key} has no published {self.unit.upper()} throughput in its profile; "
                              f"{self.name} cannot be simulated there")
        return acc

    def check(self, device: DeviceProfile) -> None:
        """Raise unless this backend runs on ``device``."""
        if self.vendors and device.vendor not in self.vendors:
            raise ConfigError(f"{self.name} runs on {'/'.join(self.vendors)} devices, not {device.key}")
        if self.unit == "gpu" and self.name.endswith("cuda") and not (device.gpu and device.gpu.cuda):
            raise ConfigError(f"{self.name} needs an NVIDIA GPU; {device.key} has none")
        if self.unit != "cpu":
            self.accelerator(device)


_LLAMACPP_ROWS = ("MobileVLM-1.7B on Snapdragon 888 (llama.cpp docs and MobileVLM paper), "
                  "Qwen3.5-2B on Snapdragon 8 Gen 2 (llama.cpp #26957)")
_UNCALIBRATED = "not calibrated: no published measurement; factors assumed equal to {}'s"
_BOTH = ("compute", "bandwidth")
# benchmarks/sim_validation.py --host BENCH --host-fit gguf-4bit executorch-4bit onnx-4bit --fit (README)
_HOST_RUN = ("this project's 2-core x86-64 host (AMD EPYC), 2026-12-04: the default model's 4-bit bundles "
             "(gptq-w4-g32 codes) of one `edge-mllm bench` run, 2 threads; the float, Q4_0, Q4_K_M and "
             "torchao 8da4w bundles of that run held out")

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("llama.cpp", "cpu", "gguf", compute=0.058, bandwidth=0.273, kv_bytes=2, overhead_mib=150,
                calibration=f"compute and bandwidth: {_LLAMACPP_ROWS}; overhead: estimate (compute buffers)",
                x86_64=Efficiency(compute=0.177, bandwidth=0.527, overhead_mib=21, calibration=_HOST_RUN)),
        Backend("llama.cpp-cuda", "gpu", "gguf", compute=0.029, bandwidth=0.257, kv_bytes=2, overhead_mib=300,
                calibration="MobileVLM-1.7B on Jetson Orin (llama.cpp docs): one row, fitted exactly; "
                            "overhead: estimate (CUDA context)"),
        Backend("executorch-xnnpack", "cpu", "executorch", compute=0.193, bandwidth=0.526, kv_bytes=4,
                overhead_mib=700,
                calibration="Llama 3.2 1B SpinQuant and LLaVA-1.5 7B on OnePlus 12 (ExecuTorch READMEs); "
                            "overhead: RSS minus .pte size of the 1B models (~830 MiB) less their fp32 KV cache",
                x86_64=Efficiency(compute=0.414, bandwidth=0.388, overhead_mib=0, calibration=_HOST_RUN)),
        Backend("onnxruntime", "cpu", "onnx", compute=0.157, bandwidth=0.273, kv_bytes=4, overhead_mib=200,
                calibration="compute: Phi-3-mini int4 prompt processing on a Galaxy S21 (onnxruntime PR #21380, "
                            "../shared/reference/onnx_nncf.md), one row fitted exactly; bandwidth: not calibrated, "
                            "assumed equal to llama.cpp's; overhead: estimate",
                assumed=("bandwidth",),
                # bandwidth: the fit's 0.197 × 1.10, since MatMulNBits' scales are now counted as the fp32
                # they are (5.0 bits per weight, not 4.5; sim/formats.py): the same fitted decode speed
                x86_64=Efficiency(compute=0.352, bandwidth=0.217, overhead_mib=0, calibration=_HOST_RUN)),
        # the vision encoder on the Neural Engine; the decoder, its KV cache included, on XNNPACK
        Backend("executorch-coreml", "npu", "executorch", compute=0.19, bandwidth=0.53, kv_bytes=4,
                overhead_mib=700, calibration=_UNCALIBRATED.format("executorch-xnnpack"), assumed=_BOTH,
                vendors=("apple",), decoder="executorch-xnnpack", float_precision="fp16"),
        Backend("executorch-qnn", "npu", "executorch", compute=0.19, bandwidth=0.53, kv_bytes=2,
                overhead_mib=700, calibration=_UNCALIBRATED.format("executorch-xnnpack"), assumed=_BOTH,
                vendors=("qualcomm",), float_precision="fp16"),
    )
}
# What runs a bundle by default: its export format → backend.
FORMAT_BACKENDS = {"gguf": "llama.cpp", "executorch": "executorch-xnnpack", "executorch-coreml": "executorch-coreml",
                   "executorch-qnn": "executorch-qnn", "onnx": "onnxruntime"}


def get_backend(name: str) -> Backend:
    """The backend called ``name``."""
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[key]


def backend_for_format(fmt: str) -> Backend:
    """The default backend of a bundle exported as ``fmt``."""
    if fmt not in FORMAT_BACKENDS:
        raise ConfigError(f"no simulator backend for {fmt} bundles (simulated formats: {', '.join(FORMAT_BACKENDS)}); "
                          f"pass --backend with one of {', '.join(BACKENDS)}")
    return BACKENDS[FORMAT_BACKENDS[fmt]]
