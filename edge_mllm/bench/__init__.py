"""``edge-mllm bench``: bundles (and models) side by side on this host, in one run.

- :mod:`.subjects`: what is benchmarked (bundle or model folder), its format, runtime and artifact size;
- :mod:`.measure`: the timed runs (warm-up, then repeats alternating between subjects, medians);
- :mod:`.rss`: peak resident memory, measured per subject in a fresh Python process;
- :mod:`.roofline`: the host's memory-bandwidth roofline for decode;
- :mod:`.schema`: the result record (shared with ``benchmarks/phone/``) and the llama.cpp anchor ratios;
- :mod:`.report`: markdown table and PNG plot;
- :mod:`.suite`: the whole run (:func:`run_bench`).
"""

from edge_mllm.bench.suite import BenchSettings, run_bench

__all__ = ["BenchSettings", "run_bench"]
