"""What every checkpoint loader returns."""

from __future__ import annotations

from dataclasses import dataclass

from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.quant.storage import QuantizedWeights
from edge_mllm.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    model: MultimodalLM
    tokenizer: Tokenizer
    chat_template: str  # "vicuna_v1" or "tokenizer" (see edge_mllm.chat)
    # The integer codes behind a quantized model's (dequantized) weights, for exporters to pack.
    quantization: QuantizedWeights | None = None
