"""The benchmark record: one JSON layout for ``edge-mllm bench`` on this host and for
``benchmarks/phone/`` on a phone, and the ratios both compute.

    {"schema": "edge-mllm-bench/1", "machine": {...}, "settings": {...}, "results": [ROW, ...]}

Every ROW has every key of :data:`ROW_KEYS` (None where not measured): times in ms, rates in tok/s,
sizes in bytes, memory in MiB. Ratios are to the llama.cpp row on the same weights where there is one
(same quantization label), else to the first llama.cpp row; ``> 1`` is faster than llama.cpp.
"""

from __future__ import annotations

SCHEMA = "edge-mllm-bench/1"
LLAMA_CPP = "llama.cpp"

ROW_KEYS = (
    "name", "path", "format", "runtime", "quantization", "threads",
    "size_bytes",
    "vision_encode_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s",
    "prompt_tokens", "generated_tokens", "repeats", "samples",
    "peak_rss_mib", "baseline_rss_mib", "bundle_rss_mib", "rss_method",
    "accuracy",
    "anchor", "decode_vs_llamacpp", "prefill_vs_llamacpp",
    "decode_bytes_per_token", "roofline_decode_tok_s", "decode_pct_of_roofline",
    "source",
)


def new_row(name: str, **values) -> dict:
    """A result row with every key (None unless given); unknown keys are a programming error."""
    unknown = set(values) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"not benchmark row keys: {', '.join(sorted(unknown))}")
    return {key: values.get(key) for key in ROW_KEYS} | {"name": name}


def _ratio(value: float | None, anchor: float | None) -> float | None:
    return value / anchor if value and anchor else None


def pick_anchor(row: dict, rows: list[dict]) -> dict | None:
    """The llama.cpp row ``row`` is compared with: same quantization label first, else the first one."""
    llama = [r for r in rows if r["runtime"] == LLAMA_CPP]
    same = [r for r in llama if r["quantization"] == row["quantization"]]
    return (same or llama or [None])[0]


def add_ratios(rows: list[dict]) -> None:
    """Fill the llama.cpp ratios and the % of the bandwidth roofline, in place."""
    for row in rows:
        anchor = pick_anchor(row, rows)
        if anchor is not None:
            row["anchor"] = anchor["name"]
            row["decode_vs_llamacpp"] = _ratio(row["decode_tok_s"], anchor["decode_tok_s"])
            row["prefill_vs_llamacpp"] = _ratio(row["prefill_tok_s"], anchor["prefill_tok_s"])
        if row["decode_tok_s"] and row["roofline_decode_tok_s"]:
            row["decode_pct_of_roofline"] = 100 * row["decode_tok_s"] / row["roofline_decode_tok_s"]
