"""Export bundles: one small interface every format implements, and the steps they share.

A bundle is a folder: the format's artifacts, the tokenizer files and ``manifest.json`` (format,
quantization, every file with its size and sha256, model config, chat template, image preprocessing,
image token count, max sequence length, special token ids, edge-mllm version). ``export_bundle``
writes it atomically (nothing is left at the destination on failure) and deterministically.

Formats register themselves with :func:`register`; nothing outside a format's module knows its
details. The stages mirror ExecuTorch's ``extension/llm`` export: resolve the quantization, check the
model is exportable (before any slow work), write the artifacts, describe them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import ClassVar

import torch
from edge_mllm.export import FORMATS, MANIFEST
from edge_mllm.quant.scheme import QuantScheme
from edge_mllm.quant.storage import QuantizedWeights

from edge_mllm import __version__
from edge_mllm.chat import ChatTemplate, user_message
from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.errors import ConfigError, EdgeMLLMError, OptionError, QuantError
from edge_mllm.fsutil import atomic_output_dir, sha256
from edge_mllm.preprocess import NORMALIZED, RGB_UINT8
from edge_mllm.runtime import is_bundle

TOKENIZER_DIR = "tokenizer"


class Backend(ABC):
    """One export format."""

    name: ClassVar[str]
    # Quantization types the format's own tools produce (e.g. llama.cpp's "q4_k_m"), besides our schemes.
    native_quant: ClassVar[tuple[str, ...]] = ()
    # Write option: the vision part as one fused graph (``edge_mllm.model.fused_vision``) where the format
    # runs our graph; the format's part of the manifest then names the graph's input as "vision_input".
    fuse_vision: bool = True
    # Write option: the vision tower's matrices as int8 weights, through the format's own int8 path;
    # a format without one says why here (None: it has one).
    int8_vision: bool = False
    int8_vision_unsupported: ClassVar[str | None] = "this format has no int8 vision option"
    # Write option: 4-bit linears read their inputs as two int8 digits (about 12 bits) where the
    # format's GEMMs round activations to int8; a format without that says why here.
    two_digit_activations: bool = False
    two_digit_unsupported: ClassVar[str | None] = "its 4-bit GEMMs do not round activations to int8 per token"
    # Write option: the calibration inputs the quantization was computed on (None: it needed none), for
    # a format that calibrates something of its own, so one export builds them once.
    calibration: Sequence[torch.Tensor] | None = None
    # Where in the bundle the tokenizer files go ("": its root), as the format's own runtime looks for them.
    tokenizer_dir: ClassVar[str] = TOKENIZER_DIR

    @abstractmethod
    def check(self, loaded: LoadedModel, scheme: QuantScheme | None, native_quant: str | None) -> None:
        """Raise ConfigError / QuantError if this model or quantization cannot be exported. Runs before
        any slow work (quantization included), so it must be fast."""

    @abstractmethod
    def write(
        self,
        loaded: LoadedModel,
        out_dir: Path,
        weights: QuantizedWeights | None,
        native_quant: str | None,
        progress: bool,
    ) -> dict:
        """Write the artifacts into ``out_dir`` (an empty temporary folder); return the format's part
        of the manifest (e.g. which file is the decoder, method names, runtime settings)."""


BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a format available to ``export_bundle`` under ``cls.name``."""
    BACKENDS[cls.name] = cls
    return cls


def backend(name: str) -> Backend:
    """The registered backend called ``name`` (one of ``FORMATS``)."""
    if name in FORMATS and name not in BACKENDS:
        import importlib

        importlib.import_module(f"edge_mllm.export.{FORMATS[name]}.bundle")
    if name not in BACKENDS:
        raise ConfigError(f"unknown export format {name!r}; choose one of {', '.join({**FORMATS, **BACKENDS})}")
    return BACKENDS[name]()


def image_preprocessing(loaded: LoadedModel, vision_input: str = NORMALIZED) -> dict | None:
    """What an app must do to an image before the vision encoder (``edge_mllm.preprocess``).
    ``vision_input``: what the bundle's vision graph reads (``edge_mllm.preprocess.VISION_INPUTS``):
    normalised float32, RGB float32 in [0, 1], or uint8 RGB; resizing, cropping and padding to square
    are the app's in every case."""
    config = loaded.model.config
    if not config.has_vision:
        return None
    v = config.vision
    return {
        "image_size": v.image_size,
        "resize": "shortest_side_bicubic_then_center_crop",
        "aspect_ratio": config.image_aspect_ratio,  # "pad": pad to square with the mean colour first
        "rescale_factor": 1 / 255,
        "image_mean": list(v.image_mean),
        "image_std": list(v.image_std),
        "layout": "NCHW float32 RGB" if vision_input != RGB_UINT8 else "NCHW uint8 RGB",
        "vision_input": vision_input,
    }


