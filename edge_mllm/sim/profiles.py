"""Device profiles: CPU clusters, ISA features, memory, RAM budget and accelerator peaks.

Phones and the Jetson come from ``devices.json`` (every number with its source next to it); ``host``
is this machine, measured when first asked for (:mod:`edge_mllm.sim.host`).

Peak CPU throughput is derived, not quoted: cores x clock x 128-bit SIMD pipes x operations per pipe
and cycle for the precision (8 fp32 FLOPs from a 4-lane FMA, 16 fp16 FLOPs, 32 int8 ops from SDOT's
16 multiply-accumulates, 64 from I8MM's SMMLA, which does 32 per instruction at SDOT's issue rate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from edge_mllm.errors import ConfigError

HOST = "host"
# Operations per 128-bit SIMD pipe and cycle.
FP32_PER_PIPE = 8
FP16_PER_PIPE = 16
INT8_PER_PIPE = {"i8mm": 64, "dotprod": 32, "none": 16}  # without SDOT: widening multiply-adds


@dataclass(frozen=True)
class ISA:
    dotprod: bool
    i8mm: bool
    sve: bool
    fp16: bool = True  # native fp16 arithmetic (every ARMv8.2 phone core); x86 without AVX512-FP16 converts

    @property
    def int8_path(self) -> str:
        return "i8mm" if self.i8mm else "dotprod" if self.dotprod else "none"


@dataclass(frozen=True)
class Cluster:
    """Identical cores at one clock. ``measured_gops``: per-core rates measured on a host whose clock
    cannot be read, which replace the pipe arithmetic."""

    core: str
    count: int
    ghz: float
    simd_pipes: float
    efficiency: bool = False
    measured_gops: dict[str, float] | None = None

    def core_gops(self, precision: str, isa: ISA) -> float:
        """Peak giga-operations per second of one core at ``precision``."""
        if self.measured_gops is not None:
            return self.measured_gops[precision]
        fp16 = FP16_PER_PIPE if isa.fp16 else FP32_PER_PIPE
        per_pipe = {"fp32": FP32_PER_PIPE, "fp16": fp16, "int8": INT8_PER_PIPE[isa.int8_path]}[precision]
        return per_pipe * self.simd_pipes * self.ghz


@dataclass(frozen=True)
class Accelerator:
    """A GPU or NPU: dense peak throughput per precision (TOPS / TFLOPS) where one is published."""

    name: str
    peaks_tops: dict[str, float] = field(default_factory=dict)
    cuda: bool = False
    estimated: frozenset[str] = frozenset()  # precisions whose peak is an estimate, not a published number


@dataclass(frozen=True)
class DeviceProfile:
    key: str
    name: str
    vendor: str
    reference_device: str
    clusters: tuple[Cluster, ...]
    isa: ISA
    memory_type: str
    peak_gbs: float
    ram_gb: float
    app_budget_gb: float
    gpu: Accelerator | None
    npu: Accelerator | None
    data: dict[str, Any]  # the profile as stored (sources included), for `edge-mllm devices --json`
    cpu_arch: str = "arm64"  # every phone and the Jetson in devices.json; the host says its own

    @property
    def cores(self) -> int:
        return sum(c.count for c in self.clusters)

    @property
    def big_cores(self) -> int:
        """Cores outside the efficiency cluster: the thread count LLM runtimes are told to use."""
        return sum(c.count for c in self.clusters if not c.efficiency) or self.cores

    def cpu_gops(self, precision: str, threads: int) -> float:
        """Peak of the ``threads`` fastest cores (runtimes pin their threads to the big cores first)."""
        if not 1 <= threads <= self.cores:
            raise ConfigError(f"{self.key} has {self.cores} CPU cores; --threads must be 1..{self.cores}")
        per_core = sorted((c.core_gops(precision, self.isa) for c in self.clusters for _ in range(c.count)),
                          reverse=True)
        return sum(per_core[:threads])


def _value(entry: dict[str, Any]) -> Any:
    return entry["value"]


def _accelerator(data: dict[str, Any] | None) -> Accelerator | None:
    if not data:
        return None
    keys = {"fp32": "fp32_tflops", "fp16": "fp16_tflops", "int8": "int8_tops"}
    peaks = {precision: float(_value(data[key])) for precision, key in keys.items() if key in data}
    estimated = frozenset(precision for precision, key in keys.items() if data.get(key, {}).get("estimate"))
    return Accelerator(name=data["name"], peaks_tops=peaks, cuda=bool(data.get("cuda", False)), estimated=estimated)


def profile_from_data(key: str, data: dict[str, Any], core_types: dict[str, Any]) -> DeviceProfile:
    """One ``devices.json`` entry → a profile."""
    clusters = []
    for c in data["cpu"]:
        if c["core"] not in core_types:
            raise ConfigError(f"device {key}: unknown core type {c['core']!r}")
        clusters.append(Cluster(core=c["core"], count=int(_value(c["count"])), ghz=float(_value(c["max_ghz"])),
                                simd_pipes=float(_value(core_types[c["core"]]["simd_pipes_128b"])),
                                efficiency=bool(c.get("efficiency", False))))
    isa = data["isa"]
    return DeviceProfile(
        key=key, name=data["name"], vendor=data["vendor"], reference_device=data["reference_device"],
        clusters=tuple(clusters), isa=ISA(*(bool(_value(isa[k])) for k in ("dotprod", "i8mm", "sve"))),
        memory_type=data["memory"]["type"], peak_gbs=float(_value(data["memory"]["peak_gbs"])),
        ram_gb=float(_value(data["ram_gb"])), app_budget_gb=float(_value(data["app_budget_gb"])),
        gpu=_accelerator(data.get("gpu")), npu=_accelerator(data.get("npu")), data=data,
    )


@lru_cache(maxsize=1)
def load_data() -> dict[str, Any]:
    """``devices.json`` as stored (sources, core types, devices)."""
    return json.loads(resources.files("edge_mllm.sim").joinpath("devices.json").read_text())


def device_names() -> list[str]:
    """Every profile name, ``host`` last."""
    return [*load_data()["devices"], HOST]


def get_device(name: str) -> DeviceProfile:
    """The profile called ``name`` (``host`` is measured on first use, then cached)."""
    key = name.strip().lower()
    if key == HOST:
        from edge_mllm.sim.host import host_profile

        return host_profile()
    data = load_data()
    if key not in data["devices"]:
        raise ConfigError(f"unknown device {name!r}; choose from {', '.join(device_names())}")
    return profile_from_data(key, data["devices"][key], data["core_types"])
