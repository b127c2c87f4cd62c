"""Generation from a GGUF bundle in llama.cpp (llama-cpp-python's bindings, unmodified): images go to
libmtmd as RGB bytes (it does its own preprocessing, as on a phone), are encoded by ``mmproj.gguf``
and decoded into the context by ``mtmd_helper_decode_image_chunk``; text runs go through
``Llama.eval``; each step's logits are read from the context. The shared :class:`BundleRuntime` loop
does the rest, so timings split into vision encode / prefill / decode like every other format.

llama-cpp-python's ``MTMDChatHandler`` drives the same libmtmd calls from a chat request; the tests
run the bundle through it too.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np
import torch
from llama_cpp._utils import suppress_stdout_stderr

from edge_mllm.errors import CheckpointError, EdgeMLLMError
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX
from edge_mllm.preprocess import load_image
from edge_mllm.runtime.bundle import BundleRuntime, Images


@dataclass
class EncodedImage:
    """One image after ``mtmd_encode_chunk``: its chunk (kept for decoding) and a copy of its embeddings."""

    chunks: object  # mtmd_input_chunks_p owning ``chunk``
    chunk: object
    embeddings: np.ndarray  # [n_tokens, n_embd] float32


class LlamaCppRunner(BundleRuntime):
    """A GGUF bundle loaded in llama.cpp. ``kv_type``: the KV cache's ggml type (llama.cpp's default
    F16; F32 for comparisons with PyTorch at fp32). ``max_context``: llama.cpp's n_ctx, the KV cache
    it allocates up front, at most the bundle's context (4096 by default, as llama.cpp's own tools
    keep a moderate default rather than the model's longest)."""

    formats = ("gguf",)

    def __init__(self, bundle_dir: str | Path, manifest: dict | None = None, *, threads: int | None = None,
                 kv_type: str = "f16", max_context: int = 4096):
        super().__init__(bundle_dir, manifest)
        info = self.manifest.get("gguf") or {}
        model_path = self.path / info.get("model_file", "model.gguf")
        if not model_path.is_file():
            raise CheckpointError(f"{self.path} is not a GGUF bundle: {model_path.name} is missing")
        self.context_length = min(self.context_length or max_context, max_context)
        kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[kv_type]
        self.threads = threads or min(4, os.cpu_count() or 1)
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=self.context_length, n_batch=512,
                                   n_threads=self.threads, n_threads_batch=self.threads, type_k=kv, type_v=kv,
                                   verbose=False)
        self.n_embd = llama_cpp.llama_model_n_embd(self.llm.model)
        self._mtmd = None
        if info.get("mmproj_file"):
            self._mtmd = self._load_mmproj(self.path / info["mmproj_file"])

    def _load_mmproj(self, path: Path):
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.print_timings, params.warmup, params.n_threads = False, False, False, self.threads
        with suppress_stdout_stderr(disable=False):  # libmtmd logs every hparam on load (as MTMDChatHandler)
            ctx = mtmd.mtmd_init_from_file(str(path).encode(), self.llm.model, params)
        if not ctx:
            raise CheckpointError(f"libmtmd could not load {path}")
        return ctx

    def close(self) -> None:
        """Free llama.cpp's contexts (also done when the runner is garbage-collected)."""
        if self._mtmd:
            mtmd.mtmd_free(self._mtmd)
            self._mtmd = None
        self.llm.close()

    def __del__(self):
        if getattr(self, "llm", None) is not None:
            self.close()

    # ------------------------------------------------------------------------------------------
    # images: RGB bytes, preprocessed by libmtmd itself

    def pixels(self, images: Images) -> list[np.ndarray] | None:
        """Images → RGB uint8 arrays [H, W, 3] for libmtmd (normalised pixel tensors are refused:
        llama.cpp preprocesses images itself)."""
        if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
            raise EdgeMLLMError("llama.cpp preprocesses images itself: pass images, not normalised pixels")
        if len(images) == 0:
            return None
        if self._mtmd is None:
            raise EdgeMLLMError("this bundle has no mmproj.gguf: it cannot take images")
        return [np.ascontiguousarray(np.asarray(load_image(image), dtype=np.uint8)) for image in images]

    def encode_images(self, pixels: Sequence[np.ndarray]) -> list[EncodedImage]:
        return [self._encode_one(rgb) for rgb in pixels]

    def _encode_one(self, rgb: np.ndarray) -> EncodedImage:
        height, width = rgb.shape[:2]
        buffer = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(width, height, buffer)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = mtmd.mtmd_input_text()
            marker = mtmd.mtmd_default_marker()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            with suppress_stdout_stderr(disable=False):  # libmtmd logs every image it tokenizes
                status = mtmd.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(text), bitmaps, 1)
            if status != 0:
                raise EdgeMLLMError("libmtmd could not tokenize the image")
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                with suppress_stdout_stderr(disable=False):
                    status = mtmd.mtmd_encode_chunk(self._mtmd, chunk)
                if status != 0:
                    raise EdgeMLLMError("libmtmd failed to encode the image")
                n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                out = mtmd.mtmd_get_output_embd(self._mtmd)  # overwritten by the next encode: copy
                embeddings = np.ctypeslib.as_array(out, shape=(n_tokens * self.n_embd,)).reshape(n_tokens, -1).copy()
                return EncodedImage(chunks, chunk, embeddings)
        mtmd.mtmd_input_chunks_free(chunks)
        raise EdgeMLLMError("libmtmd produced no image chunk")

    # ------------------------------------------------------------------------------------------
    # BundleRuntime's steps: the cache is the llama context; Llama.n_tokens is the next position

    def prefill(self, token_ids: list[int], image_embeds: list[EncodedImage] | None) -> torch.Tensor:
        self.llm.reset()
        images = iter(image_embeds or [])
        run: list[int] = []
        try:
            for tok in [*token_ids, None]:  # the sentinel flushes the last text run
                if tok is not None and tok != IMAGE_TOKEN_INDEX:
                    run.append(tok)
                    continue
                if run:
                    self.llm.eval(run)
                    run = []
                if tok == IMAGE_TOKEN_INDEX:
                    self._decode_image(next(images))
        finally:
            for image in image_embeds or []:
                mtmd.mtmd_input_chunks_free(image.chunks)
        return self._last_logits()

    def _decode_image(self, image: EncodedImage) -> None:
        new_n_past = ctypes.c_int32(0)
        embd = image.embeddings.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        lctx = self.llm._ctx.ctx  # llama-cpp-python keeps the llama_context here; libmtmd decodes into it
        with suppress_stdout_stderr(disable=False):  # libmtmd logs every image decode
            status = mtmd.mtmd_helper_decode_image_chunk(self._mtmd, lctx, image.chunk, embd, self.llm.n_tokens, 0,
                                                         self.llm.n_batch, ctypes.byref(new_n_past),
                                                         mtmd.mtmd_helper_post_decode_callback(), None)
        if status != 0:
            raise EdgeMLLMError(f"llama.cpp failed to decode the image embeddings (status {status})")
        self.llm.n_tokens = int(new_n_past.value)

    def decode_one(self, token: int, position: int) -> torch.Tensor:
        if position != self.llm.n_tokens:
            raise EdgeMLLMError(f"llama.cpp is at position {self.llm.n_tokens}, not {position}")
        self.llm.eval([token])
        return self._last_logits()

    def _last_logits(self) -> torch.Tensor:
        row = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).copy())


RUNTIME = LlamaCppRunner
