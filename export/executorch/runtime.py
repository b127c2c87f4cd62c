"""Run an ExecuTorch bundle from Python with ExecuTorch's own runtime (``executorch.runtime``).

``ExecuTorchRunner`` does what ExecuTorch's C++ ``MultimodalRunner`` does, one method call at a time
(vision_encoder → splice the image embeddings into the prompt → prefill with text_decoder → greedy
decode with token_embedding + text_decoder), so tests and benchmarks can see logits and timings; its
``generate`` is the shared :class:`BundleRuntime` loop.
``multimodal_runner`` opens the same bundle with the wheel's ``MultimodalRunner`` itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from edge_mllm.export import FORMATS

from edge_mllm.errors import CheckpointError, EdgeMLLMError
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX
from edge_mllm.preprocess import ImageInput, ImageProcessor
from edge_mllm.runtime.bundle import BundleRuntime

from .program import DECODER_METHOD, EMBEDDING_METHOD, VISION_METHOD


def load_kernels() -> None:
    """Register the kernels our programs use beyond the core library with the runtime (and PyTorch):
    ExecuTorch's ``llama::`` cache/attention ops and its quantized embedding ops. The pip wheel ships
    them as separate libraries; a program that needs them fails to load without this."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401


class ExecuTorchRunner(BundleRuntime):
    """A loaded ExecuTorch bundle: ``generate(prompt, images, max_new_tokens=…)``, plus each method."""

    formats = tuple(name for name, package in FORMATS.items() if package == "executorch")

    def __init__(self, bundle_dir: str | Path, manifest: dict | None = None, *, threads: int | None = None):
        from executorch.runtime import Runtime

        super().__init__(bundle_dir, manifest)
        if threads:  # XNNPACK's threadpool is process-wide
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        info = self.manifest.get("executorch")
        if not info or "program" not in info:
            raise CheckpointError(f"{self.path} is not an ExecuTorch bundle: its manifest has no executorch.program")
        load_kernels()
        self.program = Runtime.get().load_program(self.path / info["program"])
        self.context_length = self.max_seq_len = int(info["max_seq_len"])  # the static KV cache's positions
        self._methods: dict = {}

    @cached_property
    def image_processor(self) -> ImageProcessor | None:
        return super().image_processor if VISION_METHOD in self.program.method_names else None

    def method(self, name: str):
        """A loaded method (loaded once: the decoder's KV cache lives in it)."""
        if name not in self._methods:
            self._check_delegates(name)
            self._methods[name] = self.program.load_method(name)
        return self._methods[name]

    def _check_delegates(self, name: str) -> None:
        """A method lowered to a backend this runtime lacks (Core ML, Vulkan, QNN… on this host) fails to
        load with a bare error code: name the backend and where it runs instead."""
        from executorch.runtime import Runtime

        info = self.manifest["executorch"]
        here = set(Runtime.get().backend_registry.registered_backend_names)
        missing = sorted(set(info.get("delegates", {}).get(name, {})) - here)
        if missing:
            raise EdgeMLLMError(f"{self.path}: its {name} runs on {', '.join(missing)}, which the installed executorch "
                                f"runtime does not include (it has {', '.join(sorted(here))}); the bundle is for "
                                f"{info.get('runtime', 'another runtime')}")

    def encode_image(self, image: ImageInput | torch.Tensor) -> torch.Tensor:
        """An image (any ``ImageInput``, or normalised pixels [3, S, S]) → embeddings [N, D]. The
        ``vision_encoder`` method is fed what it reads (manifest ``vision_input``: uint8 RGB for the
        fused encoder)."""
        if self.image_processor is None:
            raise EdgeMLLMError("this bundle has no vision encoder: it cannot take images")
        if isinstance(image, torch.Tensor):
            pixels = self.vision_pixels(image)
        else:
            pixels = self.image_processor.vision_input(image, self.vision_input)
        return self.method(VISION_METHOD).execute([pixels.reshape(1, *pixels.shape[-3:])])[0][0]

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        return self.method(EMBEDDING_METHOD).execute([torch.tensor([list(ids)], dtype=torch.long)])[0][0]

    def decode(self, embeds: torch.Tensor, start_pos: int) -> torch.Tensor:
        """``text_decoder``: embeddings [T, D] at positions start_pos… → logits of the last one [V]."""
        return self.method(DECODER_METHOD).execute([embeds.unsqueeze(0), torch.tensor([start_pos])])[0][0]

    def embed_prompt(self, prompt_ids: Sequence[int], images: Sequence[ImageInput | torch.Tensor]) -> torch.Tensor:
        """Token ids with ``IMAGE_TOKEN_INDEX`` placeholders + images (or their embeddings) → embeddings [T, D]."""
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
                image = images[next_image]
                is_embeds = isinstance(image, torch.Tensor) and image.ndim == 2
                pieces.append(image if is_embeds else self.encode_image(image))
                next_image += 1
        return torch.cat(pieces)

    # BundleRuntime's steps: the KV cache lives in the loaded text_decoder method
    def encode_images(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return [self.encode_image(p) for p in pixels]

    def prefill(self, token_ids: list[int], image_embeds: list[torch.Tensor] | None) -> torch.Tensor:
        return self.decode(self.embed_prompt(token_ids, image_embeds or []), 0)

    def decode_one(self, token: int, position: int) -> torch.Tensor:
        return self.decode(self.embed_tokens([token]), position)


RUNTIME = ExecuTorchRunner


def multimodal_runner(bundle_dir: str | Path, tokenizer: str | Path | None = None):
    """ExecuTorch's own ``MultimodalRunner`` (pip wheel, ``executorch.extension.llm.runner``) on a bundle.
    Feed it ``make_token_input`` / ``make_text_input`` / ``make_image_input(image)``, the image as the
    manifest's ``image_preprocessing.vision_input`` says: uint8 RGB [3, S, S] for a fused
    ``vision_encoder`` (``ImageProcessor.rgb``), normalised float32 otherwise. The runner passes it
    through unchanged and refuses a dtype other than the method's.

    ``tokenizer``: default the bundle's tokenizer folder (its ``tokenizer_config.json`` gives the
    runner BOS/EOS; ``tokenizer.json`` alone leaves them 0)."""
    load_kernels()
    from executorch.extension.llm.runner import MultimodalRunner

    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    if tokenizer is None:
        tokenizer = bundle_dir / Path(manifest["tokenizer"]).parent
    return MultimodalRunner(str(bundle_dir / manifest["executorch"]["program"]), str(tokenizer))
