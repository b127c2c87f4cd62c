"""Image + prompt → answer, over the PyTorch model: templating, tokenization with image placeholders,
image preprocessing, encoding and generation in one place.

Images go through the fused vision path (``edge_mllm.model.fused_vision``: uint8 RGB in, normalisation
and LayerNorm affines folded, one Q/K/V GEMM), as in the exported bundles; ``fuse_vision=False`` keeps
the reference modules (``MultimodalLM.encode_images``) it is tested against, and so does a model on a
GPU (training runs there; the fused path is the CPU's)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from tqdm import tqdm

from edge_mllm.chat import ChatTemplate, check_image_markers, user_message
from edge_mllm.checkpoint import LoadedModel, load_model
from edge_mllm.errors import EdgeMLLMError
from edge_mllm.generate import GenerationConfig, PromptCache, check_context, generate, generate_batch
from edge_mllm.model.fused_vision import FusedVisionEncoder
from edge_mllm.preprocess import ImageInput, ImageProcessor
from edge_mllm.tokenizer import StreamDecoder


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int  # LLM positions of the prompt, image tokens included
    finish_reason: str
    timings: dict[str, float | None] = field(default_factory=dict)  # decode_tokens_per_s: None for one token


def _file_key(images: Sequence[ImageInput]) -> tuple | None:
    """(path, mtime, size) per image when every image is a file path, else None (not cacheable)."""
    if not all(isinstance(image, str | Path) for image in images):
        return None
    try:
        stats = [(str(Path(image).resolve()), Path(image).stat()) for image in images]
    except OSError:
        return None  # let preprocessing report the missing file
    return tuple((path, st.st_mtime_ns, st.st_size) for path, st in stats)


class Pipeline:
    """A loaded model with everything needed to answer a prompt about images."""

    def __init__(self, loaded: LoadedModel, fuse_vision: bool = True, cache_prompt: bool = True):
        self.model = loaded.model.eval()
        # The last prompt's KV cache: the next question about the same image prefills only the question.
        self.prompt_cache = PromptCache() if cache_prompt else None
        self.fuse_vision = fuse_vision
        self.tokenizer = loaded.tokenizer
        self.chat_template = ChatTemplate(loaded.chat_template)
        vision = self.model.config.vision
        self.image_processor = None
        if vision is not None:
            self.image_processor = ImageProcessor(
                vision.image_size, vision.image_mean, vision.image_std, self.model.config.image_aspect_ratio
            )
        self._image_cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def load(cls, path: str | Path | None = None):
        """Load any supported checkpoint (``None``: the embedded default) as a ``Pipeline``, or an
        exported bundle into its own runtime (``edge_mllm.runtime``): both have this ``generate``."""
        from edge_mllm import runtime

        if runtime.is_bundle(path):
            return runtime.load(path)
        return cls(load_model(path))

    def render_prompt(self, prompt: str, num_images: int, raw: bool = False) -> str:
        """The text the tokenizer sees. ``raw`` skips the chat template; ``<image>`` marks images."""
        check_image_markers(prompt, num_images, raw)
        if raw:
            return prompt
        return self.chat_template.render([user_message(prompt, num_images)], self.tokenizer)

    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor | None:
        """Images → image embeddings [N, num_image_tokens, D]. The last set of image files is
        remembered, so several questions about the same image (evaluation) encode it once."""
        if not images:
            return None
        if self.image_processor is None:
            why = self.model.config.notes.get("mmproj")
            raise EdgeMLLMError("this model has no vision encoder: it cannot take images"
                                + (f" ({why})" if why else ""))
        key = _file_key(images)
        if key is not None and self._image_cache is not None and self._image_cache[0] == key:
            return self._image_cache[1]
        device = self.model.language_model.lm_head.weight.device
        with torch.inference_mode():
            if self.fuse_vision and device.type == "cpu":  # the phones' path; folded on the CPU
                embeds = self.fused_vision(torch.stack([self.image_processor.rgb(image) for image in images]))
            else:
                pixels = torch.stack([self.image_processor(image) for image in images]).to(device)
                embeds = self.model.encode_images(pixels)
        self._image_cache = (key, embeds) if key is not None else None
        return embeds

    @cached_property
    def fused_vision(self) -> FusedVisionEncoder:
        """The fused image path (uint8 RGB → image tokens), folded from the model's weights on first
        use: like an export, it is a snapshot, so make a new ``Pipeline`` after changing the weights."""
        return FusedVisionEncoder(self.model, rgb_max=255.0).eval()

    def generate(
        self,
        prompt: str,
        images: Sequence[ImageInput] = (),
        *,
        raw: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Answer ``prompt`` about ``images``; ``stream`` receives text as it is generated.
        ``stop_token_ids``: default the tokenizer's; ``()`` generates ``max_new_tokens``."""
        text = self.render_prompt(prompt, len(images), raw)
        token_ids = self.tokenizer.encode_with_images(text)
        stops = self.tokenizer.stop_token_ids() if stop_token_ids is None else tuple(stop_token_ids)
        config = GenerationConfig(max_new_tokens, temperature, top_p, seed, stops)
        prompt_len = self.model.prompt_length(token_ids)
        # Fail before the (slow) image encoding when the request cannot fit.
        check_context(prompt_len, max_new_tokens, self.model.config.text.max_position_embeddings)

        t0 = time.perf_counter()
        image_embeds = self.encode_images(images)
        t_vision = time.perf_counter() - t0
        with torch.inference_mode():
            inputs_embeds = self.model.embed_prompt(token_ids, image_embeds)
        decoder = StreamDecoder(self.tokenizer)
        on_token = (lambda tok: stream(decoder.push(tok))) if stream else None
        out = generate(self.model.language_model, inputs_embeds, config, on_token, self.prompt_cache)
        timings = {"vision_encode_s": t_vision, **out.timings}
        timings["time_to_first_token_s"] = t_vision + out.timings["prefill_s"]
        text = self.tokenizer.decode(out.token_ids)
        return GenerationResult(text, out.token_ids, prompt_len, out.finish_reason, timings)

    def generate_batch(
        self,
        prompts: Sequence[str],
        *,
        raw: bool = False,
        max_new_tokens: int = 256,
        stop_token_ids: Sequence[int] | None = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> list[GenerationResult]:
        """Greedy answers to text-only ``prompts``, in their order: prompts of one token length run
        together, up to ``batch_size`` at a time (``generate_batch``), several times faster than one
        by one on a CPU. Each answer is ``generate``'s up to floating-point rounding."""
        stops = self.tokenizer.stop_token_ids() if stop_token_ids is None else tuple(stop_token_ids)
        config = GenerationConfig(max_new_tokens, stop_token_ids=stops)
        encoded = [self.tokenizer.encode_with_images(self.render_prompt(p, 0, raw)) for p in prompts]
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(i)
        chunks = [group[k: k + batch_size] for group in by_length.values() for k in range(0, len(group), batch_size)]
        results: list[GenerationResult | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress) as bar:
            for chunk in chunks:
                with torch.inference_mode():
                    embeds = torch.cat([self.model.embed_prompt(encoded[i]) for i in chunk])
                for i, out in zip(chunk, generate_batch(self.model.language_model, embeds, config), strict=True):
                    results[i] = GenerationResult(self.tokenizer.decode(out.token_ids), out.token_ids,
                                                  len(encoded[i]), out.finish_reason, out.timings)
                bar.update(len(chunk))
        return results

    def info(self) -> dict:
        """Architecture, parameter counts and provenance, as ``edge-mllm info`` prints them."""
        config = self.model.config
        return {
            "config": config.to_dict(),
            "parameters": self.model.parameter_counts(),
            "image_tokens": self.model.num_image_tokens,
            "chat_template": self.chat_template.name,
            "notes": config.notes,
        }
