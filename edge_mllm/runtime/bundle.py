"""What every exported bundle's runtime shares: the manifest, tokenizer, chat template, image
preprocessing and stop tokens, and the greedy generation loop with its timings.

A format's runtime (``edge_mllm.export.<format>.runtime``) subclasses :class:`BundleRuntime` and
supplies three steps — encode images, prefill a prompt, decode one token — in its own runtime.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from edge_mllm.chat import ChatTemplate, check_image_markers, user_message
from edge_mllm.errors import CheckpointError, ContextLengthError, EdgeMLLMError, OptionError
from edge_mllm.export import MANIFEST
from edge_mllm.fsutil import sha256
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX
from edge_mllm.pipeline import GenerationResult
from edge_mllm.preprocess import NORMALIZED, ImageInput, ImageProcessor
from edge_mllm.tokenizer import StreamDecoder, Tokenizer

# Images: files / PIL images / arrays, or pixels already normalised [N, 3, H, W].
Images = Sequence[ImageInput] | np.ndarray | torch.Tensor


def read_manifest(bundle_dir: str | Path) -> dict:
    """A bundle's ``manifest.json``, or a one-line error saying why the folder is not a bundle."""
    path = Path(bundle_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{bundle_dir} is not an exported bundle: {MANIFEST} is missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} is malformed: not a bundle manifest")
    # what every exporter writes and every reader needs: the file list is checked before any load
    needed = {"format": str, "files": list, "model": dict}
    wrong = [key for key, kind in needed.items() if not isinstance(manifest.get(key), kind)]
    if wrong:
        raise CheckpointError(f"{path} is malformed: {', '.join(repr(k) for k in wrong)} missing or of the wrong type")
    return manifest


