"""The ``host`` profile: this machine, read and measured at run time (well under a second).

- cores: the CPUs this process may run on;
- CPU peak: the same arithmetic as the phones' (cores x clock x 128-bit SIMD pipes x operations per
  pipe, :mod:`edge_mllm.sim.profiles`), so the backends' efficiency factors, fitted on phone
  datasheet peaks, mean the same thing here. Clock: ``cpuinfo_max_freq`` from sysfs, else the highest
  ``cpu MHz`` in ``/proc/cpuinfo``; FMA width from the ISA flags (AVX-512, AVX2, else 128-bit);
  two vector FMA pipes per core (an estimate: true of x86 cores since Haswell / Zen and of Arm's big
  cores, which ``/proc/cpuinfo`` does not describe). Where no clock can be read, a numpy matmul's
  attained rate stands in;
- memory bandwidth: best of a few ``numpy.copyto`` passes over 64 MiB arrays (bytes read + written):
  an attained rate, since no datasheet number exists for a machine's share of its DRAM;
- fp32 matmul GFLOP/s: best of a few 768x768 float32 products through numpy's BLAS, reported next to
  the peak (the fraction a tuned GEMM attains here);
- RAM and budget: ``MemTotal`` / ``MemAvailable`` from ``/proc/meminfo``;
- ISA: ``/proc/cpuinfo`` flags; CPU architecture: ``platform.machine()`` (it picks the backends'
  efficiency factors: :mod:`edge_mllm.sim.backends`).
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from edge_mllm.sim.profiles import FP32_PER_PIPE, ISA, Cluster, DeviceProfile

COPY_BYTES = 64 * 2**20
READ_BYTES = 256 * 2**20  # past the last-level cache of the hosts this runs on (32 MiB here)
MATMUL_N = 768
REPEATS = 5
FMA_PIPES = 2  # vector FMA pipes per core (estimate, see above)
# Without a readable clock: integer-dot kernels (AVX2 vpmaddubsw, AVX-VNNI, NEON SDOT) run about twice
# the fp32 FMA rate that the matmul attains.
INT8_OVER_FP32 = 2.0
MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")


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


def read_bandwidth_gbs(threads: int) -> float:
    """Memory read bandwidth (GB/s) on ``threads`` threads: numpy sums of ``READ_BYTES``, one slice per
    thread (numpy releases the GIL in the sum). A decode step reads its weights and writes almost
    nothing, and at several threads it draws more bandwidth than one thread's copy measures."""
    data = np.ones(READ_BYTES // 8)
    slices = np.array_split(data, max(1, threads))
    with ThreadPoolExecutor(len(slices)) as pool:
        return READ_BYTES / _best_seconds(lambda: list(pool.map(np.sum, slices))) / 1e9


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


def _clock_ghz() -> tuple[float, str] | None:
    """The cores' top clock (GHz) and where it was read; None where the system does not say."""
    try:
        return int(MAX_FREQ.read_text()) / 1e6, f"{MAX_FREQ}"
    except (OSError, ValueError):
        pass
    try:
        mhz = [float(line.split(":", 1)[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    except (OSError, ValueError):
        mhz = []
    return (max(mhz) / 1e3, "/proc/cpuinfo cpu MHz (highest)") if mhz else None


def _fma_bits(flags: set[str]) -> int:
    """Width of the widest vector FMA the ISA flags advertise (AVX without AVX2 has no FMA: its
    separate 256-bit add and multiply pipes count as one 128-bit FMA's rate; NEON / SSE: 128)."""
    return 512 if "avx512f" in flags else 256 if "avx2" in flags else 128


def cpu_arch() -> str:
    """This CPU's architecture as the simulator names it: ``arm64``, ``x86_64`` or what the OS says."""
    machine = platform.machine().lower()
    return {"aarch64": "arm64", "arm64": "arm64", "x86_64": "x86_64", "amd64": "x86_64"}.get(machine, machine)


@lru_cache(maxsize=1)
def host_profile() -> DeviceProfile:
    """Measure this machine (once per process)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    bandwidth, gflops = copy_bandwidth_gbs(), matmul_gflops()
    total, available = _meminfo_gb()
    flags = _cpu_flags()
    isa = ISA(dotprod=bool(flags & {"asimddp", "avx_vnni", "avx512_vnni"}), i8mm="i8mm" in flags, sve="sve" in flags,
              fp16=bool(flags & {"asimdhp", "avx512_fp16"}))
    measured = "measured at run time (edge_mllm/sim/host.py)"
    matmul = {"value": round(gflops / cores, 2), "source": f"{measured}: {MATMUL_N}x{MATMUL_N} float32 numpy matmul"}
    clock = _clock_ghz()
    cpu = {"core": "host", "count": {"value": cores, "source": f"{measured}: os.sched_getaffinity"}}
    if clock is not None:
        ghz, clock_source = clock
        bits = _fma_bits(flags)
        pipes = FMA_PIPES * bits // 128
        cluster = Cluster(core="host", count=cores, ghz=ghz, simd_pipes=pipes)
        cpu |= {"max_ghz": {"value": round(ghz, 3), "source": f"{measured}: {clock_source}"},
                "simd_pipes_128b": {"value": pipes, "estimate": True,
                                    "source": f"estimate: {FMA_PIPES} FMA pipes of {bits} bits (/proc/cpuinfo flags)"},
                "fp32_gflops_per_core_peak": {"value": round(cluster.core_gops("fp32", isa), 2),
                                              "source": f"derived: {FP32_PER_PIPE} FLOPs x pipes x clock"},
                "fp32_gflops_per_core_attained": matmul}
    else:
        per_core = gflops / cores
        cluster = Cluster(core="host", count=cores, ghz=0.0, simd_pipes=0.0,
                          measured_gops={"fp32": per_core, "fp16": per_core, "int8": per_core * INT8_OVER_FP32})
        cpu |= {"fp32_gflops_per_core": matmul,
                "int8_gops_per_core": {"value": round(per_core * INT8_OVER_FP32, 2), "estimate": True,
                                       "source": "estimate: twice the measured fp32 rate (host.py INT8_OVER_FP32)"}}
    data = {
        "name": "this machine (measured)",
        "vendor": "host",
        "reference_device": "the machine running edge-mllm",
        "cpu_arch": {"value": cpu_arch(), "source": f"{measured}: platform.machine()"},
        "cpu": [cpu],
        "isa": {k: {"value": getattr(isa, k), "source": f"{measured}: /proc/cpuinfo flags"}
                for k in ("dotprod", "i8mm", "sve", "fp16")},
        "memory": {"type": "host DRAM",
                   "peak_gbs": {"value": round(bandwidth, 2),
                                "source": f"{measured}: numpy.copyto over {COPY_BYTES >> 20} MiB, read + write"}},
        "ram_gb": {"value": round(total, 2), "source": f"{measured}: /proc/meminfo MemTotal"},
        "app_budget_gb": {"value": round(available, 2), "source": f"{measured}: /proc/meminfo MemAvailable"},
    }
    return DeviceProfile(
        key="host", name=data["name"], vendor="host", reference_device=data["reference_device"],
        clusters=(cluster,),
        isa=isa, memory_type="host DRAM", peak_gbs=bandwidth, ram_gb=total, app_budget_gb=available,
        gpu=None, npu=None, data=data, cpu_arch=cpu_arch(),
    )
