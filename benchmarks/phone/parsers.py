"""Parsers for what the phone-side tools print, into the numbers ``edge-mllm bench`` reports.

- ``llama-bench`` (llama.cpp): its markdown table (``-o md``, the default) or JSON (``-o json``):
  ``pp N`` rows are prompt processing (prefill) tok/s, ``tg N`` rows text generation (decode) tok/s.
- ``llama-mtmd-cli`` (llama.cpp): the image encode line(s) — ``image slice encoded in N ms`` today,
  ``encode_image_with_clip: image encoded in N ms`` in older builds — and the context timings
  (``llama_perf_context_print``, formerly ``llama_print_timings``): load, prompt eval, eval.
- ExecuTorch's runners (``llama_main``, ``llava_main`` / ``MultimodalRunner``, the Android benchmark
  app's logcat): the ``PyTorchObserver {json}`` line, else the ``stats.h`` report, plus the
  ``RSS after …: N MiB`` lines.

Every parser takes the tool's whole output (log noise included) and returns plain numbers; lines it
does not know are skipped, so banners and generated text do no harm. Times in ms, rates in tok/s.
"""

from __future__ import annotations

import json
import re
import statistics

_NUM = r"([0-9]+(?:\.[0-9]+)?)"


class ParseError(ValueError):
    """The output holds none of the lines the parser reads (the tool failed, or this is not its output)."""


# --- llama-bench --------------------------------------------------------------------------------

_TEST = re.compile(r"^(pp|tg)\s*(\d+)(?:\s*@\s*d(\d+))?$")


def _bench_row(test: str, tps: float, tps_std: float | None, threads: int | None, model: str | None,
               samples: list[float] | None = None) -> dict:
    m = _TEST.match(test.strip())
    if m is None:
        return {}
    return {"kind": "prefill" if m[1] == "pp" else "decode", "tokens": int(m[2]), "depth": int(m[3] or 0),
            "tok_s": tps, "tok_s_std": tps_std, "threads": threads, "model": model, "samples": samples}


def parse_llama_bench_markdown(text: str) -> list[dict]:
    """``llama-bench -o md`` → one dict per pp/tg row: kind (prefill | decode), tokens, depth, tok_s,
    tok_s_std, threads (None when the table has no threads column), model."""
    header: list[str] | None = None
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            if "test" in cells and "t/s" in cells:
                header = cells
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the separator row
        cell = dict(zip(header, cells, strict=False))
        tps = re.match(rf"{_NUM}(?:\s*±\s*{_NUM})?", cell.get("t/s", ""))
        if tps is None:
            continue
        threads = int(cell["threads"]) if cell.get("threads", "").isdigit() else None
        row = _bench_row(cell["test"], float(tps[1]), float(tps[2]) if tps[2] else None, threads, cell.get("model"))
        if row:
            rows.append(row)
    if not rows:
        raise ParseError("no llama-bench table (| model | … | test | t/s |) in the output")
    return rows


def parse_llama_bench_json(text: str) -> list[dict]:
    """``llama-bench -o json`` (an array) or ``-o jsonl`` → the same rows as the markdown parser, with
    the per-repetition ``samples`` (tok/s)."""
    text = text.strip()
    try:
        items = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                  if line.strip().startswith("{")]
    except json.JSONDecodeError as exc:
        raise ParseError(f"llama-bench JSON does not parse: {exc}") from exc
    rows = []
    for item in items:
        n_prompt, n_gen, depth = item.get("n_prompt", 0), item.get("n_gen", 0), item.get("n_depth", 0)
        if n_prompt and n_gen:
            continue  # -pg rows mix both phases: not a prefill or a decode rate
        test = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"
        row = _bench_row(test + (f" @ d{depth}" if depth else ""), float(item["avg_ts"]), item.get("stddev_ts"),
                         item.get("n_threads"), item.get("model_type"), item.get("samples_ts"))
        if row:
            rows.append(row)
    if not rows:
        raise ParseError("no llama-bench results in the JSON")
    return rows


def llama_bench_rates(rows: list[dict], threads: int | None = None) -> dict:
    """Prefill and decode tok/s from llama-bench rows: at ``threads`` (default: the fastest thread
    count for each phase) and an empty cache (depth 0)."""
    out = {}
    for kind in ("prefill", "decode"):
        candidates = [r for r in rows if r["kind"] == kind and r["depth"] == 0
                      and (threads is None or r["threads"] in (threads, None))]
        if candidates:
            best = max(candidates, key=lambda r: r["tok_s"])
            out[f"{kind}_tok_s"] = best["tok_s"]
            out[f"{kind}_threads"] = best["threads"]
    return out


# --- llama-mtmd-cli -----------------------------------------------------------------------------

_SLICE = re.compile(rf"(?:image|slice) (?:slice )?encoded in\s+{_NUM}\s*ms")
_TIMING = re.compile(rf"llama_(?:perf_context_print|print_timings):\s*(load|prompt eval|eval|total) time\s*=\s*{_NUM}"
                     rf"\s*ms(?:\s*/\s*(\d+)\s*(tokens|runs))?")


