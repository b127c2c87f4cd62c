"""Source transform: the three export-ready modules of an ExecuTorch multimodal program.

ExecuTorch's runners call ``vision_encoder(pixels)``, ``token_embedding(ids)`` and
``text_decoder(embeddings, start_pos)`` (``extension/llm/runner/constants.h``). Norms are rewritten
in a form XNNPACK takes whole (``mean_last``). The decoder keeps our projections and RoPE but swaps
attention for ExecuTorch's LLM custom ops, as its own
``replace_kv_cache_with_custom_kv_cache`` / ``replace_sdpa_with_custom_op`` transforms do for its Llama:
``llama::update_cache`` writes K/V into a static cache in place, ``llama::custom_sdpa`` attends causally
over it from ``start_pos`` (GQA included, no repeated K/V). Their kernels ship in the pip wheel and in
the Android/iOS runtimes.

The modules are built on deep copies, so quantizing them (``quantize``) leaves the caller's model as is.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from edge_mllm.model.connectors import LayerNorm2d, SqueezeExcitation
from edge_mllm.model.fused_vision import SDPA, FusedVisionEncoder
from edge_mllm.model.llama import LlamaAttention, LlamaForCausalLM, RMSNorm, apply_rope, project_qkv
from edge_mllm.model.mllm import MultimodalLM


def load_custom_ops() -> None:
    """Register the ``llama::`` ops (and their fake kernels) with PyTorch; export needs them."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def mean_last(x: torch.Tensor, inv_dim: torch.Tensor) -> torch.Tensor:
    """``x.mean(-1, keepdim=True)`` as a GEMM against a constant 1/D row. XNNPACK has no kernel for a
    mean over the last dim of a 3-D tensor; on a CPU kernel it would split every layer's delegate
    around each norm (more partitions: slower export, more delegate calls per token)."""
    return nn.functional.linear(x, inv_dim)


def _eps(eps: float, dtype: torch.dtype) -> torch.Tensor:
    """eps as a [1] tensor: coremltools' linear-bias fusion fails on a 1-wide linear plus a scalar."""
    return torch.tensor([eps], dtype=dtype)


class LinearRMSNorm(nn.Module):
    """``RMSNorm`` with ``mean_last``."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight = norm.weight
        dim = norm.weight.shape[0]
        self.register_buffer("inv_dim", torch.full((1, dim), 1.0 / dim, dtype=norm.weight.dtype), persistent=False)
        self.register_buffer("eps", _eps(norm.eps, norm.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(mean_last(x * x, self.inv_dim) + self.eps))


class LinearLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dim with ``mean_last`` (with or without its affine)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias
        dim = norm.normalized_shape[-1]
        dtype = torch.get_default_dtype() if norm.weight is None else norm.weight.dtype
        self.register_buffer("inv_dim", torch.full((1, dim), 1.0 / dim, dtype=dtype), persistent=False)
        self.register_buffer("eps", _eps(norm.eps, dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - mean_last(x, self.inv_dim)
        out = centered * torch.rsqrt(mean_last(centered * centered, self.inv_dim) + self.eps)
        return out if self.weight is None else out * self.weight + self.bias


class LinearLayerNorm2d(LinearLayerNorm):
    """``LayerNorm2d`` (over the channels of NCHW) with ``mean_last``, between two permutes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MeanSqueezeExcitation(SqueezeExcitation):
    """``SqueezeExcitation`` with its global pool as a mean over H, W: XNNPACK takes the mean, while
    ``adaptive_avg_pool2d`` to 1×1 lowers to an ``as_strided`` copy outside the delegate."""

    def __init__(self, se: SqueezeExcitation):
        nn.Module.__init__(self)
        self.fc1, self.fc2 = se.fc1, se.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * scale


def replace_layer_norms(module: nn.Module) -> None:
    """Swap ``nn.LayerNorm`` over one dim, the projectors' ``LayerNorm2d`` and LDP's squeeze-excite
    pooling for XNNPACK-friendly equivalents, in place."""
    for name, child in module.named_children():
        if isinstance(child, LayerNorm2d):
            setattr(module, name, LinearLayerNorm2d(child))
        elif type(child) is SqueezeExcitation:
            setattr(module, name, MeanSqueezeExcitation(child))
        elif type(child) is nn.LayerNorm and len(child.normalized_shape) == 1:
            setattr(module, name, LinearLayerNorm(child))
        else:
            replace_layer_norms(child)


class VisionEncoder(nn.Module):
    """Normalised pixels [1, 3, S, S] → image embeddings [1, num_image_tokens, D] (projector included)."""

    def __init__(self, model: MultimodalLM):
        super().__init__()
        self.vision_tower = copy.deepcopy(model.vision_tower)
        self.mm_projector = copy.deepcopy(model.mm_projector)
        replace_layer_norms(self)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(self.vision_tower(pixel_values))


