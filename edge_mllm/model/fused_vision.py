"""The fused image path: RGB pixels → LLM-ready image tokens in one module, folded for inference.

``FusedVisionEncoder`` computes what ``MultimodalLM.encode_images`` computes (the reference path,
kept as is and tested against), with the constant work done once at build time:

- input normalisation ``(x / rgb_max − mean) / std`` folded into the patch-embedding convolution's
  weights and bias (the patch conv has stride = kernel and no padding, so every output reads only
  real pixels and the fold is exact);
- the class token plus its position precomputed into one constant row, joined to the patches by a
  zero pad and one add (no concatenation of a broadcast row);
- each block's ``layer_norm1`` affine folded into one Q/K/V linear (``W·diag(γ)``, ``W·β + b``), and
  ``layer_norm2``'s into ``fc1``; the norms that remain have no affine;
- attention through ``torch.nn.functional.scaled_dot_product_attention`` on the split of that one
  GEMM;
- only the blocks up to the selected feature layer (as the reference tower);
- the projector in the same module; the ``query`` connector with its learned queries' LayerNorm and
  query projection precomputed, its K/V as one GEMM (``ln_kv``'s affine and the positions folded in)
  and ``ln_post``'s affine folded into ``proj``.

Input: ``rgb`` float32 [B, 3, S, S], the image as the app decoded it — resized (shortest side,
bicubic), center-cropped and, for ``aspect_ratio == "pad"``, padded to square with the mean colour,
exactly as ``edge_mllm.preprocess.ImageProcessor`` does before it rescales (those steps stay outside
the graph) — with values in [0, ``rgb_max``]: ``rgb_max=1.0`` for uint8 / 255, ``255.0`` for the
uint8 values themselves cast to float.

``int8=True`` runs every linear of the tower and projector through torchao's int8 dynamic-activation
int8-weight form (``Int8DynamicActivationInt8WeightConfig``: weights per output channel, activations
quantized per token at run time, int8 GEMMs), the eager counterpart of ONNX Runtime's dynamic int8
export; the convolutions (patch embedding, LDP) stay fp32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from edge_mllm.model.connectors import QueryProjector
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.model.vision import ACTIVATIONS, CLIPEncoderLayer, CLIPVisionTower


def fold_normalization(conv: nn.Conv2d, mean: tuple[float, ...], std: tuple[float, ...],
                       rgb_max: float = 1.0) -> nn.Conv2d:
    """A conv on raw RGB in [0, rgb_max] equal to ``conv`` on ``(x / rgb_max − mean) / std``.

    conv(W, (x/r − m)/s) = conv(W / (r·s), x) − Σ_{c,i,j} W[o,c,i,j]·m_c/s_c, exact while the conv
    has no padding (a padded border would read 0 where the normalised input reads −m/s)."""
    if any(p != 0 for p in conv.padding):
        raise ValueError("normalisation folds into a conv only without padding")
    w = conv.weight.detach().double()
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    bias = -(w * m / s).sum(dim=(1, 2, 3))
    if conv.bias is not None:
        bias = bias + conv.bias.detach().double()
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, bias=True)
    folded.weight = nn.Parameter((w / (s * rgb_max)).float())
    folded.bias = nn.Parameter(bias.float())
    return folded


def fold_affine_into_linear(norm: nn.LayerNorm, linears: list[nn.Linear]) -> nn.Linear:
    """One linear computing ``cat([l(norm(x)) for l in linears])`` from the norm without its affine.

    W(γ⊙x̂ + β) + b = (W·diag(γ))x̂ + (W·β + b): exact, as nothing sits between the norm and the
    linears. Stacking the linears' rows makes Q/K/V (or any linears sharing an input) one GEMM."""
    w = torch.cat([lin.weight.detach().double() for lin in linears])
    b = torch.cat([lin.bias.detach().double() if lin.bias is not None else
                   torch.zeros(lin.out_features, dtype=torch.float64) for lin in linears])
    gamma, beta = norm.weight.detach().double(), norm.bias.detach().double()
    fused = nn.Linear(w.shape[1], w.shape[0])
    fused.weight = nn.Parameter((w * gamma).float())
    fused.bias = nn.Parameter((w @ beta + b).float())
    return fused


def plain_norm(norm: nn.LayerNorm) -> nn.LayerNorm:
    """``norm`` without its affine (folded elsewhere)."""
    return nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)


