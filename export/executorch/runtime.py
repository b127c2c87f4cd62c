"""Run an ExecuTorch bundle from Python with ExecuTorch's own runtime (``executorch.runtime``).

``ExecuTorchRunner`` does what ExecuTorch's C++ ``MultimodalRunner`` does, one method call at a time
(vision_encoder → splice the image embeddings into the prompt → prefill with text_decoder → greedy
decode with token_embedding + text_decoder), so tests and benchmarks can see logits and timings.
``multimodal_runner`` opens the same bundle with the wheel's ``MultimodalRunner`` itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edge_mllm.errors import CheckpointError, ContextLengthError, EdgeMLLMError
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX
from edge_mllm.preprocess import ImageInput, ImageProcessor
from edge_mllm.tokenizer import Tokenizer

from .program import DECODER_METHOD, EMBEDDING_METHOD, VISION_METHOD


def load_kernels() -> None:
    """Register the kernels our programs use beyond the core library with the runtime (and PyTorch):
    ExecuTorch's ``llama::`` cache/attention ops and its quantized embedding ops. The pip wheel ships
    them as separate libraries; a program that needs them fails to load without this."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401


@dataclass
class RunnerOutput:
    token_ids: list[int]
    text: str
    prompt_tokens: int  # LLM positions of the prompt, image tokens included
    finish_reason: str  # "stop" or "length"
    logits: list[torch.Tensor] = field(default_factory=list)  # per generated token, when asked for
    timings: dict[str, float] = field(default_factory=dict)


class ExecuTorchRunner:
    """A loaded ExecuTorch bundle: ``generate(prompt_ids, images, max_new_tokens)``."""

    def __init__(self, bundle_dir: str | Path):
        from executorch.runtime import Runtime

        self.bundle_dir = Path(bundle_dir)
        try:
            self.manifest = json.loads((self.bundle_dir / "manifest.json").read_text())
            info = self.manifest["executorch"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.bundle_dir} is not an ExecuTorch bundle: {exc}") from exc
        load_kernels()
        self.program = Runtime.get().load_program(self.bundle_dir / info["program"])
        self.max_seq_len = int(info["max_seq_len"])
        self.tokenizer = Tokenizer.from_folder(self.bundle_dir / Path(self.manifest["tokenizer"]).parent)
        self.stop_ids = set(self.manifest["special_tokens"]["stop"])
        self._methods: dict = {}
        prep = self.manifest.get("image_preprocessing")
        self.image_processor = None
        if prep is not None and VISION_METHOD in self.program.method_names:
            self.image_processor = ImageProcessor(
                prep["image_size"], tuple(prep["image_mean"]), tuple(prep["image_std"]), prep["aspect_ratio"]
            )

    def method(self, name: str):
        """A loaded method (loaded once: the decoder's KV cache lives in it)."""
        if name not in self._methods:
            self._methods[name] = self.program.load_method(name)
        return self._methods[name]

    def encode_image(self, image: ImageInput | torch.Tensor) -> torch.Tensor:
        """An image (any ``ImageInput``, or preprocessed pixels [3, S, S]) → embeddings [N, D]."""
        if self.image_processor is None:
            raise EdgeMLLMError("this bundle has no vision encoder: it cannot take images")
        pixels = image if isinstance(image, torch.Tensor) else self.image_processor(image)
        return self.method(VISION_METHOD).execute([pixels.float().reshape(1, *pixels.shape[-3:])])[0][0]

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        return self.method(EMBEDDING_METHOD).execute([torch.tensor([list(ids)], dtype=torch.long)])[0][0]

    def decode(self, embeds: torch.Tensor, start_pos: int) -> torch.Tensor:
        """``text_decoder``: embeddings [T, D] at positions start_pos… → logits of the last one [V]."""
        return self.method(DECODER_METHOD).execute([embeds.unsqueeze(0), torch.tensor([start_pos])])[0][0]

    def embed_prompt(self, prompt_ids: Sequence[int], images: Sequence[ImageInput | torch.Tensor]) -> torch.Tensor:
        """Token ids with ``IMAGE_TOKEN_INDEX`` placeholders + images → embeddings [T, D]."""
        if list(prompt_ids).count(IMAGE_TOKEN_INDEX) != len(images):
            raise EdgeMLLMError(f"prompt has {list(prompt_ids).count(IMAGE_TOKEN_INDEX)} image placeholder(s) "
                                f"but {len(images)} image(s) were given")
        pieces, run, next_image = [], [], 0
        for tok in [*prompt_ids, None]:  # the sentinel flushes the last text run
            if tok is not None and tok != IMAGE_TOKEN_INDEX:
                run.append(tok)
                continue
            if run:
                pieces.append(self.embed_tokens(run))
                run = []
            if tok == IMAGE_TOKEN_INDEX:
                pieces.append(self.encode_image(images[next_image]))
                next_image += 1
        return torch.cat(pieces)

    def generate(
        self,
        prompt_ids: Sequence[int],
        images: Sequence[ImageInput | torch.Tensor] = (),
        max_new_tokens: int = 256,
        *,
        stop: bool = True,
        return_logits: bool = False,
    ) -> RunnerOutput:
        """Greedy generation. ``prompt_ids`` may hold ``IMAGE_TOKEN_INDEX`` placeholders, filled in order
        by ``images``; ``stop=False`` ignores stop tokens (fixed-length comparisons)."""
        t0 = time.perf_counter()
        embeds = self.embed_prompt(prompt_ids, images)
        t_embed = time.perf_counter()
        prompt_len = embeds.shape[0]
        if prompt_len + max_new_tokens > self.max_seq_len:
            raise ContextLengthError(f"prompt ({prompt_len} positions) + {max_new_tokens} new tokens exceed the "
                                     f"bundle's {self.max_seq_len}-position KV cache")
        logits = self.decode(embeds, 0)
        t_prefill = time.perf_counter()
        tokens, kept, finish = [], [], "length"
        for pos in range(prompt_len, prompt_len + max_new_tokens):
            token = int(torch.argmax(logits))
            if stop and token in self.stop_ids:
                finish = "stop"
                break
            tokens.append(token)
            if return_logits:
                kept.append(logits.clone())
            if len(tokens) == max_new_tokens:
                break
            logits = self.decode(self.embed_tokens([token]), pos)
        t_end = time.perf_counter()
        timings = {
            "encode_s": t_embed - t0,
            "prefill_s": t_prefill - t_embed,
            "decode_s": t_end - t_prefill,
            "prefill_tokens_per_s": prompt_len / max(t_prefill - t_embed, 1e-9),
            "decode_tokens_per_s": max(len(tokens) - 1, 0) / max(t_end - t_prefill, 1e-9),
        }
        return RunnerOutput(tokens, self.tokenizer.decode(tokens), prompt_len, finish, kept, timings)


def multimodal_runner(bundle_dir: str | Path, tokenizer: str | Path | None = None):
    """ExecuTorch's own ``MultimodalRunner`` (pip wheel, ``executorch.extension.llm.runner``) on a bundle.
    Feed it ``make_token_input`` / ``make_text_input`` / ``make_image_input(pixels [3, S, S] float32)``.

    ``tokenizer``: default the bundle's tokenizer folder (its ``tokenizer_config.json`` gives the
    runner BOS/EOS; ``tokenizer.json`` alone leaves them 0)."""
    load_kernels()
    from executorch.extension.llm.runner import MultimodalRunner

    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    if tokenizer is None:
        tokenizer = bundle_dir / Path(manifest["tokenizer"]).parent
    return MultimodalRunner(str(bundle_dir / manifest["executorch"]["program"]), str(tokenizer))
