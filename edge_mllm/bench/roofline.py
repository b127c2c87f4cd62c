"""The host's memory-bandwidth roofline for decode: a decode step reads every weight of the decoder
and the LM head once, plus the KV cache so far, so no runtime can decode faster than

    measured host bandwidth / bytes read per token.

Bytes come from the simulator's weight plans (:mod:`edge_mllm.sim.formats`: bits per weight of the
bundle's quantization, scales included), the bandwidth from :func:`edge_mllm.sim.host.read_bandwidth_gbs`
(reads of 256 MiB on the benchmark's threads: a decode step reads). The KV cache is counted at the
mean decode position of the benchmark's request. A decoder whose weights fit the last-level cache can
still pass 100%: the roofline is DRAM's."""

from __future__ import annotations

from edge_mllm.bench.subjects import Subject
from edge_mllm.sim.formats import bundle_weight_plan, weight_plan
from edge_mllm.sim.predict import decode_weight_bytes
from edge_mllm.sim.shapes import ModelShape, shape_from_config, shape_from_manifest

EAGER_KV_BYTES = 4  # PyTorch eager keeps an fp32 cache


def _shape_plan_kv(subject: Subject, config=None) -> tuple[ModelShape, object, int]:
    if subject.is_bundle:
        from edge_mllm.sim.backends import backend_for_format

        backend = backend_for_format(subject.format)
        shape = shape_from_manifest(subject.manifest, subject.name)
        return shape, bundle_weight_plan(subject.manifest, backend.family, shape.tied_embeddings), backend.kv_bytes
    # eager runs the model's fp32 values (a quantized folder's codes are dequantized when loaded)
    shape = shape_from_config(config, subject.name)
    return shape, weight_plan(None, "executorch", shape.tied_embeddings), EAGER_KV_BYTES


def decode_roofline(subject: Subject, bandwidth_gbs: float, prompt_tokens: int, tokens: int,
                    config=None) -> dict:
    """Bytes read per decode token and the decode rate the host's bandwidth allows. ``config``: the
    model's ``MLLMConfig`` for eager subjects (bundles bring theirs in the manifest)."""
    shape, plan, kv_bytes = _shape_plan_kv(subject, config)
    weights = decode_weight_bytes(shape, plan)
    position = prompt_tokens + tokens / 2
    kv = shape.kv_values_per_token * position * kv_bytes
    per_token = weights + kv
    return {
        "decode_weight_bytes_per_token": weights,
        "decode_kv_bytes_per_token": kv,
        "decode_bytes_per_token": per_token,
        "host_bandwidth_gbs": bandwidth_gbs,
        "roofline_decode_tok_s": bandwidth_gbs * 1e9 / per_token,
    }
