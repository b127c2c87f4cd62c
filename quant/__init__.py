"""Weight quantization, installed as ``edge_mllm.quant``."""
