"""The benchmark as a markdown table and a PNG plot (matplotlib, imported only for the plot)."""

from __future__ import annotations

from pathlib import Path

from edge_mllm.errors import EdgeMLLMError

COLUMNS = (  # header, key, format
    ("bundle", "name", "{}"),
    ("format", "format", "{}"),
    ("quant", "quantization", "{}"),
    ("size MB", "size_bytes", "{:.1f}"),
    ("vision ms", "vision_encode_ms", "{:.1f}"),
    ("TTFT ms", "ttft_ms", "{:.1f}"),
    ("prefill tok/s", "prefill_tok_s", "{:.1f}"),
    ("decode tok/s", "decode_tok_s", "{:.1f}"),
    ("decode vs llama.cpp", "decode_vs_llamacpp", "{:.2f}x"),
    ("prefill vs llama.cpp", "prefill_vs_llamacpp", "{:.2f}x"),
    ("% of roofline", "decode_pct_of_roofline", "{:.0f}%"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("bundle RSS MiB", "bundle_rss_mib", "{:.0f}"),
    ("accuracy", "accuracy", "{}"),
)
RIGHT = {"size_bytes", "vision_encode_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "decode_vs_llamacpp",
         "prefill_vs_llamacpp", "decode_pct_of_roofline", "peak_rss_mib", "bundle_rss_mib", "accuracy"}


def _cell(key: str, fmt: str, value) -> str:
    if value is None:
        return "–"
    if key == "size_bytes":
        value = value / 1e6
    if key == "accuracy":
        return f"{100 * value['score']:.1f}% {value['metric']}"
    return fmt.format(value)


def markdown_table(report: dict) -> str:
    """One row per subject; '–' where a column was not measured."""
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "| " + " | ".join("---:" if k in RIGHT else "---" for _, k, _ in COLUMNS) + " |"]
    for row in report["results"]:
        lines.append("| " + " | ".join(_cell(k, f, row.get(k)) for _, k, f in COLUMNS) + " |")
    machine, settings = report.get("machine", {}), report.get("settings", {})
    note = [f"{settings.get('threads')} threads" if settings.get("threads") else None,
            f"median of {settings['repeats']} runs" if settings.get("repeats") else None,
            f"{settings['tokens']} decoded tokens" if settings.get("tokens") else None,
            f"roofline: {machine['bandwidth_gbs']:.1f} GB/s measured" if machine.get("bandwidth_gbs") else None]
    note = [n for n in note if n]
    if note:
        lines += ["", "; ".join(note) + "."]
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> Path:
    """Decode tok/s (with the roofline as a marker) and TTFT per subject, side by side, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write files only
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeMLLMError("--plot needs matplotlib: pip install matplotlib (or edge-mllm[test])") from None
    rows = report["results"]
    names = [r["name"] for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.5))
    ax1.bar(x, [r["decode_tok_s"] or 0 for r in rows], color="tab:blue", label="measured")
    roof = [(i, r["roofline_decode_tok_s"]) for i, r in enumerate(rows) if r["roofline_decode_tok_s"]]
    if roof:
        ax1.scatter([i for i, _ in roof], [v for _, v in roof], marker="_", s=600, color="tab:red",
                    label="bandwidth roofline")
    ax1.set_ylabel("decode tok/s")
    ax1.set_title("decode speed")
    ax1.legend()
    ax2.bar(x, [r["ttft_ms"] or 0 for r in rows], color="tab:orange", label="TTFT")
    ax2.bar(x, [r["vision_encode_ms"] or 0 for r in rows], color="tab:green", label="of which vision encode")
    ax2.set_ylabel("ms")
    ax2.set_title("time to first token")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(list(x), names, rotation=30, ha="right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
