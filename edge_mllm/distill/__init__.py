"""Distillation: a teacher MLLM into a compact student that keeps a subset of its LLM layers."""
