"""The assembled model: vision encoder → connector → LLM, with image embeddings spliced into the
prompt where it holds the image placeholder id (LLaVA / MobileVLM ``IMAGE_TOKEN_INDEX``)."""

from __future__ import annotations

import torch
from torch import nn

from edge_mllm.config import MLLMConfig
from edge_mllm.model.connectors import build_projector
from edge_mllm.model.llama import LlamaForCausalLM
from edge_mllm.model.vision import CLIPVisionTower

# Placeholder id for "an image goes here" in token-id lists (LLaVA/MobileVLM use the same value).
IMAGE_TOKEN_INDEX = -200


class MultimodalLM(nn.Module):
    """A MobileVLM/LLaVA-style model. Submodule names follow MobileVLM checkpoints (``vision_tower``,
    ``mm_projector``) and the language model is a plain ``LlamaForCausalLM``."""

    def __init__(self, config: MLLMConfig):
        super().__init__()
        self.config = config
        self.language_model = LlamaForCausalLM(config.text)
        if config.has_vision:
            self.vision_tower = CLIPVisionTower(config.vision)
            self.mm_projector = build_projector(config.projector, config.vision, config.text.hidden_size)
        else:
            self.vision_tower = None
            self.mm_projector = None

    @classmethod
    def empty(cls, config: MLLMConfig) -> MultimodalLM:
        """A model with uninitialised parameters, for loaders that overwrite every one of them:
        skips the random init (seconds for a 100M+ model)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        model.language_model.tie_weights()  # to_empty gives each parameter its own storage
        for module in model.modules():
            if module is not model and hasattr(module, "reset_buffers"):
                module.reset_buffers()
        return model

    @property
    def num_image_tokens(self) -> int:
        """LLM positions one image takes."""
        if not self.config.has_vision:
            return 0
        return self.mm_projector.num_tokens(self.config.vision.num_feature_tokens)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] → LLM-ready image embeddings [B, num_image_tokens, D]."""
        if self.vision_tower is None:
            raise ValueError("this model has no vision encoder")
        return self.mm_projector(self.vision_tower(pixel_values))

    def embed_prompt(self, token_ids: list[int], image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids with ``IMAGE_TOKEN_INDEX`` placeholders → inputs_embeds [1, T, D].

        ``image_embeds`` [num_images, N, D] fills the placeholders in order.
        """
        n_placeholders = token_ids.count(IMAGE_TOKEN_INDEX)
        n_images = 0 if image_embeds is None else image_embeds.shape[0]
        if n_placeholders != n_images:
            raise ValueError(f"prompt has {n_placeholders} image placeholder(s) but {n_images} image(s) were given")
        device = self.language_model.lm_head.weight.device
        pieces, text_run, next_image = [], [], 0
        for tok in token_ids + [None]:  # sentinel flushes the last text run
            if tok is not None and tok != IMAGE_TOKEN_INDEX:
                text_run.append(tok)
                continue
            if text_run:
                pieces.append(self.language_model.embed(torch.tensor(text_run, device=device)))
                text_run = []
            if tok == IMAGE_TOKEN_INDEX:
                pieces.append(image_embeds[next_image].to(pieces[0].dtype if pieces else image_embeds.dtype))
                next_image += 1
        return torch.cat(pieces, dim=0).unsqueeze(0)

    def prompt_length(self, token_ids: list[int]) -> int:
        """LLM positions a prompt takes once its image placeholders are expanded."""
        n_images = token_ids.count(IMAGE_TOKEN_INDEX)
        return len(token_ids) - n_images + n_images * self.num_image_tokens

    def forward(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.language_model(inputs_embeds, input_pos)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component (tied embeddings counted once)."""

        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        return {
            "vision_tower": count(self.vision_tower),
            "mm_projector": count(self.mm_projector),
            "language_model": count(self.language_model),
        }
