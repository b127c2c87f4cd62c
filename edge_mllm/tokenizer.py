"""Tokenizer wrapper: a Hugging Face fast tokenizer plus LLaVA's ``<image>`` placeholder handling."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from edge_mllm.errors import CheckpointError
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX

IMAGE_MARKER = "<image>"


class Tokenizer:
    """Text ↔ ids, special tokens and the tokenizer's own chat template."""

    def __init__(self, hf: PreTrainedTokenizerBase):
        self.hf = hf

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` / ``tokenizer.model`` (+ ``tokenizer_config.json``) from a folder."""
        try:
            return cls(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
        except Exception as exc:  # transformers raises many types for a broken folder
            raise CheckpointError(f"cannot load a tokenizer from {folder}: {exc}") from exc

    def save(self, folder: str | Path) -> None:
        self.hf.save_pretrained(str(folder))

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def stop_token_ids(self) -> tuple[int, ...]:
        """EOS plus the end-of-turn tokens chat templates use."""
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        vocab = self.hf.get_vocab()
        ids.update(vocab[t] for t in ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in vocab)
        return tuple(sorted(ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf(text, add_special_tokens=add_special_tokens).input_ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_with_images(self, text: str) -> list[int]:
        """Tokenize text in which ``<image>`` marks image positions, as LLaVA/MobileVLM's
        ``tokenizer_image_token`` does: each chunk is tokenized on its own, BOS kept on the first only,
        and every marker becomes ``IMAGE_TOKEN_INDEX``."""
        chunks = [self.encode(chunk) for chunk in text.split(IMAGE_MARKER)]
        bos = self.bos_token_id
        ids = list(chunks[0])
        for chunk in chunks[1:]:
            if bos is not None and chunk[:1] == [bos]:
                chunk = chunk[1:]
            ids += [IMAGE_TOKEN_INDEX, *chunk]
        return ids


class StreamDecoder:
    """Turns generated ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not finished yet
            return ""
        delta, self.emitted = text[self.emitted :], len(text)
        return delta