def int8_dynamic_(module: nn.Module) -> None:
    """Every ``nn.Linear`` under ``module`` as torchao's int8 dynamic-activation int8-weight linear, in place."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(module, Int8DynamicActivationInt8WeightConfig())


class SDPA(nn.Module):
    """``scaled_dot_product_attention(q, k, v)`` as a module, so an export can put its runtime's
    attention kernel in its place (``edge_mllm.export``)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention from one Q/K/V linear (``qkv``: D → 3D, rows Q then K then V),
    through ``scaled_dot_product_attention``, then ``out_proj``."""

    def __init__(self, qkv: nn.Linear, out_proj: nn.Linear, num_heads: int):
        super().__init__()
        self.qkv, self.out_proj, self.num_heads = qkv, out_proj, num_heads
        self.sdpa = SDPA()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x)
        # three slices, not split / select: XNNPACK delegates slices only
        q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, n, self.num_heads, -1).transpose(1, 2) for i in range(3))
        out = self.sdpa(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class FusedEncoderLayer(nn.Module):
    """``CLIPEncoderLayer`` with its norms' affines folded and Q/K/V as one linear."""

    def __init__(self, layer: CLIPEncoderLayer, activation: str):
        super().__init__()
        attn = layer.self_attn
        self.norm1 = plain_norm(layer.layer_norm1)
        qkv = fold_affine_into_linear(layer.layer_norm1, [attn.q_proj, attn.k_proj, attn.v_proj])
        self.attn = PackedSelfAttention(qkv, copy.deepcopy(attn.out_proj), attn.num_heads)
        self.norm2 = plain_norm(layer.layer_norm2)
        self.fc1 = fold_affine_into_linear(layer.layer_norm2, [layer.mlp.fc1])
        self.fc2 = copy.deepcopy(layer.mlp.fc2)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class FusedQueryProjector(nn.Module):
    """``QueryProjector`` with everything that does not depend on the image precomputed: the learned
    queries' LayerNorm and their Q projection, K/V as one GEMM over the normalised features (``ln_kv``'s
    affine folded in; the positions, added to the keys only, become a per-token key bias), and
    ``ln_post``'s affine folded into ``proj``."""

    def __init__(self, proj: QueryProjector):
        super().__init__()
        attn = proj.attn
        d = attn.embed_dim
        self.num_heads, self.dim = attn.num_heads, d
        w_in, b_in = attn.in_proj_weight.detach().double(), attn.in_proj_bias.detach().double()
        with torch.no_grad():
            q = F.linear(proj.ln_q(proj.query).double(), w_in[:d], b_in[:d])
        self.register_buffer("q", q.float().view(1, -1, self.num_heads, d // self.num_heads).transpose(1, 2))
        self.kv_proj = copy.deepcopy(proj.kv_proj)
        self.norm_kv = plain_norm(proj.ln_kv)
        k_lin, v_lin = nn.Linear(d, d), nn.Linear(d, d)
        k_lin.weight, k_lin.bias = nn.Parameter(w_in[d:2 * d].float()), nn.Parameter(b_in[d:2 * d].float())
        v_lin.weight, v_lin.bias = nn.Parameter(w_in[2 * d:].float()), nn.Parameter(b_in[2 * d:].float())
        self.kv = fold_affine_into_linear(proj.ln_kv, [k_lin, v_lin])
        # keys read features + positions: W_k·pos joins the key half's bias, token by token
        key_pos = F.pad(proj.pos_embed.double() @ w_in[d:2 * d].T, (0, d))
        self.register_buffer("kv_pos", key_pos.float())
        self.sdpa = SDPA()
        self.out_proj = nn.Linear(d, d)  # a plain linear: MHA's NonDynamicallyQuantizableLinear is skipped by int8
        self.out_proj.load_state_dict(attn.out_proj.state_dict())
        self.norm_post = plain_norm(proj.ln_post)
        self.proj = fold_affine_into_linear(proj.ln_post, [proj.proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        d = self.dim
        kv = self.kv(self.norm_kv(self.kv_proj(x))) + self.kv_pos[:n]
        k, v = (kv[..., i * d:(i + 1) * d].reshape(b, n, self.num_heads, -1).transpose(1, 2) for i in range(2))
        out = self.sdpa(self.q if b == 1 else self.q.expand(b, -1, -1, -1), k, v)  # no copy for one image
        out = self.out_proj(out.transpose(1, 2).reshape(b, -1, d))
        return self.proj(self.norm_post(out))


class FusedVisionEncoder(nn.Module):
    """RGB pixels [B, 3, S, S] in [0, ``rgb_max``] → image tokens [B, num_image_tokens, D]: the vision
    tower and projector of ``model``, folded (see the module docstring). Built on copies: ``model`` is
    left as is."""

    def __init__(self, model: MultimodalLM, *, rgb_max: float = 1.0, int8: bool = False):
        super().__init__()
        if model.vision_tower is None:
            raise ValueError("this model has no vision encoder")
        tower: CLIPVisionTower = model.vision_tower
        v = tower.config
        self.rgb_max = rgb_max
        emb = tower.embeddings
        self.patch_embedding = fold_normalization(emb.patch_embedding, v.image_mean, v.image_std, rgb_max)
        pos = emb.position_embedding.weight.detach().clone()
        pos[0] += emb.class_embedding.detach()  # row 0 is the class token's: it meets a padded zero row
        self.register_buffer("positions", pos.unsqueeze(0))
        self.pre_layrnorm = copy.deepcopy(tower.pre_layrnorm)  # feeds the residual stream: nothing to fold into
        self.layers = nn.ModuleList(FusedEncoderLayer(layer, v.hidden_act) for layer in tower.encoder.layers)
        self.drop_cls = v.select_feature == "patch"
        proj = model.mm_projector
        self.projector = FusedQueryProjector(proj) if isinstance(proj, QueryProjector) else copy.deepcopy(proj)
        if int8:
            int8_dynamic_(self)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(rgb.to(self.positions.dtype)).flatten(2).transpose(1, 2)
        x = self.pre_layrnorm(F.pad(patches, (0, 0, 1, 0)) + self.positions)
        for layer in self.layers:
            x = layer(x)
        return self.projector(x[:, 1:] if self.drop_cls else x)


__all__ = ["FusedVisionEncoder", "FusedEncoderLayer", "PackedSelfAttention", "SDPA", "FusedQueryProjector",
           "fold_normalization", "fold_affine_into_linear", "int8_dynamic_", "plain_norm"]