def prompt_template(loaded: LoadedModel) -> dict[str, str] | None:
    """One user turn of the chat template as plain strings: the prompt for a question about N images
    is ``prefix + image * N + question + suffix`` (``edge_mllm.chat.user_message``), which is what
    ``edge-mllm run`` renders. Apps that cannot run the tokenizer's Jinja template use this; None
    for a template that changes the user's text (no such strings exist)."""
    try:
        prefix, suffix = ChatTemplate(loaded.chat_template).around_user_turn(loaded.tokenizer)
    except EdgeMLLMError:
        return None
    image = user_message("", 1)["content"]
    return {"prefix": prefix, "image": image, "suffix": suffix}


def build_manifest(
    loaded: LoadedModel, fmt: str, out_dir: Path, quant: str | None, format_info: dict,
    tokenizer_dir: str = TOKENIZER_DIR,
) -> dict:
    """The manifest of the bundle in ``out_dir`` (every file there is listed; the tokenizer's in
    ``tokenizer_dir``)."""
    tok = loaded.tokenizer
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {
        "format": fmt,
        "edge_mllm_version": __version__,
        "quantization": quant,
        "files": [{"path": p.relative_to(out_dir).as_posix(), "size": p.stat().st_size, "sha256": sha256(p)}
                  for p in files],
        "model": loaded.model.config.to_dict(),
        "tokenizer": PurePosixPath(tokenizer_dir, "tokenizer.json").as_posix(),
        "chat_template": loaded.chat_template,
        "prompt_template": prompt_template(loaded),
        "image_preprocessing": image_preprocessing(loaded, format_info.get("vision_input", NORMALIZED)),
        "image_token_count": loaded.model.num_image_tokens,
        # the positions the bundle's runtime holds (ExecuTorch's static KV cache may be fewer than the model's)
        "max_seq_len": format_info.get("max_seq_len", loaded.model.config.text.max_position_embeddings),
        "special_tokens": {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "stop": list(tok.stop_token_ids())},
        format_info.get("key", fmt): {k: v for k, v in format_info.items() if k not in ("key", "vision_input")},
    }


def check_options(fmt: str | None, quant: str | None, int8_vision: bool = False,
                  two_digit_activations: bool = False) -> None:
    """Raise ConfigError / QuantError for export options no model could satisfy: an unknown format, a
    ``quant`` that is neither one of our schemes nor a native type of ``fmt`` (of any format when
    ``fmt`` is None, i.e. still to be picked), int8 vision or two-digit activations in a format without
    them. It needs no model,
    so the CLI runs it before loading one and reports these as usage errors."""
    targets = [backend(fmt)] if fmt is not None else [backend(name) for name in FORMATS]
    if int8_vision and fmt is not None and targets[0].int8_vision_unsupported:
        raise ConfigError(f"int8 vision weights in {fmt} bundles: {targets[0].int8_vision_unsupported}")
    if two_digit_activations and fmt is not None and targets[0].two_digit_unsupported:
        raise ConfigError(f"two-digit activations in {fmt} bundles: {targets[0].two_digit_unsupported}")
    native = sorted({name for t in targets for name in t.native_quant})
    if quant is None or quant.lower() in native:
        return
    try:
        QuantScheme.parse(quant)
    except QuantError as exc:
        raise QuantError(f"{exc}; or {fmt or 'a format'}'s own types: {', '.join(native)}") from exc


def parse_quant(loaded: LoadedModel, target: Backend, quant: str | None) -> tuple[QuantScheme | None, str | None]:
    """``quant`` → (our scheme, or the format's native type). None keeps a quantized model's own codes
    (or exports floats)."""
    if quant is None:
        return (None if loaded.quantization is None else QuantScheme.parse(loaded.quantization.scheme)), None
    if quant.lower() in target.native_quant:
        if loaded.quantization is not None:
            raise OptionError(f"the model is already quantized ({loaded.quantization.scheme}); "
                              f"{quant} would quantize it again: export it without --quant")
        return None, quant.lower()
    scheme = QuantScheme.parse(quant)  # a QuantError lists the valid names
    if loaded.quantization is not None and loaded.quantization.scheme != scheme.name:
        raise OptionError(f"the model is already quantized ({loaded.quantization.scheme}); export it without --quant")
    return scheme, None