class MatmulSoftmaxSDPA(nn.Module):
    """Non-causal attention as batched GEMM → softmax → batched GEMM, all XNNPACK ops. PyTorch's SDPA
    decomposes at export with a guard for fully masked rows (``where`` / ``any`` / ``logical_not``)
    that XNNPACK does not take, which would split the method into a delegate per block."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [B, H, N, d] as [B·H, N, d]: 3-D bmm, no broadcasting expand (not an XNNPACK op)
        b, h, n, d = k.shape[0], *q.shape[1:]
        if q.shape[0] != b:  # learned queries (batch 1) over a batch of images; shapes are static here
            q = q.expand(b, -1, -1, -1)
        q, k, v = (t.reshape(b * h, -1, d) for t in (q * d**-0.5, k, v))
        out = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)
        return out.view(b, h, n, d)


def replace_sdpa(module: nn.Module) -> None:
    """Swap every fused-vision ``SDPA`` for :class:`MatmulSoftmaxSDPA`, in place."""
    for name, child in module.named_children():
        if isinstance(child, SDPA):
            setattr(module, name, MatmulSoftmaxSDPA())
        else:
            replace_sdpa(child)


class FusedRGBVisionEncoder(nn.Module):
    """uint8 RGB [1, 3, S, S] (0–255, as the app decoded it, resized / cropped / padded) → image
    embeddings [1, num_image_tokens, D]: ``FusedVisionEncoder`` with rescale and normalisation in the
    patch conv. uint8 is what ExecuTorch's LLaVA ``vision_encoder`` takes and what Android's
    ``LlmModule.prefillImages(int[], …)`` and ``make_image_input(uint8 tensor)`` give the
    ``MultimodalRunner``, which passes images through in the dtype the method declares. The cast to
    float is the method's one op outside XNNPACK (which has no uint8 → fp32 convert)."""

    def __init__(self, model: MultimodalLM):
        super().__init__()
        self.encoder = FusedVisionEncoder(model, rgb_max=255.0)
        replace_layer_norms(self)
        replace_sdpa(self)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values.to(torch.float32))


class TokenEmbedding(nn.Module):
    """Token ids [1, T] → embeddings [1, T, D]."""

    def __init__(self, lm: LlamaForCausalLM):
        super().__init__()
        self.embed_tokens = copy.deepcopy(lm.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class CustomOpAttention(nn.Module):
    """``LlamaAttention``'s projections over a static [1, max_seq_len, H_kv, D] cache (sequence on
    dim 1: the layout the custom ops take)."""

    def __init__(self, attn: LlamaAttention, max_seq_len: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        shape = (1, max_seq_len, self.num_kv_heads, self.head_dim)
        dtype = attn.o_proj.weight.dtype
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:  # LlamaAttention's mask is for packed training rows, never for decoding
            raise ValueError("the exported decoder masks causally from start_pos; it takes no attn_mask")
        b, t, _ = x.shape
        q, k, v = project_qkv(self, x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        torch.ops.llama.update_cache(k, self.k_cache, start_pos)
        torch.ops.llama.update_cache(v, self.v_cache, start_pos)
        # causal from start_pos: query i (position start_pos + i) sees cache slots 0..start_pos + i
        out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start_pos, None, 0.0, True)
        return self.o_proj(out.reshape(b, t, -1))


class TextDecoder(nn.Module):
    """(embeddings [1, T, D], start_pos [1]) → logits of the last position [1, V]; the KV cache is
    updated in place. Only the last position's logits are computed: the runners sample from it, and
    the LM head over a whole prompt (image tokens included) would dominate prefill."""

    def __init__(self, lm: LlamaForCausalLM, max_seq_len: int):
        super().__init__()
        lm = copy.deepcopy(lm)
        lm.clear_cache()
        for layer in lm.model.layers:
            layer.self_attn = CustomOpAttention(layer.self_attn, max_seq_len)
            layer.input_layernorm = LinearRMSNorm(layer.input_layernorm)
            layer.post_attention_layernorm = LinearRMSNorm(layer.post_attention_layernorm)
        self.layers = lm.model.layers
        self.norm = LinearRMSNorm(lm.model.norm)
        self.lm_head = lm.lm_head
        self.max_seq_len = max_seq_len
        # RoPE tables cut to the cache length: positions past it cannot occur
        self.register_buffer("rope_cos", lm.rope_cos[:max_seq_len].clone(), persistent=False)
        self.register_buffer("rope_sin", lm.rope_sin[:max_seq_len].clone(), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        t = inputs_embeds.shape[1]
        start_pos = input_pos[0].item()
        # bounds torch.export needs for the data-dependent start (the custom ops check them again)
        torch._check(start_pos >= 0)
        torch._check(start_pos + t <= self.max_seq_len)
        cos = self.rope_cos.narrow(0, start_pos, t).unsqueeze(1).to(inputs_embeds.dtype)  # [T, 1, D]
        sin = self.rope_sin.narrow(0, start_pos, t).unsqueeze(1).to(inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, start_pos)
        return self.lm_head(self.norm(x[:, -1, :]))

    def reset_cache(self) -> None:
        """Zero every layer's cache (eager use only: the exported program owns its own copies)."""
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()
