"""The roofline predictor: time and memory of one multimodal request on one device and runtime.

Every phase takes the longer of its compute time and its memory time:

- vision encode: ViT + projector FLOPs / attainable compute at the vision weights' precision;
- prefill: prompt (+ image) tokens x decoder FLOPs, causal attention and one LM-head row of logits /
  attainable compute (weights are re-read once per micro-batch of ``ubatch`` tokens);
- decode: bytes moved per token (decoder weights, LM head, KV cache up to the current position,
  recurrent state) / attainable bandwidth, unless its FLOPs take longer on the threads given;
- TTFT: vision encodes + prefill.

Attainable = device peak x the backend's efficiency factor (:mod:`edge_mllm.sim.backends`). A backend
that delegates only the vision encoder (Core ML) is two rooflines: the vision encode on its accelerator,
prefill and decode on its decoder's backend (XNNPACK on the CPU). Peak
memory = weights + KV cache at the context length + the larger of the vision / prefill activations +
the backend's runtime overhead; it fits when it is within the device's per-app budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from edge_mllm.errors import ConfigError
from edge_mllm.sim.backends import Backend
from edge_mllm.sim.formats import WeightPlan
from edge_mllm.sim.profiles import DeviceProfile
from edge_mllm.sim.shapes import ModelShape

MIB = 2**20
ACTIVATION_BYTES = 4  # runtimes keep activations in fp32 on CPU
STATE_BYTES = 4  # linear-attention state is fp32 in every runtime


@dataclass(frozen=True)
class Scenario:
    """The request: text prompt tokens, images, threads (decode / prefill; None: the device's big
    cores), KV-cache positions (None: the model's context) and the prefill micro-batch."""

    prompt_tokens: int = 64
    images: int = 1
    threads: int | None = None
    batch_threads: int | None = None
    context: int | None = None
    ubatch: int = 512


@dataclass
class Memory:
    """Resident bytes at the peak, in MiB."""

    weights_mib: float
    kv_cache_mib: float
    activations_mib: float
    overhead_mib: float
    peak_mib: float
    budget_mib: float
    fits: bool


@dataclass
class Prediction:
    model: str
    quantization: str
    device: str
    backend: str
    decoder_backend: str  # the backend that runs prefill and decode (``backend`` unless it delegates only vision)
    threads: int | None
    batch_threads: int | None
    prompt_tokens: int
    images: int
    image_tokens: int
    context: int
    vision_encode_s: float | None
    prefill_tokens: int
    prefill_tok_s: float
    ttft_s: float
    decode_tok_s: float
    decode_bound: str  # memory | compute
    attainable_bandwidth_gbs: float
    attainable_compute_gops: dict[str, float]
    memory: Memory
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Roofline:
    """Attainable compute and bandwidth of one backend on one device."""

    def __init__(self, device: DeviceProfile, backend: Backend):
        backend.check(device)
        self.device, self.backend = device, backend
        self.bandwidth = device.peak_gbs * 1e9 * backend.bandwidth

    def compute(self, precision: str, threads: int | None) -> float:
        """Attainable operations per second at ``precision``."""
        if self.backend.unit == "cpu":
            return self.device.cpu_gops(precision, threads) * 1e9 * self.backend.compute
        acc = self.backend.accelerator(self.device)
        if precision not in acc.peaks_tops:
            raise ConfigError(f"{acc.name} ({self.device.key}) has no published {precision} peak "
                              f"(published: {', '.join(acc.peaks_tops)})")
        return acc.peaks_tops[precision] * 1e12 * self.backend.compute

    def seconds(self, flops: float, nbytes: float, precision: str, threads: int | None) -> tuple[float, str]:
        compute_s, memory_s = flops / self.compute(precision, threads), nbytes / self.bandwidth
        return (compute_s, "compute") if compute_s > memory_s else (memory_s, "memory")


def _block_bytes(shape: ModelShape, plan: WeightPlan) -> float:
    per_block = [p * plan.blocks.bytes_per_weight for p in shape.block_params]
    if plan.edge_blocks is not None and len(per_block) > 1:
        for i in (0, -1):
            per_block[i] = shape.block_params[i] * plan.edge_blocks.bytes_per_weight
    return sum(per_block)


def decode_weight_bytes(shape: ModelShape, plan: WeightPlan) -> float:
    """Weight bytes one decode step reads: every decoder block and the LM head (the embedding lookup
    reads one row). ``edge-mllm bench`` divides the host's bandwidth by it (plus the KV cache)."""
    return _block_bytes(shape, plan) + shape.embedding_params * (plan.lm_head or plan.embedding).bytes_per_weight


def _activation_bytes(shape: ModelShape, tokens: int, context: int, ubatch: int) -> float:
    """The larger of the vision encoder's and the prefill micro-batch's live activations."""
    u = min(tokens, ubatch)
    llm = u * (4 * shape.hidden + 3 * shape.ffn) + shape.heads * u * context + shape.vocab
    vision = 0
    if shape.vision is not None:
        v = shape.vision
        vision = v.tokens * (3 * v.width + v.ffn) + v.heads * v.tokens * v.tokens
    return max(llm, vision) * ACTIVATION_BYTES


def simulate(shape: ModelShape, plan: WeightPlan, device: DeviceProfile, backend: Backend,
             scenario: Scenario = Scenario()) -> Prediction:
    """Predict vision-encode time, prefill and decode speed, TTFT and peak memory (with ``backend``'s
    efficiency factors for ``device``'s CPU architecture)."""
    backend = backend.on(device)
    llm_backend = backend.decoder_backend().on(device)
    vision_roof = _Roofline(device, backend)
    roof = vision_roof if llm_backend is backend else _Roofline(device, llm_backend)
    cpu = llm_backend.unit == "cpu"
    threads = (scenario.threads or device.big_cores) if cpu else None
    batch_threads = (scenario.batch_threads or threads) if cpu else None
    if cpu:
        device.cpu_gops("fp32", max(threads, batch_threads))  # validates the thread counts
    images = scenario.images if shape.vision is not None else 0
    image_tokens = shape.vision.image_tokens if shape.vision is not None else 0
    n = scenario.prompt_tokens + images * image_tokens
    context = scenario.context or shape.max_context
    if context > shape.max_context:
        raise ConfigError(f"a {context}-position context is past {shape.name}'s {shape.max_context} positions")
    if n < 1:
        raise ConfigError("the prompt needs at least one token")
    if n >= context:
        raise ConfigError(f"{n} prompt tokens ({scenario.prompt_tokens} text + {images * image_tokens} image) "
                          f"do not fit a {context}-position context")

    blocks = _block_bytes(shape, plan)
    head_read = shape.embedding_params * (plan.lm_head or plan.embedding).bytes_per_weight
    head_flops = 2 * shape.embedding_params * plan.llm_flops_factor
    llm_flops = shape.llm_flops_per_token * plan.llm_flops_factor
    state = shape.recurrent_state_values * STATE_BYTES
    precision = plan.blocks.compute

    vision_format = backend.vision_format(plan.vision)
    vision_s = None
    if images:
        v = shape.vision
        vision_s, _ = vision_roof.seconds(v.flops, v.params * vision_format.bytes_per_weight, vision_format.compute,
                                          batch_threads)
    prefill_flops = n * llm_flops + shape.attention_flops_per_pair * n * (n + 1) / 2 + head_flops
    prefill_bytes = math.ceil(n / scenario.ubatch) * (blocks + 2 * state) + head_read
    prefill_s, _ = roof.seconds(prefill_flops, prefill_bytes, precision, batch_threads)

    # decode right after the prompt: the next token attends to n cached positions
    kv_read = shape.kv_values_per_token * n * llm_backend.kv_bytes
    decode_flops = llm_flops + head_flops + shape.attention_flops_per_pair * n
    decode_s, bound = roof.seconds(decode_flops, blocks + head_read + kv_read + 2 * state, precision, threads)

    weights = blocks + shape.embedding_params * plan.embedding.bytes_per_weight
    if plan.lm_head is not None:
        weights += shape.embedding_params * plan.lm_head.bytes_per_weight
    if shape.vision is not None:
        weights += shape.vision.params * vision_format.bytes_per_weight
    kv_cache = shape.kv_values_per_token * context * llm_backend.kv_bytes + state
    activations = _activation_bytes(shape, n, context, scenario.ubatch)
    overhead = backend.overhead_mib * MIB
    peak = weights + kv_cache + activations + overhead
    budget = device.app_budget_gb * 1e9

    notes = []
    if llm_backend is not backend:
        acc = backend.accelerator(device)
        notes.append(f"{backend.name}: the vision encoder in {vision_format.compute} on the {acc.name}, prefill and "
                     f"decode on {llm_backend.name} ({llm_backend.unit.upper()})")
    for b in dict.fromkeys((backend, llm_backend)):
        if b.assumed:
            notes.append(f"{b.name}: {' and '.join(b.assumed)} efficiency assumed ({b.calibration})")
    if device.key == "host":
        notes.append("host: CPU peak derived from its clock and vector width (FMA pipes assumed); its memory "
                     "peak is the measured copy rate, an attained number; the efficiency factors are the "
                     f"{backend.arch} set ({backend.calibration})")
    if device.data["memory"]["peak_gbs"].get("estimate"):
        notes.append(f"{device.key}: peak memory bandwidth is an estimate (see `edge-mllm devices --json`)")
    if images and vision_roof is not roof:
        if vision_format.compute in backend.accelerator(device).estimated:
            notes.append(f"{device.key}: the {backend.unit.upper()}'s {vision_format.compute} peak is an estimate "
                         "(see `edge-mllm devices --json`)")
    compute = {precision: roof.compute(precision, batch_threads) / 1e9}
    if images:
        key = vision_format.compute if vision_roof is roof else f"vision {vision_format.compute}"
        compute[key] = vision_roof.compute(vision_format.compute, batch_threads) / 1e9
    return Prediction(
        model=shape.name, quantization=plan.label, device=device.key, backend=backend.name,
        decoder_backend=llm_backend.name, threads=threads, batch_threads=batch_threads,
        prompt_tokens=scenario.prompt_tokens, images=images,
        image_tokens=image_tokens, context=context, vision_encode_s=vision_s, prefill_tokens=n,
        prefill_tok_s=n / prefill_s, ttft_s=images * (vision_s or 0.0) + prefill_s, decode_tok_s=1 / decode_s,
        decode_bound=bound, attainable_bandwidth_gbs=roof.bandwidth / 1e9,
        attainable_compute_gops=compute,
        memory=Memory(weights_mib=weights / MIB, kv_cache_mib=kv_cache / MIB, activations_mib=activations / MIB,
                      overhead_mib=backend.overhead_mib, peak_mib=peak / MIB, budget_mib=budget / MIB,
                      fits=peak <= budget),
        notes=notes,
    )