def verify_files(bundle_dir: Path, manifest: dict) -> None:
    """Every file the manifest lists is there with its size and sha256 (as the Android app checks on
    Load), so a missing, truncated or corrupt copy is named rather than failing in the runtime (or,
    corrupt but complete, answering wrongly)."""
    for entry in manifest.get("files", []):
        try:
            path, size, digest = bundle_dir / entry["path"], int(entry["size"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{bundle_dir / MANIFEST} is malformed: bad files entry {entry!r}") from None
        if not path.is_file():
            raise CheckpointError(f"bundle file {path} is missing: copy the bundle again")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"bundle file {path} is {actual} bytes, {MANIFEST} says {size}: "
                                  "truncated or replaced; copy the bundle again")
        if sha256(path) != digest:
            raise CheckpointError(f"bundle file {path} is corrupt (its sha256 differs from {MANIFEST}'s): "
                                  "copy the bundle again")


class BundleRuntime(ABC):
    """An exported bundle loaded in its runtime: ``generate(prompt, images, max_new_tokens=…)``."""

    formats: ClassVar[tuple[str, ...]]  # the manifest ``format`` values this runtime loads

    def __init__(self, bundle_dir: str | Path, manifest: dict | None = None):
        self.path = Path(bundle_dir)
        self.manifest = read_manifest(self.path) if manifest is None else manifest
        fmt = self.manifest.get("format")
        if fmt not in self.formats:
            raise CheckpointError(f"{self.path} is a {fmt!r} bundle, not {' / '.join(self.formats)}")
        section = fmt.split("-")[0]  # the format's own settings (executorch-coreml's are under executorch)
        if not isinstance(self.manifest.get(section), dict):
            raise CheckpointError(f"{self.path / MANIFEST} is malformed: its {section!r} section is missing")
        verify_files(self.path, self.manifest)
        try:
            self.stop_token_ids = tuple(int(t) for t in self.manifest.get("special_tokens", {}).get("stop", ()))
            self.context_length = int(self.manifest.get("max_seq_len") or 0)  # a format may cap it lower
            self.image_token_count = int(self.manifest.get("image_token_count") or 0)
        except (AttributeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path / MANIFEST} is malformed: {exc}") from None

    # ------------------------------------------------------------------------------------------
    # text and images, the same for every format

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The bundle's tokenizer folder (named by the manifest), loaded on first use."""
        tokenizer_file = self.manifest.get("tokenizer", "tokenizer/tokenizer.json")
        return Tokenizer.from_folder(self.path / Path(tokenizer_file).parent)

    @cached_property
    def image_processor(self) -> ImageProcessor | None:
        spec = self.manifest.get("image_preprocessing")
        if not spec:
            return None
        return ImageProcessor(spec["image_size"], tuple(spec["image_mean"]), tuple(spec["image_std"]),
                              spec["aspect_ratio"])

    def prompt_ids(self, prompt: str | Sequence[int], num_images: int, raw: bool = False) -> list[int]:
        """Token ids with one ``IMAGE_TOKEN_INDEX`` per image: ``prompt`` rendered with the bundle's chat
        template (unless ``raw``: ``<image>`` then marks images), or ids passed through."""
        if isinstance(prompt, str):
            check_image_markers(prompt, num_images, raw)
            if not raw:
                template = ChatTemplate(self.manifest.get("chat_template", "tokenizer"))
                prompt = template.render([user_message(prompt, num_images)], self.tokenizer)
            return self.tokenizer.encode_with_images(prompt)
        ids = list(prompt)
        if ids.count(IMAGE_TOKEN_INDEX) != num_images:
            raise OptionError(f"the prompt has {ids.count(IMAGE_TOKEN_INDEX)} image placeholder(s) "
                              f"but {num_images} image(s) were given")
        return ids

    @cached_property
    def vision_input(self) -> str:
        """What the bundle's vision graph reads (``edge_mllm.preprocess.VISION_INPUTS``); bundles from
        before fused vision graphs read normalised pixels."""
        return (self.manifest.get("image_preprocessing") or {}).get("vision_input", NORMALIZED)

    def vision_pixels(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N, 3, S, S] (what :meth:`pixels` gives) → the vision graph's input."""
        if self.image_processor is None:
            raise EdgeMLLMError("this bundle has no vision encoder: it cannot take images")
        return self.image_processor.from_normalized(torch.as_tensor(pixels), self.vision_input)

    def pixels(self, images: Images) -> torch.Tensor | None:
        """Images → normalised pixels [N, 3, S, S] float32 (None for no images)."""
        if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
            return torch.as_tensor(images, dtype=torch.float32)
        if len(images) == 0:
            return None
        if self.image_processor is None:
            raise EdgeMLLMError("this bundle has no vision encoder: it cannot take images")
        return torch.stack([self.image_processor(image) for image in images])

    # ------------------------------------------------------------------------------------------
    # the format's three steps

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> Any:
        """Normalised pixels [N, 3, S, S] → image embeddings, in whatever form :meth:`prefill` takes."""

    @abstractmethod
    def prefill(self, token_ids: list[int], image_embeds: Any) -> torch.Tensor:
        """Run the prompt (ids with ``IMAGE_TOKEN_INDEX`` placeholders) from an empty cache → logits of
        its last position [V]."""

    @abstractmethod
    def decode_one(self, token: int, position: int) -> torch.Tensor:
        """Feed one generated token at ``position`` → logits [V]."""

    # ------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        images: Images = (),
        *,
        raw: bool = False,
        max_new_tokens: int = 256,
        stop_token_ids: Sequence[int] | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Greedy answer to ``prompt`` (text, or ids with ``IMAGE_TOKEN_INDEX`` placeholders) about
        ``images``. ``stop_token_ids``: default the bundle's; ``()`` generates ``max_new_tokens``.
        ``stream`` receives text as it is generated."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        pixels = self.pixels(images)
        token_ids = self.prompt_ids(prompt, 0 if pixels is None else len(pixels), raw)
        stop = set(self.stop_token_ids if stop_token_ids is None else stop_token_ids)
        decoder = StreamDecoder(self.tokenizer) if stream else None
        prompt_len = len(token_ids) + token_ids.count(IMAGE_TOKEN_INDEX) * (self.image_token_count - 1)
        if self.context_length and prompt_len + max_new_tokens > self.context_length:  # before any work
            own = int(self.manifest.get("max_seq_len") or 0)
            capped = f" (this runtime's cap; the bundle's is {own})" if own > self.context_length else ""
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens, images included) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the context of {self.context_length} tokens{capped}")

        t0 = time.perf_counter()
        image_embeds = None if pixels is None else self.encode_images(pixels)
        t_vision = time.perf_counter()
        logits = self.prefill(token_ids, image_embeds)
        t_first = time.perf_counter()
        tokens, finish = [], "length"
        for position in range(prompt_len, prompt_len + max_new_tokens):
            token = int(torch.argmax(logits))
            if token in stop:
                finish = "stop"
                break
            tokens.append(token)
            if decoder is not None:
                stream(decoder.push(token))
            if len(tokens) == max_new_tokens:
                break
            logits = self.decode_one(token, position)
        t_end = time.perf_counter()
        steps = max(len(tokens) - 1, 0)
        timings = {
            "vision_encode_s": t_vision - t0,
            "prefill_s": t_first - t_vision,
            "decode_s": t_end - t_first,
            "time_to_first_token_s": t_first - t0,
            "prefill_tokens_per_s": prompt_len / max(t_first - t_vision, 1e-9),
            "decode_tokens_per_s": steps / (t_end - t_first) if steps else None,  # one token: no decode step
        }
        return GenerationResult(self.tokenizer.decode(tokens), tokens, prompt_len, finish, timings)
