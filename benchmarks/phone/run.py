"""Benchmark bundles on a real phone over adb, into the same JSON as ``edge-mllm bench``.

    python benchmarks/phone/run.py BUNDLE... [--serial SERIAL] [--device snapdragon-8-gen-3] [--threads 4]
        [--tokens 32] [--prompt-tokens 64] [--repeats 3] [--image scene.png] [--bin-dir /data/local/tmp/edge-mllm/bin]
        [--et-runner llava_main] [--json OUT] [--markdown OUT]

Before it: build the phone-side tools for arm64-v8a and push them to ``--bin-dir`` (with their ``.so``
files; the runner sets ``LD_LIBRARY_PATH`` to that folder): llama.cpp's ``llama-bench`` and
``llama-mtmd-cli`` (``cmake -DCMAKE_TOOLCHAIN_FILE=$ANDROID_NDK/build/cmake/android.toolchain.cmake
-DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-28 -DGGML_OPENMP=OFF``), and ExecuTorch's multimodal
runner (``examples/models/llava`` → ``llava_main``; any runner that prints ExecuTorch's stats report
works, chosen by ``--et-runner``).

Per bundle (pushed to ``/data/local/tmp/edge-mllm/<name>``):

- GGUF: ``llama-bench -o json`` gives prefill (``pp``) and decode (``tg``) tok/s at the chosen threads;
  ``llama-mtmd-cli`` on the image, ``--repeats`` times, gives vision-encode ms and TTFT (medians).
- ExecuTorch: the runner, ``--repeats`` times after its own warm-up, gives TTFT, prefill and decode tok/s
  and peak RSS (its ``RSS after …`` lines); it folds image encoding into prefill (no separate time).

Ratios to llama.cpp and, with ``--device``, the device's bandwidth roofline are computed as
``edge-mllm bench`` does (``edge_mllm.bench.schema``). Nothing here runs without a phone: the parsers
(``parsers.py``) are tested on recorded output of these tools (tests/test_phone_parsers.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parsers import (  # noqa: E402  (this folder is not a package)
    llama_bench_rates,
    median_of,
    parse_executorch,
    parse_llama_bench_json,
    parse_mtmd_cli,
)

from edge_mllm.bench.schema import SCHEMA, add_ratios, new_row  # noqa: E402
from edge_mllm.bench.subjects import Subject, resolve  # noqa: E402

REMOTE_ROOT = "/data/local/tmp/edge-mllm"
PROMPT = "Describe the picture in detail."  # what edge-mllm bench asks (edge_mllm.bench.measure.PROMPT)


class AdbError(RuntimeError):
    """adb failed (no device, a command's non-zero exit)."""


class Adb:
    """The few adb calls the runner needs; ``serial`` picks one of several phones."""

    def __init__(self, serial: str | None = None, adb: str = "adb", timeout_s: int = 1800):
        self.base = [adb] + (["-s", serial] if serial else [])
        self.timeout_s = timeout_s

    def _run(self, args: list[str]) -> str:
        proc = subprocess.run(self.base + args, capture_output=True, text=True, timeout=self.timeout_s)
        if proc.returncode != 0:
            raise AdbError(f"adb {' '.join(args[:2])}… failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        return proc.stdout + proc.stderr  # the tools log timings on stderr

    def shell(self, command: str) -> str:
        return self._run(["shell", command])

    def push(self, local: Path, remote: str) -> None:
        self._run(["push", str(local), remote])

    def getprop(self, name: str) -> str:
        return self.shell(f"getprop {name}").strip()


@dataclass
class Settings:
    threads: int = 4
    tokens: int = 32
    prompt_tokens: int = 64
    repeats: int = 3
    bin_dir: str = f"{REMOTE_ROOT}/bin"
    et_runner: str = "llava_main"


def _env(settings: Settings) -> str:
    return f"LD_LIBRARY_PATH={shlex.quote(settings.bin_dir)}"


def push_bundle(adb: Adb, subject: Subject, image: Path) -> str:
    """Every file the manifest lists (and the image) → the phone; the remote folder."""
    remote = f"{REMOTE_ROOT}/{subject.name}"
    dirs = {str(Path(f["path"]).parent) for f in subject.manifest["files"]} - {"."}
    adb.shell(f"mkdir -p {shlex.quote(remote)}" + "".join(f" {shlex.quote(remote + '/' + d)}" for d in sorted(dirs)))
    for f in subject.manifest["files"]:
        adb.push(subject.path / f["path"], f"{remote}/{f['path']}")
    adb.push(image, f"{remote}/image{image.suffix}")
    return remote


def bench_gguf(adb: Adb, subject: Subject, remote: str, image_name: str, s: Settings) -> dict:
    """llama-bench for prefill / decode rates, llama-mtmd-cli for vision encode and TTFT."""
    info = subject.manifest.get("gguf") or {}
    model, mmproj = info.get("model_file", "model.gguf"), info.get("mmproj_file", "mmproj.gguf")
    q = shlex.quote
    out = adb.shell(f"cd {q(remote)} && {_env(s)} {q(s.bin_dir)}/llama-bench -m {q(model)} -p {s.prompt_tokens} "
                    f"-n {s.tokens} -t {s.threads} -r {s.repeats} -o json")
    rates = llama_bench_rates(parse_llama_bench_json(out), s.threads)
    runs = []
    for _ in range(s.repeats):
        out = adb.shell(f"cd {q(remote)} && {_env(s)} {q(s.bin_dir)}/llama-mtmd-cli -m {q(model)} --mmproj {q(mmproj)} "
                        f"--image {q(image_name)} -p {q(PROMPT)} -n {s.tokens} -t {s.threads} --temp 0")
        runs.append(parse_mtmd_cli(out))
    return {"vision_encode_ms": median_of(runs, "vision_encode_ms"), "ttft_ms": median_of(runs, "ttft_ms"),
            "prefill_tok_s": rates.get("prefill_tok_s"), "decode_tok_s": rates.get("decode_tok_s"),
            "prompt_tokens": runs[0]["prompt_tokens"], "generated_tokens": s.tokens, "peak_rss_mib": None,
            "rss_method": None}


def bench_executorch(adb: Adb, subject: Subject, remote: str, image_name: str, s: Settings) -> dict:
    """ExecuTorch's multimodal runner, ``repeats`` times: medians of its own stats report."""
    info = subject.manifest.get("executorch") or {}
    program = info.get("program", "model.pte")
    q = shlex.quote
    runs = []
    for _ in range(s.repeats):
        out = adb.shell(f"cd {q(remote)} && {_env(s)} {q(s.bin_dir)}/{s.et_runner} --model_path {q(program)} "
                        f"--tokenizer_path tokenizer/tokenizer.json --image_path {q(image_name)} --prompt {q(PROMPT)} "
                        f"--seq_len {s.prompt_tokens + s.tokens + subject.manifest.get('image_token_count', 0)} "
                        f"--cpu_threads {s.threads} --temperature 0")
        runs.append(parse_executorch(out))
    keys = ("ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mib")
    out = {k: median_of(runs, k) for k in keys}
    out.update(vision_encode_ms=None, prompt_tokens=runs[0]["prompt_tokens"],
               generated_tokens=runs[0]["generated_tokens"],
               rss_method="the runner's 'RSS after' lines, median of the runs' peaks" if out["peak_rss_mib"] else None)
    return out


def roofline(subject: Subject, device, measured: dict, tokens: int) -> dict:
    """Bytes per decode token and the device's bandwidth roofline (``--device``)."""
    if device is None or not measured.get("prompt_tokens"):
        return {}
    from edge_mllm.bench.roofline import decode_roofline

    roof = decode_roofline(subject, device.peak_gbs, measured["prompt_tokens"], tokens)
    return {"decode_bytes_per_token": roof["decode_bytes_per_token"],
            "roofline_decode_tok_s": roof["roofline_decode_tok_s"]}


def run_phone(adb: Adb, paths: list[str], image: Path, settings: Settings, device=None) -> dict:
    """Benchmark every bundle on the phone; the report in ``edge_mllm.bench.schema``'s layout."""
    subjects = [resolve(p) for p in paths]
    for s in subjects:
        if not s.is_bundle or s.runtime not in ("llama.cpp", "executorch"):
            raise SystemExit(f"error: {s.name}: the phone runner takes GGUF and ExecuTorch bundles, not {s.format}")
    model = adb.getprop("ro.product.model")
    results = []
    for s in subjects:
        remote = push_bundle(adb, s, image)
        bench = bench_gguf if s.runtime == "llama.cpp" else bench_executorch
        measured = bench(adb, s, remote, f"image{image.suffix}", settings)
        results.append(new_row(s.name, path=str(s.path), format=s.format, runtime=s.runtime,
                               quantization=s.quantization, threads=settings.threads, size_bytes=s.size_bytes,
                               repeats=settings.repeats, source=f"phone: {model}", **measured,
                               **roofline(s, device, measured, settings.tokens)))
    add_ratios(results)
    return {
        "schema": SCHEMA,
        "machine": {"name": "phone", "model": model, "soc": adb.getprop("ro.soc.model") or None,
                    "device_profile": device.key if device else None,
                    "bandwidth_gbs": device.peak_gbs if device else None,
                    "bandwidth_source": "device profile peak (edge_mllm/sim/devices.json)" if device else None},
        "settings": {"threads": settings.threads, "repeats": settings.repeats, "tokens": settings.tokens,
                     "prompt_tokens": settings.prompt_tokens, "prompt": PROMPT, "image": str(image)},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--serial", help="adb serial of the phone (several connected)")
    parser.add_argument("--device", help="device profile for the roofline (`edge-mllm devices`)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="llama-bench's prompt length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image", type=Path, help="image file (default: the synthetic scene edge-mllm bench uses)")
    parser.add_argument("--bin-dir", default=f"{REMOTE_ROOT}/bin")
    parser.add_argument("--et-runner", default="llava_main")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here")
    args = parser.parse_args(argv)

    from edge_mllm.bench.report import markdown_table

    device = None
    if args.device:
        from edge_mllm.sim.profiles import get_device

        device = get_device(args.device)
    image = args.image
    if image is None:
        from edge_mllm.bench.measure import bench_image

        image = Path("/tmp/edge-mllm-bench-scene.png")
        bench_image().save(image)
    settings = Settings(threads=args.threads, tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                        repeats=args.repeats, bin_dir=args.bin_dir, et_runner=args.et_runner)
    report = run_phone(Adb(args.serial), args.bundles, image, settings, device)
    table = markdown_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
