"""GGUF export for llama.cpp (``llm``: the language model as an architecture-``llama`` GGUF)."""
