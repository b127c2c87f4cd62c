"""LLaMA-family decoder (Touvron et al., 2023): RMSNorm, rotary positions, MHA/GQA/MQA, SwiGLU.

Parameter names match Hugging Face's ``LlamaForCausalLM``. The KV cache is preallocated with a static
shape and updated in place at ``input_pos`` (gpt-fast style), so the same module runs eagerly and under
``torch.export`` with static shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_mllm.config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim] in the rotate-half (GPT-NeoX / HF) layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.int64).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D], or [B, 1, T, D] when each row has its own positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of ``x`` [B, T, hidden] as [B, T, heads, D], before RoPE. Shared by
    ``LlamaAttention`` and ExecuTorch's export-time attention, which keeps its projections (each
    applies RoPE in the layout its kernel takes)."""
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim)
    return q, k, v


class KVCache(nn.Module):
    """Static [B, H_kv, max_seq, D] key/value buffers, written in place at the given positions."""

    def __init__(self, batch: int, num_kv_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, num_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class LlamaAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor | None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (y.transpose(1, 2) for y in project_qkv(self, x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.kv_cache is None:
            mask, causal = (None, True) if attn_mask is None else (attn_mask[:, None], False)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            # Query i (at input_pos[i]) sees every cache slot at or before its own position.
            slots = torch.arange(k.shape[2], device=x.device)
            mask, causal = slots[None, :] <= input_pos[:, None], False
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # GQA/MQA: share each K/V head across its group of query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor | None,
                attn_mask: torch.Tensor | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head. ``forward`` takes token embeddings so images can be spliced in beforehand."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()
        self.max_cache_len = 0

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """(Re)compute the derived, non-saved tensors: the RoPE tables."""
        c = self.config
        self.rope_cos, self.rope_sin = rope_tables(c.head_dim, c.max_position_embeddings, c.rope_theta)

    def setup_cache(self, batch: int, max_seq: int) -> None:
        """Preallocate a KV cache of ``max_seq`` positions (replaces any existing one)."""
        c = self.config
        dtype = self.lm_head.weight.dtype
        device = self.lm_head.weight.device
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch, c.num_key_value_heads, max_seq, c.head_dim, dtype).to(device)
        self.max_cache_len = max_seq

    def clear_cache(self) -> None:
        """Drop the KV cache: ``forward`` then recomputes attention over its whole input."""
        self.detach_cache()

    def detach_cache(self) -> list[KVCache]:
        """Remove the KV cache and return it, per layer (``attach_cache`` puts it back): a prompt
        cache keeps it between generations while the model runs without one."""
        caches = [layer.self_attn.kv_cache for layer in self.model.layers]
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.max_cache_len = 0
        return [c for c in caches if c is not None]

    def attach_cache(self, caches: list[KVCache]) -> None:
        """Use ``caches`` (one per layer, from ``detach_cache``) as the KV cache again."""
        for layer, cache in zip(self.model.layers, caches, strict=True):
            layer.self_attn.kv_cache = cache
        self.max_cache_len = caches[0].k_cache.shape[2]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds [B, T, D] at positions ``input_pos`` [T] → logits [B, T, V].

        With a cache, ``input_pos`` is required; without one the input is a whole sequence from
        position 0 and attention is causal over it.
        """
        return self.lm_head(self.hidden_states(inputs_embeds, input_pos))

    def hidden_states(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None,
                      layer_outputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The final-norm hidden states [B, T, D] that ``forward`` feeds the LM head (training applies
        the head only where there are labels).

        Training may pass its own layout instead of one causal sequence per row: ``input_pos`` [B, T]
        and ``attn_mask`` [B, T, T] (True: query may attend to key), e.g. several questions packed
        after one shared image prompt (``train.examples.pack_shared_prefix``). Not with a KV cache.
        ``layer_outputs``, if given, receives every decoder block's output (distillation matches them)."""
        if attn_mask is not None and self.max_cache_len:
            raise ValueError("attn_mask is for cacheless forwards; the KV cache brings its own mask")
        if input_pos is None:
            if self.max_cache_len:
                raise ValueError("input_pos is required when a KV cache is set up")
            input_pos = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        cos = self.rope_cos[input_pos].to(inputs_embeds.dtype)
        sin = self.rope_sin[input_pos].to(inputs_embeds.dtype)
        if input_pos.dim() == 2:  # per-row positions: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin, input_pos, attn_mask)
            if layer_outputs is not None:
                layer_outputs.append(x)
        return self.model.norm(x)
