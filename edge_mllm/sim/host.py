"""The ``host`` profile: this machine, measured at run time (well under a second).

- cores: the CPUs this process may run on;
- memory bandwidth: best of a few ``numpy.copyto`` passes over 64 MiB arrays (bytes read + written);
- fp32 matmul GFLOP/s: best of a few 768x768 float32 products through numpy's BLAS on every core;
- RAM and budget: ``MemTotal`` / ``MemAvailable`` from ``/proc/meminfo``;
- ISA: ``/proc/cpuinfo`` flags.

The host has no published peak: its "peaks" are these attained numbers, so efficiency factors
calibrated on phones (fractions of peak) will under-predict it somewhat.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from edge_mllm.sim.profiles import ISA, Cluster, DeviceProfile

COPY_BYTES = 64 * 2**20
MATMUL_N = 768
REPEATS = 5
# numpy has no int8 GEMM to time: integer-dot kernels (AVX2 vpmaddubsw, AVX-VNNI, NEON SDOT) run about
# twice the fp32 FMA rate; x86 without AVX512-FP16 has no fp16 arithmetic and converts to fp32.
INT8_OVER_FP32 = 2.0


def _best_seconds(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up: page faults, BLAS thread start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth_gbs() -> float:
    """Memory bandwidth (GB/s) of a large array copy: each pass reads and writes ``COPY_BYTES``."""
    src = np.ones(COPY_BYTES // 8)
    dst = np.empty_like(src)
    return 2 * COPY_BYTES / _best_seconds(lambda: np.copyto(dst, src)) / 1e9


def matmul_gflops() -> float:
    """float32 matmul throughput (GFLOP/s) on every core numpy's BLAS uses."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    b = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    return 2 * MATMUL_N**3 / _best_seconds(lambda: a @ b) / 1e9


def _meminfo_gb() -> tuple[float, float]:
    """(total, available) GB from /proc/meminfo; (total, total / 2) where there is none."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = int(fields["MemTotal"].split()[0]) * 1024 / 1e9
        available = int(fields.get("MemAvailable", fields["MemTotal"]).split()[0]) * 1024 / 1e9
        return total, available
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        return total, total / 2


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@lru_cache(maxsize=1)
def host_profile() -> DeviceProfile:
    """Measure this machine (once per process)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    bandwidth, gflops = copy_bandwidth_gbs(), matmul_gflops()
    total, available = _meminfo_gb()
    flags = _cpu_flags()
    isa = ISA(dotprod=bool(flags & {"asimddp", "avx_vnni", "avx512_vnni"}), i8mm="i8mm" in flags, sve="sve" in flags)
    per_core = gflops / cores
    gops = {"fp32": per_core, "fp16": per_core, "int8": per_core * INT8_OVER_FP32}
    measured = "measured at run time (edge_mllm/sim/host.py)"
    data = {
        "name": "this machine (measured)",
        "vendor": "host",
        "reference_device": "the machine running edge-mllm",
        "cpu": [{"core": "host", "count": {"value": cores, "source": f"{measured}: os.sched_getaffinity"},
                 "fp32_gflops_per_core": {"value": round(per_core, 2),
                                          "source": f"{measured}: {MATMUL_N}x{MATMUL_N} float32 numpy matmul"},
                 "int8_gops_per_core": {"value": round(per_core * INT8_OVER_FP32, 2), "estimate": True,
                                        "source": "estimate: twice the measured fp32 rate (host.py INT8_OVER_FP32)"}}],
        "isa": {k: {"value": getattr(isa, k), "source": f"{measured}: /proc/cpuinfo flags"}
                for k in ("dotprod", "i8mm", "sve")},
        "memory": {"type": "host DRAM",
                   "peak_gbs": {"value": round(bandwidth, 2),
                                "source": f"{measured}: numpy.copyto over {COPY_BYTES >> 20} MiB, read + write"}},
        "ram_gb": {"value": round(total, 2), "source": f"{measured}: /proc/meminfo MemTotal"},
        "app_budget_gb": {"value": round(available, 2), "source": f"{measured}: /proc/meminfo MemAvailable"},
    }
    return DeviceProfile(
        key="host", name=data["name"], vendor="host", reference_device=data["reference_device"],
        clusters=(Cluster(core="host", count=cores, ghz=0.0, simd_pipes=0.0, measured_gops=gops),),
        isa=isa, memory_type="host DRAM", peak_gbs=bandwidth, ram_gb=total, app_budget_gb=available,
        gpu=None, npu=None, data=data,
    )
