"""Token generation over a static KV cache: greedy by default, temperature / top-p with a seed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edge_mllm.errors import ContextLengthError
from edge_mllm.model.llama import LlamaForCausalLM


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class GeneratedTokens:
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    timings: dict[str, float | None] = field(default_factory=dict)  # decode_tokens_per_s: None for one token


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Pick the next token from logits [V]."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_context(prompt_len: int, max_new_tokens: int, context_len: int) -> None:
    if prompt_len + max_new_tokens > context_len:
        raise ContextLengthError(
            f"prompt ({prompt_len} tokens, images included) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_len + max_new_tokens} exceeds the model's context of {context_len} tokens"
        )


@torch.inference_mode()
def generate(
    lm: LlamaForCausalLM,
    inputs_embeds: torch.Tensor,
    config: GenerationConfig,
    on_token: Callable[[int], None] | None = None,
) -> GeneratedTokens:
    """Prefill ``inputs_embeds`` [1, T, D], then decode one token at a time.

    ``on_token`` is called with each generated id as soon as it exists (stop tokens excluded).
    """
    prompt_len = inputs_embeds.shape[1]
    check_context(prompt_len, config.max_new_tokens, lm.config.max_position_embeddings)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(inputs_embeds.device).manual_seed(config.seed)
    stop = set(config.stop_token_ids)
    lm.setup_cache(1, prompt_len + config.max_new_tokens)
    try:
        t0 = time.perf_counter()
        logits = lm(inputs_embeds, torch.arange(prompt_len, device=inputs_embeds.device))
        token = sample(logits[0, -1], config.temperature, config.top_p, generator)
        t_first = time.perf_counter()
        tokens, finish = [], "length"
        for pos in range(prompt_len, prompt_len + config.max_new_tokens):
            if token in stop:
                finish = "stop"
                break
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if len(tokens) == config.max_new_tokens:
                break
            step = lm.embed(torch.tensor([[token]], device=inputs_embeds.device))
            logits = lm(step, torch.tensor([pos], device=inputs_embeds.device))
            token = sample(logits[0, -1], config.temperature, config.top_p, generator)
        t_end = time.perf_counter()
    finally:
        lm.clear_cache()
    decode_steps = max(len(tokens) - 1, 0)
    timings = {
        "prefill_s": t_first - t0,
        "decode_s": t_end - t_first,
        "prefill_tokens_per_s": prompt_len / max(t_first - t0, 1e-9),
        "decode_tokens_per_s": decode_steps / (t_end - t_first) if decode_steps else None,  # one token: none
    }
    return GeneratedTokens(tokens, finish, timings)
