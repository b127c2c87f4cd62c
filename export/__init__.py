"""Export backends (ExecuTorch, GGUF, ONNX), installed as ``edge_mllm.export``."""
