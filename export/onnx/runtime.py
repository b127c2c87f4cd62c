"""Generation from an ONNX bundle with plain ``onnxruntime``: image → ``vision.onnx`` → image
features spliced at the image positions by ``embedding.onnx`` → ``decoder.onnx`` prefill, then
greedy decoding one token at a time with each step's ``present`` fed back as the next ``past``.

This is the loop onnxruntime-genai runs for the bundle (its ``phi3v`` pipeline), written out so the
bundle can be checked, and used, where onnxruntime-genai is not installed. Model files and I/O
names come from ``genai_config.json``; the tokenizer, chat template, image preprocessing and stop
tokens from the bundle's ``tokenizer/`` and ``manifest.json`` (:class:`BundleRuntime`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edge_mllm.errors import EdgeMLLMError
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX
from edge_mllm.runtime.bundle import BundleRuntime


class OnnxRunner(BundleRuntime):
    """An ONNX bundle loaded into onnxruntime sessions.

    ``OnnxRunner(bundle_dir).generate("What is in the picture?", ["cat.png"], max_new_tokens=32)``;
    ``prompt`` may also be token ids with ``IMAGE_TOKEN_INDEX`` placeholders, and ``images`` a
    normalised pixel array [N, 3, H, W].
    """

    formats = ("onnx",)

    def __init__(self, bundle_dir: str | Path, manifest: dict | None = None, *,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None):
        super().__init__(bundle_dir, manifest)
        config_path = self.path / "genai_config.json"
        if not config_path.is_file():
            raise EdgeMLLMError(f"{self.path} is not an ONNX bundle: genai_config.json is missing")
        config = json.loads(config_path.read_text())["model"]
        decoder = config["decoder"]
        self.num_layers = decoder["num_hidden_layers"]
        self.num_kv_heads = decoder["num_key_value_heads"]
        self.head_size = decoder["head_size"]
        self.hidden_size = decoder["hidden_size"]
        self.context_length = config["context_length"]
        self.io = {"decoder": decoder, "embedding": config.get("embedding", {}), "vision": config.get("vision", {})}
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads

        def session(filename: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(self.path / filename), options, providers=list(providers))

        # Text-only bundles name their files in the decoder's pipeline (genai "decoder-pipeline").
        stages = {name: stage for entry in decoder.get("pipeline", []) for name, stage in entry.items()}
        self.vision = session(config["vision"]["filename"]) if "vision" in config else None
        self.embedding = session(config.get("embedding", stages.get("embedding", {})).get("filename", "embedding.onnx"))
        self.decoder = session(decoder.get("filename") or stages["decoder"]["filename"])
        self._past: list[np.ndarray] = []

    # ------------------------------------------------------------------------------------------
    # the three graphs

    def encode_images(self, pixel_values: np.ndarray | torch.Tensor) -> np.ndarray:
        """Normalised pixels [N, 3, H, W] → image features [N, image_tokens, D]; a fused
        ``vision.onnx`` is fed them as the RGB in [0, 1] it reads (manifest ``vision_input``)."""
        if self.vision is None:
            raise EdgeMLLMError("this bundle has no vision encoder: it cannot take images")
        io = self.io["vision"]
        pixels = np.ascontiguousarray(self.vision_pixels(pixel_values).numpy(), dtype=np.float32)
        (features,) = self.vision.run([io["outputs"]["image_features"]], {io["inputs"]["pixel_values"]: pixels})
        return features.reshape(pixels.shape[0], -1, features.shape[-1])

    def embed(self, token_ids: Sequence[int], image_features: np.ndarray | None = None) -> np.ndarray:
        """Token ids with one ``IMAGE_TOKEN_INDEX`` per image → inputs_embeds [1, T, D], each
        placeholder replaced by its image's features (as ``MultimodalLM.embed_prompt``)."""
        token_ids = list(token_ids)
        n_images = 0 if image_features is None else image_features.shape[0]
        if token_ids.count(IMAGE_TOKEN_INDEX) != n_images:
            raise EdgeMLLMError(f"prompt has {token_ids.count(IMAGE_TOKEN_INDEX)} image placeholder(s) "
                                f"but {n_images} image(s) were given")
        feeds = {"input_ids": np.asarray([self._expand(token_ids, image_features)], dtype=np.int64)}
        if self.vision is not None:
            width = self.hidden_size
            rows = np.zeros((0, width), np.float32) if image_features is None else image_features.reshape(-1, width)
            feeds["image_features"] = np.ascontiguousarray(rows, dtype=np.float32)
        return self.embedding.run(None, feeds)[0]

    @staticmethod
    def _expand(token_ids: Sequence[int], image_features: np.ndarray | None) -> list[int]:
        """Each image placeholder → one (negative) id per image token: the embedding graph fills
        negative positions with image feature rows in order."""
        per_image = 0 if image_features is None else image_features.shape[1]
        out: list[int] = []
        for tok in token_ids:
            out.extend([IMAGE_TOKEN_INDEX] * per_image if tok == IMAGE_TOKEN_INDEX else [tok])
        return out

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        """Zero-length past keys/values for a first (prefill) step."""
        return [np.zeros((batch, self.num_kv_heads, 0, self.head_size), np.float32)] * (2 * self.num_layers)

    def forward(self, inputs_embeds: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder step: inputs_embeds [B, S, D] after ``past`` → (logits [B, S, V], present)."""
        batch, new_tokens = inputs_embeds.shape[:2]
        if batch > 1 and new_tokens > 1 and past and past[0].shape[2] > 0:  # before ONNX Runtime's own error
            raise EdgeMLLMError(f"a batch of {batch} rows goes on one token per step after its prompt "
                                f"(GroupQueryAttention's CPU kernel), not {new_tokens}")
        io = self.io["decoder"]
        names = [io["inputs"]["past_key_names"], io["inputs"]["past_value_names"]]
        feeds = {io["inputs"]["inputs_embeds"]: np.ascontiguousarray(inputs_embeds, dtype=np.float32)}
        feeds.update({names[i % 2] % (i // 2): kv for i, kv in enumerate(past)})
        logits, *present = self.decoder.run(None, feeds)
        return logits, present

    # ------------------------------------------------------------------------------------------
    # BundleRuntime's steps: the cache is the last step's ``present``

    def prefill(self, token_ids: list[int], image_embeds: np.ndarray | None) -> torch.Tensor:
        logits, self._past = self.forward(self.embed(token_ids, image_embeds), self.empty_cache())
        return torch.from_numpy(logits[0, -1])

    def decode_one(self, token: int, position: int) -> torch.Tensor:
        logits, self._past = self.forward(self.embed([token]), self._past)
        return torch.from_numpy(logits[0, -1])


RUNTIME = OnnxRunner
