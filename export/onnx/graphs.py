"""The three graphs of an ONNX bundle, as export-only wrappers around the model's own modules, and
their export with ``torch.onnx.export``.

Names and layouts are onnxruntime-genai's (``genai_config.json``, Phi-3-vision's three-model split):
- ``vision.onnx``: ``pixel_values`` [num_images, 3, H, W] → ``image_features``
  [num_images · image_tokens, D] (vision tower + projector; genai pre-allocates that 2-D buffer).
  Fused (the default): ``FusedVisionEncoder``, reading RGB in [0, 1] (the decoded image / 255, after
  resize, crop and padding); reference: the model's own modules, reading normalised pixels;
- ``embedding.onnx``: ``input_ids`` [B, S] (+ ``image_features``) → ``inputs_embeds`` [B, S, D];
  every negative id (LLaVA's ``IMAGE_TOKEN_INDEX``, Phi-3-vision's image ids) takes the next
  row of ``image_features``, in order, as ``MultimodalLM.embed_prompt`` splices images;
- ``decoder.onnx``: ``inputs_embeds`` + ``past_key_values.N.key/value`` [B, H_kv, P, head_dim] →
  ``logits`` [B, S, V] + ``present.N.key/value`` [B, H_kv, P + S, head_dim]; each block's attention
  and cache growth is one ``com.microsoft.GroupQueryAttention`` (as in genai's own decoders).

Each wrapper keeps the model's attribute names, so the exported initializers are named exactly
as the model's parameters (the exporter keeps only the ones a graph reads).

The decoder's positions are its cache slots (P … P + S − 1), as in ``edge_mllm.generate``; it has
no ``attention_mask`` / ``position_ids`` inputs (both optional in genai), so batches must be
unpadded (every row the same length); and a batch of several rows goes on one token per step after
its prompt (GroupQueryAttention's CPU kernel refuses a chunk of several new tokens with a past when
the batch has more than one row).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from edge_mllm.model.fused_vision import FusedVisionEncoder, PackedSelfAttention
from edge_mllm.model.llama import LlamaForCausalLM, apply_rope
from edge_mllm.model.mllm import MultimodalLM

PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
LOGITS = "logits"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"

# Dynamic axes, with onnxruntime-genai's names.
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"
IMAGES = "num_images"
IMAGE_TOKENS = "num_image_tokens"
OPSET = 20  # the TorchScript exporter's newest


class VisionGraph(nn.Module):
    """Normalised pixels → image features, flattened over images (genai's 2-D ``image_features``)."""

    def __init__(self, model: MultimodalLM):
        super().__init__()
        self.vision_tower = model.vision_tower
        self.mm_projector = model.mm_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(self.vision_tower(pixel_values)).flatten(0, 1)


class PackedAttentionFunction(torch.autograd.Function):
    """Packed-QKV self-attention (as ``PackedSelfAttention`` computes it, without ``out_proj``) that
    exports as ONNX Runtime's ``com.microsoft.Attention``: the Q/K/V GEMM, the scaled dot products and
    the softmax in one CPU kernel. The transformer optimizer does not find this pattern in the traced
    SDPA (its scale comes from Shape → Sqrt arithmetic), so the op is written out here."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_heads: int) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, weight, bias).view(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, d)

    @staticmethod
    def symbolic(g, x, weight, bias, num_heads: int):
        # Attention's weights are [D_in, 3D]: the Transpose of the initializer is folded by ``files``
        out = g.op("com.microsoft::Attention", x, g.op("Transpose", weight, perm_i=[1, 0]), bias,
                   num_heads_i=num_heads)
        out.setType(x.type())  # [B, N, D], as its input: the exporter cannot infer a contrib op's shape
        return out


class ContribAttention(nn.Module):
    """``PackedSelfAttention`` with its attention as ``com.microsoft.Attention`` in the exported graph."""

    def __init__(self, attn: PackedSelfAttention):
        super().__init__()
        self.qkv, self.out_proj, self.num_heads = attn.qkv, attn.out_proj, attn.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(PackedAttentionFunction.apply(x, self.qkv.weight, self.qkv.bias, self.num_heads))


class FusedVisionGraph(nn.Module):
    """RGB in [0, 1] → image features, flattened over images, through ``FusedVisionEncoder`` with
    each block's attention as ONNX Runtime's fused ``Attention`` op."""

    def __init__(self, model: MultimodalLM):
        super().__init__()
        self.encoder = FusedVisionEncoder(model)
        for layer in self.encoder.layers:
            layer.attn = ContribAttention(layer.attn)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values).flatten(0, 1)


class EmbeddingGraph(nn.Module):
    """Token ids → embeddings; with ``image_features``, negative ids take image rows in order."""

    def __init__(self, model: MultimodalLM):
        super().__init__()
        self.language_model = model.language_model  # only the embedding is traced

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        is_image = input_ids < 0
        embeds = self.language_model.embed(input_ids.clamp_min(0))
        if image_features is None:
            return embeds
        # The k-th image position (row-major over the batch) reads row k of [zeros; image_features]:
        # row 0 is a dummy so that a text-only step, with zero image rows, still gathers in range.
        index = torch.cumsum(is_image.flatten().long(), 0).view_as(input_ids) * is_image
        table = torch.cat([image_features.new_zeros(1, image_features.shape[1]), image_features])
        return torch.where(is_image.unsqueeze(-1), table[index], embeds)


class CacheLengthsFunction(torch.autograd.Function):
    """The lengths GroupQueryAttention reads, from the past [B, H_kv, P, D] and the new inputs
    [B, S, …]: seqlens_k (int32 [B]; P + S − 1 for every row) and total_sequence_length (int32 scalar;
    P + S). GQA also derives the rotary positions P … P + S − 1 from them. Computed once per step for
    every layer (traced inside each layer's op, they were six shape nodes per layer)."""

    @staticmethod
    def forward(ctx, past_k: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = past_k.shape[2] + inputs.shape[1]
        return torch.full((inputs.shape[0],), total - 1, dtype=torch.int32), torch.tensor(total, dtype=torch.int32)

    @staticmethod
    def symbolic(g, past_k, inputs):
        def dim(x, i: int):
            return g.op("Gather", g.op("Shape", x), g.op("Constant", value_t=torch.tensor(i)), axis_i=0)

        total = g.op("Cast", g.op("Add", dim(past_k, 2), dim(inputs, 1)), to_i=6)
        last = g.op("Sub", total, g.op("Constant", value_t=torch.tensor(1, dtype=torch.int32)))
        batch = g.op("Unsqueeze", dim(inputs, 0), g.op("Constant", value_t=torch.tensor([0])))
        seqlens = g.op("Expand", g.op("Unsqueeze", last, g.op("Constant", value_t=torch.tensor([0]))), batch)
        return seqlens, total


class GroupQueryAttentionFunction(torch.autograd.Function):
    """Rotary positions, then causal attention of S new queries over the P cached and S new keys /
    values, each K/V head shared by its group of query heads (GQA; MQA and MHA too), returning the
    output [B, S, H·D] and the caches grown to P + S (keys stored rotated). Exports as ONNX Runtime's
    ``com.microsoft.GroupQueryAttention`` with ``do_rotary``: one CPU kernel per layer for RoPE,
    cache growth and attention, as in genai's own decoders. The traced equivalents were ~25 small
    nodes per layer (RoPE's slices and concatenations, the head reshapes and transposes around it)
    and a ``Tile`` copying the whole cache per query head at every step (``repeat_interleave``)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                cos_cache: torch.Tensor, sin_cache: torch.Tensor, seqlens: torch.Tensor, total: torch.Tensor,
                num_heads: int, kv_heads: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # q [B, S, H·D], k / v [B, S, H_kv·D] (before RoPE), past [B, H_kv, P, D] (keys rotated),
        # cos / sin caches [max positions, D / 2]: one half of the rotate-half tables (GQA's layout);
        # seqlens / total: ``CacheLengthsFunction``'s, which the exported op reads (here: from the shapes)
        b, s, _ = q.shape
        p = past_k.shape[2]
        cos, sin = (torch.cat([t[p : p + s]] * 2, -1) for t in (cos_cache, sin_cache))
        q = apply_rope(q.view(b, s, num_heads, d).transpose(1, 2), cos, sin)
        present_k = torch.cat([past_k, apply_rope(k.view(b, s, kv_heads, d).transpose(1, 2), cos, sin)], 2)
        present_v = torch.cat([past_v, v.view(b, s, kv_heads, d).transpose(1, 2)], 2)
        groups = num_heads // kv_heads
        keys, values = present_k.repeat_interleave(groups, 1), present_v.repeat_interleave(groups, 1)
        mask = torch.arange(p + s)[None, :] <= torch.arange(p, p + s)[:, None]  # query i at slot p + i
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, s, num_heads * d), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, cos_cache, sin_cache, seqlens, total, num_heads: int, kv_heads: int,
                 d: int):
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens,
                                         total, cos_cache, sin_cache, num_heads_i=num_heads, kv_num_heads_i=kv_heads,
                                         do_rotary_i=1, rotary_interleaved_i=0, outputs=3)
        # the exporter cannot infer a contrib op's types: the query's, and the past's with a new length
        out.setType(q.type().with_sizes([None, None, num_heads * d]))
        present_k.setType(past_k.type().with_sizes([None, kv_heads, None, d]))
        present_v.setType(past_v.type().with_sizes([None, kv_heads, None, d]))
        return out, present_k, present_v


class ContribSelfAttention(nn.Module):
    """Export-only ``LlamaAttention`` (its own projections, so the same parameter names) whose RoPE,
    cache and attention are ``GroupQueryAttentionFunction``: the past comes in as graph inputs
    (``past``) and the grown caches go out as ``present`` outputs, instead of a static buffer written
    in place (a source transform, as ExecuTorch's export does with its own cache)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lengths: tuple[torch.Tensor, torch.Tensor] | None = None  # CacheLengthsFunction's
        self.present: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, input_pos: torch.Tensor | None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # ``DecoderGraph`` passes the whole rotary caches (GQA picks the rows from the cache length),
        # not per-position tables. Positions are the cache slots, so the mask is GQA's own causal one;
        # ``attn_mask`` (padding) never comes here: the decoder takes unpadded batches (module docstring).
        out, *present = GroupQueryAttentionFunction.apply(
            self.q_proj(x), self.k_proj(x), self.v_proj(x), *self.past, cos_cache, sin_cache, *self.lengths,
            self.num_heads, self.num_kv_heads, self.head_dim)
        self.present = tuple(present)
        return self.o_proj(out)


class DecoderGraph(nn.Module):
    """inputs_embeds + past → logits + present, running the model's own decoder layers."""

    def __init__(self, model: MultimodalLM):
        super().__init__()
        self.language_model = lm = model.language_model
        # GQA's rotary caches: the cos / sin of the first half of each row (rotate-half repeats it),
        # for every position the bundle's context allows
        positions, half = lm.config.max_position_embeddings, lm.config.head_dim // 2
        dtype = lm.lm_head.weight.dtype
        for name, table in (("rotary_cos_cache", lm.rope_cos), ("rotary_sin_cache", lm.rope_sin)):
            self.register_buffer(name, table[:positions, :half].to(dtype).contiguous(), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, past: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        lm = self.language_model
        x, present = inputs_embeds, []
        lengths = CacheLengthsFunction.apply(past[0][0], inputs_embeds)
        for layer, layer_past in zip(lm.model.layers, past, strict=True):
            layer.self_attn.past, layer.self_attn.lengths = layer_past, lengths
            x = layer(x, self.rotary_cos_cache, self.rotary_sin_cache, None)
            present.extend(layer.self_attn.present)
        return (lm.lm_head(lm.model.norm(x)), *present)


@contextmanager
def contrib_attention(lm: LlamaForCausalLM):
    """Give every decoder layer a ``ContribSelfAttention`` for the duration; restore the model after."""
    saved = [layer.self_attn for layer in lm.model.layers]
    try:
        for layer in lm.model.layers:
            layer.self_attn = ContribSelfAttention(layer.self_attn)
        yield
    finally:
        for layer, attn in zip(lm.model.layers, saved, strict=True):
            layer.self_attn = attn


def _export(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]]) -> onnx.ModelProto:
    """``torch.onnx.export`` with the TorchScript exporter, without constant folding.

    Why TorchScript rather than dynamo (``dynamo=True`` also exports these wrappers): on this CPU it
    exports the 2-layer test decoder in 1 s against 20 s and the 30-layer default in 20–40 s against
    145 s, and its output is byte-identical run to run. The price is torch's deprecation warning
    for this exporter (silenced here) and opset 20 at most. Why no folding: every
    parameter then stays an initializer named after it and every linear ``MatMul(x, Transpose(W))``,
    so ``surgery`` can find the weights again; the rest is folded afterwards (``files``).
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            module, args, buffer, dynamo=False, opset_version=OPSET, do_constant_folding=False,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        )
    return onnx.load_from_string(buffer.getvalue())


@torch.no_grad()
def export_vision(model: MultimodalLM, fused: bool = False) -> onnx.ModelProto:
    """``vision.onnx``: pixel_values [num_images, 3, H, W] → image_features [num_images · N, D];
    ``fused``: through ``FusedVisionGraph`` (RGB in [0, 1]) instead of ``VisionGraph`` (normalised)."""
    v = model.config.vision
    pixels = torch.zeros(2, v.num_channels, v.image_size, v.image_size)
    graph = FusedVisionGraph(model) if fused else VisionGraph(model)
    return _export(graph.eval(), (pixels,), [PIXEL_VALUES], [IMAGE_FEATURES],
                   {PIXEL_VALUES: {0: IMAGES}, IMAGE_FEATURES: {0: IMAGE_TOKENS}})


@torch.no_grad()
def export_embedding(model: MultimodalLM) -> onnx.ModelProto:
    """``embedding.onnx``: input_ids [B, S] (+ image_features [rows, D] for a model with vision)
    → inputs_embeds [B, S, D]."""
    ids = torch.tensor([[1, -1, -1, 2], [3, -1, -1, 4]])
    axes = {INPUT_IDS: {0: BATCH, 1: SEQUENCE}, INPUTS_EMBEDS: {0: BATCH, 1: SEQUENCE}}
    if not model.config.has_vision:
        return _export(EmbeddingGraph(model).eval(), (ids,), [INPUT_IDS], [INPUTS_EMBEDS], axes)
    features = torch.zeros(4, model.config.text.hidden_size)
    return _export(EmbeddingGraph(model).eval(), (ids, features), [INPUT_IDS, IMAGE_FEATURES], [INPUTS_EMBEDS],
                   {**axes, IMAGE_FEATURES: {0: IMAGE_TOKENS}})


def cache_names(num_layers: int, past: bool) -> list[str]:
    """past_key_values.N.key/value (inputs) or present.N.key/value (outputs), layer by layer."""
    key, value = (PAST_KEY, PAST_VALUE) if past else (PRESENT_KEY, PRESENT_VALUE)
    return [name % i for i in range(num_layers) for name in (key, value)]


@torch.no_grad()
def export_decoder(model: MultimodalLM) -> onnx.ModelProto:
    """``decoder.onnx``: inputs_embeds [B, S, D] + past_key_values.N.key/value [B, H_kv, P, head_dim]
    → logits [B, S, V] + present.N.key/value [B, H_kv, P + S, head_dim]."""
    c = model.config.text
    embeds = torch.zeros(2, 3, c.hidden_size)
    past = [(torch.zeros(2, c.num_key_value_heads, 4, c.head_dim),) * 2 for _ in range(c.num_hidden_layers)]
    inputs = [INPUTS_EMBEDS, *cache_names(c.num_hidden_layers, past=True)]
    outputs = [LOGITS, *cache_names(c.num_hidden_layers, past=False)]
    axes = {INPUTS_EMBEDS: {0: BATCH, 1: SEQUENCE}, LOGITS: {0: BATCH, 1: SEQUENCE}}
    axes.update({name: {0: BATCH, 2: PAST} for name in inputs[1:]})
    axes.update({name: {0: BATCH, 2: TOTAL} for name in outputs[1:]})
    with contrib_attention(model.language_model):
        return _export(DecoderGraph(model).eval(), (embeds, past), inputs, outputs, axes)
