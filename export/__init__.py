"""Export backends (ExecuTorch, GGUF, ONNX), installed as ``edge_mllm.export``."""

MANIFEST = "manifest.json"  # at every bundle's root: what a runtime reads first

# Every export format → the package whose ``bundle`` module registers it. The CLI lists formats from
# here without importing them (ExecuTorch's import alone takes seconds), and ``bundle.backend`` imports
# only the package asked for. A test keeps this equal to what the packages register.
FORMATS: dict[str, str] = {
    "executorch": "executorch",
    "executorch-coreml": "executorch",
    "executorch-vulkan": "executorch",
    "executorch-qnn": "executorch",
    "executorch-mediatek": "executorch",
    "gguf": "gguf",
    "onnx": "onnx",
}
