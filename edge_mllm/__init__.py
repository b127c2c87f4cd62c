"""edge-mllm: distill, quantize and export compact multimodal LLMs for phones."""

__version__ = "0.1.0"
