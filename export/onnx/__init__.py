"""ONNX export for ONNX Runtime (``nbits``: 4/8-bit weights as ``com.microsoft`` operators)."""
