"""Peak resident memory of one subject, measured in a fresh Python process (so subjects measured
before it, and this process's own allocations, do not count).

The child imports the subject's runtime, records its resident memory (the interpreter, torch and the
runtime's libraries: the *baseline*), resets the kernel's high-water mark (Linux: ``5`` into
``/proc/self/clear_refs``, so the imports' transient peak does not hide a small bundle), loads the
subject, answers one request, and reports the high-water mark (``VmHWM``; elsewhere
``getrusage(RUSAGE_SELF).ru_maxrss``, which includes the imports' peak) and the baseline. A phone app
carries no Python interpreter or torch: ``peak - baseline`` is what the bundle itself costs.

    python -m edge_mllm.bench.rss PATH [--threads N] [--tokens N]   # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from edge_mllm.bench.worker import one_line
from edge_mllm.errors import EdgeMLLMError

METHOD = ("fresh subprocess per subject: peak RSS (VmHWM, reset after imports) while loading it and "
          "answering one request")
TIMEOUT_S = 1800
STATUS = Path("/proc/self/status")


def _status_mib(field: str) -> float | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(match[1]) / 1024 if match else None


def _current_mib() -> float:
    """Resident memory now (the high-water mark where /proc is missing)."""
    return _status_mib("VmRSS") or _peak_mib()


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
    except OSError:
        pass  # the peak then includes the imports'


def _peak_mib() -> float:
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def measure_peak_rss(path: str | None, threads: int | None = None, tokens: int = 16) -> dict:
    """Run the subject at ``path`` (None: the embedded default) in a child process → ``peak_rss_mib``,
    ``baseline_rss_mib``, ``bundle_rss_mib`` (their difference), ``threads`` and the run's ``timings``."""
    cmd = [sys.executable, "-m", "edge_mllm.bench.rss", path or "default", "--tokens", str(tokens)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=os.environ.copy())
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EdgeMLLMError(f"the memory run of {path or 'the default model'} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(path: str, threads: int | None, tokens: int) -> dict:
    import importlib

    from edge_mllm import runtime
    from edge_mllm.bench.measure import one_run
    from edge_mllm.export import FORMATS

    load_path = None if path == "default" else path
    if runtime.is_bundle(load_path):
        from edge_mllm.runtime.bundle import read_manifest

        fmt = read_manifest(load_path).get("format")
        if fmt in FORMATS:  # the runtime's libraries belong to the baseline, not to the bundle
            importlib.import_module(f"edge_mllm.export.{FORMATS[fmt]}.runtime")
    else:
        import edge_mllm.pipeline  # noqa: F401
    baseline = _current_mib()
    _reset_peak()
    rt = runtime.load(load_path, threads=threads)
    run = one_run(rt, tokens)
    peak = _peak_mib()
    return {"peak_rss_mib": peak, "baseline_rss_mib": baseline, "bundle_rss_mib": peak - baseline,
            "threads": threads, "run": run, "method": METHOD}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Peak RSS of one bundle or model (bench, simulate --emulate)")
    parser.add_argument("path")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        result = _child(args.path, args.threads, args.tokens)
    except Exception as exc:  # one line for the parent's error message
        print(one_line(exc), file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
