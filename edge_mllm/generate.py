"""Token generation over a static KV cache: greedy by default, temperature / top-p with a seed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edge_mllm.errors import ContextLengthError
from edge_mllm.model.llama import KVCache, LlamaForCausalLM


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


class PromptCache:
    """The KV cache of the last prompt, kept for the next one: a prompt that starts with the same
    embeddings (the same system prompt and image, as when several questions are asked about one image
    or a chat goes on) prefills only what follows them, as llama.cpp's server does (``cache_prompt``).
    Like any cache of a model's outputs it is a snapshot: clear it after changing the weights."""

    CAPACITY_STEP = 256  # positions: one cache serves the next prompts of about the same length

    def __init__(self) -> None:
        self.caches: list[KVCache] = []
        self.prompt: torch.Tensor | None = None  # the cached prompt's embeddings [T, D]

    def clear(self) -> None:
        self.caches, self.prompt = [], None

    def reusable(self, embeds: torch.Tensor, positions: int) -> int:
        """How many leading positions of ``embeds`` [T, D] the cache holds; 0 when it holds none or
        cannot take ``positions`` in all (prompt and new tokens)."""
        if self.prompt is None or self.caches[0].k_cache.shape[2] < positions:
            return 0
        if self.prompt.dtype != embeds.dtype or self.prompt.device != embeds.device:
            return 0
        n = min(len(self.prompt), len(embeds))
        same = (self.prompt[:n] == embeds[:n]).all(dim=-1)
        return n if bool(same.all()) else int(same.int().argmin())  # the first position that differs

    def capacity(self, positions: int, context_len: int) -> int:
        return min(-(-positions // self.CAPACITY_STEP) * self.CAPACITY_STEP, context_len)


def _last_logits(lm: LlamaForCausalLM, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """A prefill's logits [B, V] at its last position: the only ones generation reads (the LM head
    over every prompt position would add ~a quarter to a short prompt's prefill)."""
    return lm.lm_head(lm.hidden_states(inputs_embeds, input_pos)[:, -1])


def _decode(
    lm: LlamaForCausalLM, logits: torch.Tensor, prompt_len: int, config: GenerationConfig,
    generator: torch.Generator | None, on_token: Callable[[int], None] | None = None,
) -> tuple[list[list[int]], list[str]]:
    """Decode after a prefill whose last logits are ``logits`` [B, V]; each row stops at its own stop
    token. ``on_token`` (one row only) gets each id as it exists."""
    rows = logits.shape[0]
    stop = set(config.stop_token_ids)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    finish = ["length"] * rows
    running = list(range(rows))
    for pos in range(prompt_len, prompt_len + config.max_new_tokens):
        picked = [sample(logits[i], config.temperature, config.top_p, generator) for i in range(rows)]
        for i in list(running):
            if picked[i] in stop:
                finish[i] = "stop"
                running.remove(i)
                continue
            tokens[i].append(picked[i])
            if on_token is not None:
                on_token(picked[i])
            if len(tokens[i]) == config.max_new_tokens:
                running.remove(i)
        if not running:
            break
        # Finished rows go on decoding with the rest (their tokens are dropped): rows stay aligned.
        step = lm.embed(torch.tensor([[t] for t in picked], device=logits.device))
        logits = lm(step, torch.tensor([pos], device=logits.device))[:, -1]
    return tokens, finish


def _timings(prompt_len: int, prefilled: int, tokens: list[int], t0: float, t_first: float, t_end: float) -> dict:
    decode_steps = max(len(tokens) - 1, 0)
    return {
        "prefill_s": t_first - t0,
        "decode_s": t_end - t_first,
        "prefill_tokens_per_s": prefilled / max(t_first - t0, 1e-9),
        "decode_tokens_per_s": decode_steps / (t_end - t_first) if decode_steps else None,  # one token: none
        "cached_prompt_tokens": prompt_len - prefilled,
    }


def _generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    return None if config.seed is None else torch.Generator(device).manual_seed(config.seed)


@torch.inference_mode()
def generate(
    lm: LlamaForCausalLM,
    inputs_embeds: torch.Tensor,
    config: GenerationConfig,
    on_token: Callable[[int], None] | None = None,
    prompt_cache: PromptCache | None = None,
) -> GeneratedTokens:
    """Prefill ``inputs_embeds`` [1, T, D], then decode one token at a time.

    ``on_token`` is called with each generated id as soon as it exists (stop tokens excluded).
    ``prompt_cache``: reuse the KV of the leading positions the last prompt shares with this one.
    """
    prompt_len = inputs_embeds.shape[1]
    positions = prompt_len + config.max_new_tokens
    check_context(prompt_len, config.max_new_tokens, lm.config.max_position_embeddings)
    device = inputs_embeds.device
    cached = prompt_cache.reusable(inputs_embeds[0], positions) if prompt_cache is not None else 0
    if cached:
        lm.attach_cache(prompt_cache.caches)
    else:
        capacity = positions if prompt_cache is None else prompt_cache.capacity(
            positions, lm.config.max_position_embeddings)
        lm.setup_cache(1, capacity)
    start = min(cached, prompt_len - 1)  # the last prompt position is always run: its logits pick the first token
    if prompt_cache is not None:
        prompt_cache.clear()  # until this prefill has written the cache
    try:
        t0 = time.perf_counter()
        logits = _last_logits(lm, inputs_embeds[:, start:], torch.arange(start, prompt_len, device=device))
        if prompt_cache is not None:
            prompt_cache.prompt = inputs_embeds[0].clone()
        t_first = time.perf_counter()
        tokens, finish = _decode(lm, logits, prompt_len, config, _generator(config, device), on_token)
        t_end = time.perf_counter()
    finally:
        caches = lm.detach_cache()
        if prompt_cache is not None and prompt_cache.prompt is not None:
            prompt_cache.caches = caches
    timings = _timings(prompt_len, prompt_len - start, tokens[0], t0, t_first, t_end)
    return GeneratedTokens(tokens[0], finish[0], timings)


@torch.inference_mode()
def generate_batch(
    lm: LlamaForCausalLM, inputs_embeds: torch.Tensor, config: GenerationConfig
) -> list[GeneratedTokens]:
    """``generate`` for B prompts of one length at once, ``inputs_embeds`` [B, T, D]: one decode step
    reads the weights once for every row, so on a CPU, where decoding is bound by that read, B rows
    take about the time of one."""
    rows, prompt_len = inputs_embeds.shape[:2]
    check_context(prompt_len, config.max_new_tokens, lm.config.max_position_embeddings)
    device = inputs_embeds.device
    lm.setup_cache(rows, prompt_len + config.max_new_tokens)
    try:
        t0 = time.perf_counter()
        logits = _last_logits(lm, inputs_embeds, torch.arange(prompt_len, device=device))
        t_first = time.perf_counter()
        tokens, finish = _decode(lm, logits, prompt_len, config, _generator(config, device))
        t_end = time.perf_counter()
    finally:
        lm.clear_cache()
    return [GeneratedTokens(row, why, _timings(prompt_len, prompt_len, row, t0, t_first, t_end))
            for row, why in zip(tokens, finish, strict=True)]
