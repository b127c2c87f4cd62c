"""The GGUF bundle (``--format gguf``): what llama.cpp and llama-cpp-python load unmodified.

- ``model.gguf``: the language model (architecture ``llama``, tokenizer, and a chat template that
  places images where our prompts place them), as floats (``f32``, ``f16``), llama.cpp types
  (``q8_0``, ``q4_0`` packed by gguf-py; ``q4_k_m`` by llama.cpp's own quantizer), or our quantizers'
  codes packed as Q4_0 / Q4_1 / Q8_0 blocks (group size 32).
- ``mmproj.gguf``: the vision tower and projector (architecture ``clip``, :mod:`.mmproj`).

Usage (llama-cpp-python ≥ 0.3.26)::

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    llm = Llama("model.gguf", chat_handler=MTMDChatHandler(clip_model_path="mmproj.gguf"), n_ctx=2048)
    llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What is in the image?"}]}])

``MTMDChatHandler`` renders the GGUF's own chat template (``Llava15ChatHandler`` hard-codes a Vicuna
variant that differs from MobileVLM's in system prompt and spacing), turning each image into libmtmd's
media marker.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_mllm.export.bundle import Backend, register
from edge_mllm.export.gguf.blocks import BLOCK, llm_raw_tensors
from edge_mllm.export.gguf.llm import llamacpp_quantize, write_llama_gguf
from edge_mllm.export.gguf.mmproj import PROJECTOR_TYPES, check_mmproj, write_mmproj_gguf
from edge_mllm.quant.scheme import QuantScheme
from edge_mllm.quant.storage import QuantizedWeights

from edge_mllm.chat import VICUNA_V1_SYSTEM
from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.errors import ConfigError, QuantError
from edge_mllm.model.llama import LlamaForCausalLM

MODEL_FILE = "model.gguf"
MMPROJ_FILE = "mmproj.gguf"
CHAT_HANDLER = "llama_cpp.llama_chat_format.MTMDChatHandler"
MEDIA_MARKER = "<__media__>"  # libmtmd's mtmd_default_marker(): where an image's embeddings go
DEFAULT_FLOAT = "f16"  # --quant not given, model not quantized: what convert_hf_to_gguf writes by default
GGUF_PY_TYPES = ("f32", "f16", "q8_0", "q4_0")  # packed in numpy by gguf-py
LLAMACPP_TYPES = ("q4_k_m",)  # K-quants: only llama.cpp's quantizer produces them
# llama.cpp issue #25814 (PR #25844 unmerged as of llama-cpp-python 0.3.36): its LLaVA graph appends
# the CLS token after the patches while still treating row 0 as CLS, which shifts patch positions by
# one and swaps the first patch for CLS. Our file has the standard layout (right for builds before
# the graph refactor and after the fix); image embeddings from affected builds differ from ours.
KNOWN_ISSUES = (
    "llama.cpp #25814: mtmd's llava graph (projectors mlp/ldp/ldpv2) orders the CLS token last, so "
    "image embeddings differ from the PyTorch model's until that is fixed",
)


def _flatten_content_jinja() -> str:
    """Jinja that turns OpenAI-style content lists into the strings our templates expect: images
    (libmtmd's media marker, or image parts) first, each followed by a newline, then the text — as
    LLaVA / MobileVLM put ``<image>\\n`` before the question (``edge_mllm.chat.user_message``)."""
    marker = json.dumps(MEDIA_MARKER)
    return (
        "{%- set flat = namespace(messages=[], text='') -%}"
        "{%- for message in messages -%}"
        "{%- if message.content is string or message.content is none -%}"
        "{%- set flat.messages = flat.messages + [message] -%}"
        "{%- else -%}"
        "{%- set flat.text = '' -%}"
        "{%- for part in message.content -%}"
        f"{{%- if part.type in ['image', 'image_url'] or (part.type == 'text' and part.text == {marker}) -%}}"
        f"{{%- set flat.text = flat.text + {marker} + '\\n' -%}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- for part in message.content -%}"
        f"{{%- if part.type == 'text' and part.text != {marker} -%}}"
        "{%- set flat.text = flat.text + part.text -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set flat.messages = flat.messages + [{'role': message.role, 'content': flat.text}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = flat.messages -%}"
    )


def _vicuna_v1_jinja() -> str:
    """``edge_mllm.chat.render_vicuna_v1`` as Jinja (string contents):
    "SYSTEM USER: q ASSISTANT: a</s>USER: q ASSISTANT:"."""
    return (
        f"{{%- set conv = namespace(system={json.dumps(VICUNA_V1_SYSTEM)}, turn=0) -%}}"
        "{%- if messages and messages[0].role == 'system' -%}{%- set conv.system = messages[0].content -%}{%- endif -%}"
        "{{- conv.system + ' ' -}}"
        "{%- for message in messages -%}"
        "{%- if not (loop.first and message.role == 'system') -%}"
        "{{- ('USER' if message.role == 'user' else 'ASSISTANT') + ': ' + message.content -}}"
        "{{- ' ' if conv.turn % 2 == 0 else '</s>' -}}"
        "{%- set conv.turn = conv.turn + 1 -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


def gguf_chat_template(loaded: LoadedModel) -> str | None:
    """The Jinja chat template for ``model.gguf``: our chat template (``loaded.chat_template``), made
    to accept content lists with images, so that llama-cpp-python's ``MTMDChatHandler`` renders the
    prompt our ``Pipeline`` renders, with libmtmd's media marker where ours has ``<image>``."""
    if loaded.chat_template == "vicuna_v1":
        return _flatten_content_jinja() + _vicuna_v1_jinja()
    own = loaded.tokenizer.chat_template
    if isinstance(own, str):
        return _flatten_content_jinja() + own
    return None


def _check_scheme(scheme: QuantScheme) -> None:
    """Our codes go into GGUF unchanged, so they must be a GGML block type's (``blocks.ggml_type``)."""
    llamacpp = ", ".join(GGUF_PY_TYPES + LLAMACPP_TYPES)
    if scheme.group_size != BLOCK:
        raise QuantError(
            f"GGUF blocks hold {BLOCK} weights, but {scheme.name} uses groups of {scheme.group_size}: "
            f"use a -g{BLOCK} scheme, or let llama.cpp quantize ({llamacpp})"
        )
    if not scheme.symmetric and not scheme.float_min and (scheme.bits == 8 or scheme.mixed):
        raise QuantError(f"{scheme.name}: GGML has no asymmetric 8-bit block type; use a symmetric scheme")


@register
class GGUFBackend(Backend):
    """``model.gguf`` + ``mmproj.gguf`` for llama.cpp."""

    name = "gguf"
    native_quant = GGUF_PY_TYPES + LLAMACPP_TYPES
    int8_vision_unsupported = None  # mmproj matrices as Q8_0 (codes the model carries stay its own)

    def check(self, loaded: LoadedModel, scheme: QuantScheme | None, native_quant: str | None) -> None:
        lm = loaded.model.language_model
        if not isinstance(lm, LlamaForCausalLM):
            raise ConfigError(f"GGUF export supports Llama language models, not {type(lm).__name__}")
        check_mmproj(loaded.model.config)
        if scheme is not None:
            _check_scheme(scheme)

    def write(
        self,
        loaded: LoadedModel,
        out_dir: Path,
        weights: QuantizedWeights | None,
        native_quant: str | None,
        progress: bool,
    ) -> dict:
        template = gguf_chat_template(loaded)
        model_path = out_dir / MODEL_FILE
        if weights is not None:
            raw = llm_raw_tensors(weights.tensors)
            # every Llama matrix carries codes; "f32" only covers what no scheme quantizes (norms)
            write_llama_gguf(loaded, model_path, float_type="f32", raw_tensors=raw, chat_template=template,
                             progress=progress)
            model_type = weights.scheme
        elif native_quant in LLAMACPP_TYPES:
            tmp = out_dir / f".{MODEL_FILE}.f32"
            try:
                write_llama_gguf(loaded, tmp, float_type="f32", chat_template=template, progress=progress)
                llamacpp_quantize(tmp, model_path, native_quant)
            finally:
                tmp.unlink(missing_ok=True)
            model_type = native_quant
        else:
            model_type = native_quant or DEFAULT_FLOAT
            write_llama_gguf(loaded, model_path, float_type=model_type, chat_template=template, progress=progress)

        info: dict = {"model_file": MODEL_FILE, "model_type": model_type, "chat_template_in_gguf": template is not None}
        config = loaded.model.config
        if config.has_vision:
            # The vision tower is small and quantization-sensitive: F32 next to an F32 model, else F16
            # (as llama.cpp's own mmproj files), or our own 8-bit codes when the model carries them.
            mmproj_type = "q8_0" if self.int8_vision else "f32" if model_type == "f32" else "f16"
            write_mmproj_gguf(loaded, out_dir / MMPROJ_FILE, float_type=mmproj_type,
                              quantized=weights.tensors if weights is not None else None, progress=progress)
            info.update(
                mmproj_file=MMPROJ_FILE,
                mmproj_type=weights.scheme if weights is not None else mmproj_type,
                projector_type=PROJECTOR_TYPES[config.projector.type],
                vision_layers=config.vision.num_layers_computed,
                image_token_count=loaded.model.num_image_tokens,
                chat_handler=CHAT_HANDLER,
                media_marker=MEDIA_MARKER,
                known_issues=list(KNOWN_ISSUES),
            )
        else:
            info.update(mmproj_file=None, chat_handler=None)
        return info
