"""Evaluation: closed-set VQA accuracy and POPE metrics over any answer function."""
