"""The whole ``edge-mllm bench`` run: resolve every subject (bad paths fail before any work), load
each in its runtime in its own process, time them alternating, measure peak RSS per subject in a
fresh process, score accuracy if asked, and add the anchors (llama.cpp ratios, % of the host's
bandwidth roofline)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_mllm import __version__
from edge_mllm.bench import measure as timing
from edge_mllm.bench.roofline import decode_roofline
from edge_mllm.bench.rss import METHOD as RSS_METHOD
from edge_mllm.bench.rss import measure_peak_rss
from edge_mllm.bench.schema import SCHEMA, add_ratios, new_row
from edge_mllm.bench.subjects import Subject, resolve_all
from edge_mllm.bench.worker import RuntimeProcess


@dataclass
class BenchSettings:
    """What to run. ``threads`` None: every core this process may use. ``rss`` False skips the
    per-subject memory processes (each re-imports torch: seconds apiece)."""

    paths: list[str]
    threads: int | None = None
    repeats: int = 3
    tokens: int = 32
    eval_data: str | None = None
    eval_limit: int | None = None
    rss: bool = True
    progress: Callable[[str], None] | None = field(default=None, repr=False)


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def accuracy(rt, data: str, limit: int | None, predictions: bool = False) -> dict:
    """VQA accuracy (or, for a POPE-only set, mean POPE accuracy) of one runtime on an eval set; with
    ``predictions``, every answer too."""
    from edge_mllm.eval.runner import evaluate, load_eval_set, pipeline_answer

    report = evaluate(pipeline_answer(rt), load_eval_set(data, limit), progress=False)
    if not predictions:
        report.pop("predictions", None)
    if report["vqa"]:
        return {"metric": "VQA", "score": report["vqa"]["accuracy"], **report}
    pope = report["pope"]
    score = sum(m["accuracy"] for m in pope.values()) / len(pope) if pope else 0.0
    return {"metric": "POPE", "score": score, **report}


def _row(subject: Subject, threads: int, timed: dict, roof: dict, memory: dict | None, acc: dict | None) -> dict:
    return new_row(
        subject.name, path=subject.load_path, format=subject.format, runtime=subject.runtime,
        quantization=subject.quantization, threads=threads, size_bytes=subject.size_bytes,
        **{k: timed[k] for k in (*timing.METRICS, "prompt_tokens", "generated_tokens", "repeats", "samples")},
        peak_rss_mib=memory and memory["peak_rss_mib"], baseline_rss_mib=memory and memory["baseline_rss_mib"],
        bundle_rss_mib=memory and memory["bundle_rss_mib"], rss_method=memory and RSS_METHOD, accuracy=acc,
        decode_bytes_per_token=roof["decode_bytes_per_token"], roofline_decode_tok_s=roof["roofline_decode_tok_s"],
        source="host",
    )


def run_bench(settings: BenchSettings) -> dict:
    """Benchmark every subject; the report in :mod:`edge_mllm.bench.schema`'s layout."""
    from edge_mllm.sim.host import READ_BYTES, host_profile, read_bandwidth_gbs

    say = settings.progress or (lambda _msg: None)
    subjects = resolve_all(settings.paths)
    if settings.eval_data:  # a bad eval set is an error before the timing runs, not after them
        from edge_mllm.eval.runner import load_eval_set

        load_eval_set(settings.eval_data, settings.eval_limit)
    threads = settings.threads or host_cores()
    # Before any runtime process starts. The roofline's is the read bandwidth at the bench's threads; the
    # host profile's copy bandwidth is what `simulate` predicts this host with (benchmarks/sim_validation.py).
    bandwidth, host = read_bandwidth_gbs(threads), host_profile()
    workers: dict[str, RuntimeProcess] = {}
    try:
        for s in subjects:
            say(f"loading {s.name}")
            workers[s.name] = RuntimeProcess(s.load_path, threads, s.name)
        timed = timing.measure(workers, settings.repeats, settings.tokens, say)
        rows = []
        for s in subjects:
            worker = workers[s.name]
            roof = decode_roofline(s, bandwidth, timed[s.name]["prompt_tokens"], settings.tokens, worker.config)
            acc = None
            if settings.eval_data:
                say(f"eval {s.name}")
                acc = worker.call(accuracy, settings.eval_data, settings.eval_limit)
            rows.append((s, roof, acc))
    finally:
        for worker in workers.values():  # free the models before the memory processes start
            worker.close()
    results = []
    for s, roof, acc in rows:
        memory = None
        if settings.rss:
            say(f"peak RSS {s.name}")
            memory = measure_peak_rss(s.load_path, threads, settings.tokens)
        results.append(_row(s, threads, timed[s.name], roof, memory, acc))
    add_ratios(results)
    return {
        "schema": SCHEMA,
        "machine": {"name": "host", "platform": platform.platform(), "processor": platform.machine(),
                    "cores": host_cores(), "bandwidth_gbs": bandwidth,
                    "bandwidth_source": f"numpy sums over {READ_BYTES >> 20} MiB on {threads} thread(s) (read only)",
                    "host_profile_gbs": host.peak_gbs,
                    "host_profile_source": host.data["memory"]["peak_gbs"]["source"]},
        "settings": {"threads": threads, "repeats": settings.repeats, "tokens": settings.tokens,
                     "prompt": timing.PROMPT, "image": "synthetic test scene 0 (edge_mllm.data.synth)",
                     "eval": settings.eval_data, "eval_limit": settings.eval_limit,
                     "rss_method": RSS_METHOD if settings.rss else None},
        "edge_mllm_version": __version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
