"""``edge-mllm simulate BUNDLE --device NAME --emulate``: run the bundle on this host the way the device
would (its big-core thread count, capped at this host's cores) and check its memory against the
device's per-app budget.

The run happens in a fresh Python process (:mod:`edge_mllm.bench.rss`). What is compared with the
budget is the bundle's own cost: the process's peak RSS minus its resident memory before the bundle
was loaded (the Python interpreter, torch and the runtime's libraries, none of which a phone app
carries). Both numbers are reported. Speeds are this host's, not the device's: the simulator's
prediction is printed next to them for that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edge_mllm.sim.profiles import DeviceProfile

TOKENS = 16  # decoded tokens in the emulated request (after the prompt and one image)


@dataclass
class Emulation:
    device: str
    threads: int
    device_threads: int  # what the device would use (its big cores)
    peak_rss_mib: float
    baseline_rss_mib: float
    bundle_rss_mib: float
    budget_mib: float
    fits: bool
    timings: dict  # this host's measured vision_encode_ms, ttft_ms, prefill_tok_s, decode_tok_s
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def emulate(bundle: str, device: DeviceProfile, threads: int | None = None, tokens: int = TOKENS) -> Emulation:
    """Run ``bundle`` with ``threads`` (default: the device's big cores), capped at this host's cores;
    measure its peak memory and compare it with ``device``'s app budget."""
    from edge_mllm.bench.rss import measure_peak_rss
    from edge_mllm.bench.suite import host_cores

    wanted = threads or device.big_cores
    used = min(wanted, host_cores())
    run = measure_peak_rss(bundle, used, tokens)
    budget = device.app_budget_gb * 1e9 / 2**20
    return Emulation(device=device.key, threads=used, device_threads=wanted, peak_rss_mib=run["peak_rss_mib"],
                     baseline_rss_mib=run["baseline_rss_mib"], bundle_rss_mib=run["bundle_rss_mib"],
                     budget_mib=budget, fits=run["bundle_rss_mib"] <= budget,
                     timings={k: run["run"][k] for k in ("vision_encode_ms", "ttft_ms", "prefill_tok_s",
                                                         "decode_tok_s")},
                     method=run["method"])


def format_emulation(e: Emulation) -> str:
    """The emulation as a few lines, after the prediction."""
    capped = f" (the device's {e.device_threads}, capped at this host's cores)" if e.threads != e.device_threads else ""
    t = e.timings
    return "\n".join([
        f"emulated on this host with {e.threads} threads{capped}:",
        f"  measured here  vision {t['vision_encode_ms']:.1f} ms, TTFT {t['ttft_ms']:.1f} ms, "
        f"prefill {t['prefill_tok_s']:.1f} tok/s, decode {t['decode_tok_s']:.1f} tok/s",
        f"  peak RSS       {e.peak_rss_mib:.0f} MiB = interpreter + libraries {e.baseline_rss_mib:.0f} + bundle "
        f"{e.bundle_rss_mib:.0f}",
        f"  app budget     {e.budget_mib:.0f} MiB ({e.device}): bundle "
        + ("fits" if e.fits else f"EXCEEDS it by {e.bundle_rss_mib - e.budget_mib:.0f} MiB"),
    ])