def parse_mtmd_cli(text: str) -> dict:
    """``llama-mtmd-cli`` output → vision_encode_ms (every image slice summed), load_ms, prompt_tokens
    (images included), prompt_eval_ms, prefill_tok_s, generated runs, decode_ms, decode_tok_s and
    ttft_ms (vision encode + prompt eval: the image embeddings are decoded in the prompt eval)."""
    encode = [float(m[1]) for m in _SLICE.finditer(text)]
    timings: dict[str, tuple[float, int | None]] = {}
    for m in _TIMING.finditer(text):
        timings[m[1]] = (float(m[2]), int(m[3]) if m[3] else None)
    if "prompt eval" not in timings or "eval" not in timings:
        raise ParseError("no llama_perf_context_print / llama_print_timings prompt eval and eval lines")
    prompt_ms, prompt_tokens = timings["prompt eval"]
    eval_ms, runs = timings["eval"]
    vision = sum(encode) if encode else None
    return {
        "vision_encode_ms": vision,
        "image_slices": len(encode),
        "load_ms": timings.get("load", (None, None))[0],
        "prompt_tokens": prompt_tokens,
        "prompt_eval_ms": prompt_ms,
        "prefill_tok_s": 1000 * prompt_tokens / prompt_ms if prompt_tokens and prompt_ms else None,
        "generated_tokens": runs,
        "decode_ms": eval_ms,
        "decode_tok_s": 1000 * runs / eval_ms if runs and eval_ms else None,
        "ttft_ms": (vision or 0.0) + prompt_ms,
    }


# --- ExecuTorch runners -------------------------------------------------------------------------

_OBSERVER = re.compile(r"PyTorchObserver\s+(\{.*?\})")
_RSS = re.compile(rf"RSS after ([a-z ]+?):\s*{_NUM}\s*MiB")
_STATS = {
    "prompt_tokens": re.compile(r"Prompt Tokens:\s*(\d+)"),
    "generated_tokens": re.compile(r"Generated Tokens:\s*(\d+)"),
    "load_s": re.compile(rf"Model Load Time:\s*{_NUM}"),
    "prompt_eval_s": re.compile(rf"Prompt evaluation:\s*{_NUM}"),
    "decode_s": re.compile(rf"Generated \d+ tokens:\s*{_NUM}"),
    "ttft_s": re.compile(rf"Time to first generated token:\s*{_NUM}"),
}


def parse_executorch(text: str) -> dict:
    """An ExecuTorch LLM runner's output → prompt_tokens, generated_tokens, load_ms, ttft_ms,
    prefill_tok_s, decode_tok_s (as ExecuTorch's ``stats.h`` computes them: decode over the time after
    the prompt's evaluation) and peak_rss_mib (the largest ``RSS after …`` line; None if absent or 0,
    which the runner prints where it cannot measure). The last ``PyTorchObserver`` line wins (a
    ``--warmup`` run prints one first)."""
    observed = _OBSERVER.findall(text)
    if observed:
        s = json.loads(observed[-1])
        scale = s.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000) / 1000  # units per ms
        start, prompt_end = s["inference_start_ms"], s["prompt_eval_end_ms"]
        prompt_ms = (prompt_end - start) / scale
        decode_ms = (s["inference_end_ms"] - prompt_end) / scale
        out = {"prompt_tokens": s["prompt_tokens"], "generated_tokens": s["generated_tokens"],
               "load_ms": (s["model_load_end_ms"] - s["model_load_start_ms"]) / scale,
               "ttft_ms": (s["first_token_ms"] - start) / scale, "prompt_eval_ms": prompt_ms, "decode_ms": decode_ms}
    else:
        found = {k: rx.findall(text) for k, rx in _STATS.items()}
        if not found["prompt_eval_s"] or not found["decode_s"]:
            raise ParseError("no PyTorchObserver line and no ExecuTorch stats report in the output")
        last = {k: float(v[-1]) for k, v in found.items() if v}
        out = {"prompt_tokens": int(last.get("prompt_tokens", 0)) or None,
               "generated_tokens": int(last.get("generated_tokens", 0)) or None,
               "load_ms": 1000 * last["load_s"] if "load_s" in last else None,
               "ttft_ms": 1000 * last["ttft_s"] if "ttft_s" in last else None,
               "prompt_eval_ms": 1000 * last["prompt_eval_s"], "decode_ms": 1000 * last["decode_s"]}
    out["prefill_tok_s"] = 1000 * out["prompt_tokens"] / out["prompt_eval_ms"] \
        if out["prompt_tokens"] and out["prompt_eval_ms"] else None
    out["decode_tok_s"] = 1000 * out["generated_tokens"] / out["decode_ms"] \
        if out["generated_tokens"] and out["decode_ms"] else None
    rss = [float(m[2]) for m in _RSS.finditer(text)]
    out["peak_rss_mib"] = max(rss) if rss and max(rss) > 0 else None
    out["vision_encode_ms"] = None  # the runners fold image encoding into prefill: no separate time
    return out


def median_of(runs: list[dict], key: str) -> float | None:
    """The median of ``key`` over runs that have it."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None
