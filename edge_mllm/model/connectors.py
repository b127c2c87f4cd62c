"""Connectors (projectors) from vision features to LLM embeddings.

Each class keeps the parameter names of the checkpoints it comes from, under ``mm_projector``:
- ``mlp2x_gelu``: LLaVA-1.5 (``0``/``2``).
- ``ldp``: MobileVLM v1's Lightweight Downsample Projector (``model.mlp.*``, ``model.mb_block.*``).
- ``ldpv2``: MobileVLM v2 (``mlp.mlp.*``, ``peg.peg.0``).
- ``query``: learned queries + cross-attention (Q-Former / Perceiver-resampler style); ours.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_mllm.config import ProjectorConfig, VisionConfig


def tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """[B, N, C] with N = g*g → [B, C, g, g]."""
    b, n, c = x.shape
    g = math.isqrt(n)
    return x.transpose(1, 2).reshape(b, c, g, g)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class MLP2xGeluProjector(nn.Sequential):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    @staticmethod
    def num_tokens(num_in: int) -> int:
        return num_in


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map (timm's LayerNorm2d / LayerNormAct2d without act)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding (torchvision ``_make_divisible``)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 block with expansion == input width, so there is no expand conv:
    depthwise 3×3 → LayerNorm2d → hardswish → squeeze-excite → pointwise 1×1 → LayerNorm2d (+ residual
    when stride is 1)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False),
                LayerNorm2d(channels, eps=1e-5),
                nn.Hardswish(),
            ),
            SqueezeExcitation(channels, make_divisible(channels // 4, 8)),
            nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), LayerNorm2d(channels, eps=1e-5)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res_connect else out


class LDPBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # The Identity entries keep MobileVLM's indices (mlp.1, mlp.3, mb_block.1, mb_block.2).
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(out_dim, 1), InvertedResidual(out_dim, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grid_to_tokens(self.mb_block(tokens_to_grid(self.mlp(x))))


class LDPProjector(nn.Module):
    """MobileVLM v1 LDP: per-token MLP, then two inverted-residual blocks; the second (stride 2) keeps
    a quarter of the tokens."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.model = LDPBlock(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @staticmethod
    def num_tokens(num_in: int) -> int:
        return (math.isqrt(num_in) // 2) ** 2


class FeatureIRLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PosInjectLayer(nn.Module):
    """PEG (Chu et al., CPVT): a depthwise 3×3 conv added back as a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peg(x) + x


class LDPv2Projector(nn.Module):
    """MobileVLM v2: per-token MLP → 2×2 average pooling (4× fewer tokens) → PEG."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = FeatureIRLayer(in_dim, out_dim)
        self.peg = PosInjectLayer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # MobileVLM uses AdaptiveAvgPool2d to half the grid; on an even grid that is this 2×2 pool.
        grid = F.avg_pool2d(tokens_to_grid(self.mlp(x)), kernel_size=2, stride=2)
        return grid_to_tokens(self.peg(grid))

    @staticmethod
    def num_tokens(num_in: int) -> int:
        return LDPProjector.num_tokens(num_in)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions [grid*grid, dim] (MAE/Qwen-VL resampler style)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    pos = torch.cat(parts, dim=1)
    return F.pad(pos, (0, dim - pos.shape[1])).float()


class QueryProjector(nn.Module):
    """A fixed number of learned queries cross-attend to the vision features: the output length no
    longer depends on the image grid (Q-Former / Perceiver-resampler style connector)."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int, num_heads: int, grid: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.kv_proj = nn.Linear(in_dim, out_dim, bias=False)
        self.ln_q = nn.LayerNorm(out_dim)
        self.ln_kv = nn.LayerNorm(out_dim)
        self.attn = nn.MultiheadAttention(out_dim, num_heads, batch_first=True)
        self.ln_post = nn.LayerNorm(out_dim)
        self.proj = nn.Linear(out_dim, out_dim)
        self.grid = grid
        self.register_buffer("pos_embed", torch.empty(0), persistent=False)
        self.reset_buffers()
        self._num_queries = num_queries

    def reset_buffers(self) -> None:
        self.pos_embed = sincos_2d(self.grid, self.query.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).expand(x.shape[0], -1, -1)
        pos = self.pos_embed[: kv.shape[1]].to(kv.dtype)
        out, _ = self.attn(q, kv + pos, kv, need_weights=False)
        return self.proj(self.ln_post(out))

    def num_tokens(self, num_in: int) -> int:
        return self._num_queries


def build_projector(config: ProjectorConfig, vision: VisionConfig, text_hidden_size: int) -> nn.Module:
    """Build the connector named by ``config.type``."""
    in_dim = vision.hidden_size
    if config.type == "mlp2x_gelu":
        return MLP2xGeluProjector(in_dim, text_hidden_size)
    if config.type == "ldp":
        return LDPProjector(in_dim, text_hidden_size)
    if config.type == "ldpv2":
        return LDPv2Projector(in_dim, text_hidden_size)
    return QueryProjector(in_dim, text_hidden_size, config.num_queries, config.num_heads, vision.grid_size)
