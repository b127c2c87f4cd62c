"""Data: the synthetic scene generator and LLaVA-format conversation files."""