def needed_calibration(loaded: LoadedModel, scheme: QuantScheme | None) -> list[torch.Tensor] | None:
    """The calibration inputs quantizing ``loaded`` with ``scheme`` needs (None: none, or the model
    already carries its codes)."""
    from edge_mllm.quant.calibration import calibration_set

    if scheme is None or not scheme.needs_calibration or loaded.quantization is not None:
        return None
    return calibration_set(loaded)


def quantized_weights(
    loaded: LoadedModel, scheme: QuantScheme | None, calibration: Sequence[torch.Tensor] | None = None
) -> QuantizedWeights | None:
    """The codes to export: the model's own, or ``scheme`` applied to ``loaded`` (in place), on
    ``calibration`` (built here if the scheme needs it and none is given)."""
    from edge_mllm.quant.quantize import quantize_model

    if scheme is None or loaded.quantization is not None:
        return loaded.quantization
    if calibration is None:
        calibration = needed_calibration(loaded, scheme)
    loaded.quantization = quantize_model(loaded.model, scheme, calibration).weights()
    return loaded.quantization


@contextmanager
def context_capped(loaded: LoadedModel, max_context: int | None) -> Iterator[None]:
    """Within the block, the model's context is at most ``max_context`` positions: what every format
    sizes from it sees fewer (ExecuTorch's preallocated KV cache, llama.cpp's n_ctx, ONNX Runtime
    GenAI's context_length, the manifest's max_seq_len). RoPE tables are only ever sliced, so a lower
    limit is safe; the model is left as it was."""
    text = loaded.model.config.text
    own = text.max_position_embeddings
    if max_context is not None and max_context < 1:
        raise ConfigError(f"max context must be at least 1 position, not {max_context}")
    image_tokens = loaded.model.num_image_tokens if loaded.model.config.has_vision else 0
    if max_context is not None and max_context <= image_tokens:
        raise ConfigError(f"max context {max_context} leaves no room for a prompt: one image alone takes "
                          f"{image_tokens} positions")
    text.max_position_embeddings = own if max_context is None else min(own, max_context)
    try:
        yield
    finally:
        text.max_position_embeddings = own


def export_bundle(
    loaded: LoadedModel, fmt: str, out_dir: str | Path, *, quant: str | None = None, progress: bool = True,
    fuse_vision: bool = True, int8_vision: bool = False, max_context: int | None = None,
    manifest_extra: dict | None = None, two_digit_activations: bool = False,
) -> Path:
    """Export ``loaded`` as a ``fmt`` bundle at ``out_dir`` (replaced only on success).

    ``quant``: one of our schemes (``awq-w4-g32``…), a format-native type (``q4_k_m`` for GGUF…), or
    None (floats, or a quantized model's own codes). ``fuse_vision``: the vision part as the fused graph
    (``Backend.fuse_vision``); False keeps the reference one, which reads normalised pixels.
    ``int8_vision``: the vision tower's matrices as int8 (``Backend.int8_vision``).
    ``two_digit_activations``: 4-bit linears read their inputs as two int8 digits
    (``Backend.two_digit_activations``). ``max_context``: cap the bundle's context (prompt + image
    tokens + answer) below the model's (:func:`context_capped`). ``manifest_extra``: more top-level
    manifest keys (e.g. ``target``)."""
    check_options(fmt, quant, int8_vision, two_digit_activations)
    target = backend(fmt)
    target.fuse_vision = fuse_vision
    if int8_vision and not loaded.model.config.has_vision:
        raise ConfigError("int8 vision weights: the model has no vision encoder")
    target.int8_vision = int8_vision
    target.two_digit_activations = two_digit_activations
    scheme, native = parse_quant(loaded, target, quant)
    with context_capped(loaded, max_context):
        target.check(loaded, scheme, native)
        target.calibration = needed_calibration(loaded, scheme)
        weights = quantized_weights(loaded, scheme, target.calibration)
        with atomic_output_dir(out_dir, is_bundle) as tmp:
            format_info = target.write(loaded, tmp, weights, native, progress)
            loaded.tokenizer.save(tmp / target.tokenizer_dir)
            label = native or (weights.scheme if weights is not None else None)
            manifest = build_manifest(loaded, fmt, tmp, label, format_info, target.tokenizer_dir)
            manifest |= manifest_extra or {}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
