"""``genai_config.json``: onnxruntime-genai's description of a model folder (which ONNX file is
which component, their input/output names, the decoder's shape, special tokens, search defaults).

Layout as in onnxruntime-genai's own test models (``test/models/phi3-v/genai_config.json``,
``pipeline-model``) and ``src/config.cpp``, which rejects unknown keys, so only its keys appear.

Model type: genai has no LLaVA/MobileVLM type. A model with images is declared ``phi3v``, the type
whose dataflow is ours: vision (``pixel_values`` → 2-D ``image_features``) → embedding
(``input_ids`` with negative ids at image positions + ``image_features`` → ``inputs_embeds``) →
decoder. genai's built-in Phi-3 image *processor* does not apply to our models (different image
size and normalisation): an app passes ``pixel_values``, the expanded ``input_ids`` and
``num_image_tokens`` itself (preprocessing parameters are in ``manifest.json``). A text-only model
is a ``decoder-pipeline`` of embedding → decoder.
"""

from __future__ import annotations

from edge_mllm.export.onnx import graphs

from edge_mllm.checkpoint.base import LoadedModel

FILENAME = "genai_config.json"
VISION_FILE = "vision.onnx"
EMBEDDING_FILE = "embedding.onnx"
DECODER_FILE = "decoder.onnx"


def _search(context_length: int) -> dict:
    """Greedy decoding, as ``edge-mllm generate`` defaults to. The decoder concatenates past and
    new keys, so genai must not share one buffer between past and present."""
    return {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": context_length,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
    }


def genai_config(loaded: LoadedModel) -> dict:
    """The ``genai_config.json`` of a bundle of ``loaded`` (files named as ``graphs`` writes them)."""
    config = loaded.model.config
    text = config.text
    tok = loaded.tokenizer
    stop = list(tok.stop_token_ids())
    pad = tok.hf.pad_token_id
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "head_size": text.head_dim,
        "hidden_size": text.hidden_size,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "inputs": {
            "inputs_embeds": graphs.INPUTS_EMBEDS,
            "past_key_names": graphs.PAST_KEY,
            "past_value_names": graphs.PAST_VALUE,
        },
        "outputs": {
            "logits": graphs.LOGITS,
            "present_key_names": graphs.PRESENT_KEY,
            "present_value_names": graphs.PRESENT_VALUE,
        },
    }
    model = {
        "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else stop[0],
        "context_length": text.max_position_embeddings,
        "decoder": decoder,
        "eos_token_id": stop if len(stop) > 1 else stop[0],
        "pad_token_id": pad if pad is not None else stop[0],
        "vocab_size": text.vocab_size,
    }
    if config.has_vision:
        decoder["filename"] = DECODER_FILE
        model["type"] = "phi3v"
        model["embedding"] = {
            "filename": EMBEDDING_FILE,
            "inputs": {"input_ids": graphs.INPUT_IDS, "image_features": graphs.IMAGE_FEATURES},
            "outputs": {"inputs_embeds": graphs.INPUTS_EMBEDS},
        }
        model["vision"] = {
            "filename": VISION_FILE,
            "inputs": {"pixel_values": graphs.PIXEL_VALUES},
            "outputs": {"image_features": graphs.IMAGE_FEATURES},
        }
    else:
        model["type"] = "decoder-pipeline"
        decoder["pipeline"] = [{
            "embedding": {"filename": EMBEDDING_FILE, "inputs": [graphs.INPUT_IDS], "outputs": [graphs.INPUTS_EMBEDS]},
            "decoder": {
                "filename": DECODER_FILE,
                "inputs": [graphs.INPUTS_EMBEDS, *graphs.cache_names(text.num_hidden_layers, past=True)],
                "outputs": [graphs.LOGITS, *graphs.cache_names(text.num_hidden_layers, past=False)],
            },
        }]
    return {"model": model, "search": _search(text.max_position_embeddings)}
