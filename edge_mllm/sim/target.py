"""``edge-mllm export --target DEVICE``: the export settings a device profile calls for, and the
simulator's prediction for the result.

The picks, each with its reason (every reason ends up in the bundle's manifest under ``target``):

- format / runtime: Apple → ``executorch-coreml`` (vision encoder on the Neural Engine, decoder on
  XNNPACK); Qualcomm with Qualcomm's QNN SDK on this machine → ``executorch-qnn``; NVIDIA Jetson →
  ``gguf`` for llama.cpp's CUDA backend; every other CPU → ``executorch`` on XNNPACK or ``gguf``,
  whichever the simulator predicts decodes the model faster there. Its efficiency factors are per CPU
  architecture (:mod:`edge_mllm.sim.backends`): on arm64 phones XNNPACK reaches about twice llama.cpp's
  share of the bandwidth (published rows); on x86-64 llama.cpp decodes faster (bundle runs on this
  project's host).
  Where a delegate's SDK is missing here, the pick falls back to XNNPACK and says so.
- quantization: our ``rtn-w4-g32`` codes (symmetric 4-bit, group 32), which every format runs as its
  own 4-bit operator on the same weights (ExecuTorch 8da4w linears, GGUF Q4_0 blocks, ONNX Runtime
  MatMulNBits); for ExecuTorch with SmoothQuant's scale migration folded in first (``-sq``), since its
  8da4w linears also round each token's activations to int8; a quantized model keeps its own codes.
  A model trained on a 4-bit grid (quantization-aware LoRA) keeps that grid; for GGUF and ONNX with
  the token embedding / LM head and the first and last blocks at 8 bits (``-mixed``): their 4-bit
  operators take float activations, so the decoder's codes are the trained weights and the 4-bit
  embedding is the one loss left (on the shipped default: −1.8 VQA points all-4-bit, none with
  ``-mixed``, README "Quantization quality"). ExecuTorch keeps the all-4-bit grid: XNNPACK runs 8-bit
  group-wise linears as fp32, larger and slower, and its int8 activations cost more than the embedding.
- threads: the device's big cores (the host: its cores).
- max context: the model's, capped at :data:`PHONE_CONTEXT` (runtimes preallocate the KV cache), then
  halved until the predicted peak memory fits the device's app budget.

``--format`` / ``--quant`` given explicitly override the picks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from edge_mllm.config import MLLMConfig
from edge_mllm.errors import ConfigError, EdgeMLLMError
from edge_mllm.quant.scheme import QuantScheme
from edge_mllm.sim.backends import backend_for_format
from edge_mllm.sim.formats import weight_plan
from edge_mllm.sim.predict import Prediction, Scenario, simulate
from edge_mllm.sim.profiles import HOST, DeviceProfile
from edge_mllm.sim.shapes import shape_from_config

DEFAULT_SCHEME = "rtn-w4-g32"
EXECUTORCH_SCHEME = DEFAULT_SCHEME + "-sq"  # same layout and speed; activation outliers moved into the weights
CPU_FORMATS = ("executorch", "gguf")
PHONE_CONTEXT = 2048  # ExecuTorch's DEFAULT_MAX_SEQ_LEN in export/executorch/bundle.py: same reasoning
PROMPT_TOKENS = 64  # the request the prediction is for: 64 text tokens + one image
MIN_TEXT_CONTEXT = PROMPT_TOKENS + 32  # the smallest context planned: that prompt + a 32-token answer


@dataclass
class TargetPlan:
    """What ``export --target`` exports, and why."""

    device: str
    format: str
    backend: str  # the simulator's runtime for it (edge_mllm.sim.backends)
    quant: str | None  # None: floats, or the model's own codes
    threads: int
    max_context: int
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def delegate_missing(fmt: str) -> str | None:
    """Why ``fmt`` cannot be exported on this machine (its SDK is missing), or None. Asks the
    exporter's own check (``export/executorch/targets.py``)."""
    from edge_mllm.export.bundle import backend

    try:
        backend(fmt).target().check()
    except ConfigError as exc:
        return str(exc)
    return None


def _pick_format(device: DeviceProfile, decode_tok_s: Callable[[str], float],
                 available=delegate_missing) -> tuple[str, str]:
    if device.vendor == "apple":
        missing = available("executorch-coreml")
        if missing is None:
            return "executorch-coreml", ("Apple SoC: the vision encoder on the Neural Engine via Core ML, "
                                         "the decoder on XNNPACK")
        return "executorch", f"Apple SoC, but Core ML cannot be lowered here ({missing}): XNNPACK on the CPU"
    if device.vendor == "qualcomm":
        missing = available("executorch-qnn")
        if missing is None:
            return "executorch-qnn", "Snapdragon with Qualcomm's QNN SDK on this machine: the vision encoder on the HTP"
        return "executorch", ("Snapdragon without Qualcomm's QNN SDK on this machine (QNN_SDK_ROOT unset): "
                              "ExecuTorch on XNNPACK (CPU); GGUF Q4_0 (--format gguf) is the llama.cpp alternative")
    if device.gpu is not None and device.gpu.cuda:
        return "gguf", f"{device.gpu.name}: llama.cpp's CUDA backend runs GGUF"
    # Decode is what the user waits on and it is bandwidth-bound: the two runtimes differ in the share
    # of the bandwidth they reach (per CPU architecture) and in the bytes their format reads per token.
    speeds, refused = {}, {}
    for fmt in CPU_FORMATS:
        try:
            speeds[fmt] = decode_tok_s(fmt)
        except ConfigError as exc:  # the quantization asked for has no such type in this format
            refused[fmt] = exc
    if not speeds:
        raise next(iter(refused.values()))
    best = max(speeds, key=speeds.get)
    said = ", ".join([f"{backend_for_format(fmt).name} {tok_s:.0f} tok/s" for fmt, tok_s in speeds.items()]
                     + [f"{fmt} cannot take this quantization" for fmt in refused])
    return best, (f"{device.cpu_arch} CPU: the simulator predicts the faster decode for "
                  f"{backend_for_format(best).name} ({said})")


def _threads(device: DeviceProfile) -> int:
    return device.cores if device.key == HOST else device.big_cores


def predict_for(config: MLLMConfig, name: str, fmt: str, quant: str | None, device: DeviceProfile,
                threads: int, context: int, two_digit_activations: bool = False) -> Prediction:
    """The simulator's prediction for ``config`` exported as ``fmt`` / ``quant`` (a 64-token prompt and
    one image if the model sees) on ``device``."""
    runtime = backend_for_format(fmt)
    shape = shape_from_config(config, name, max_context=context)
    plan = weight_plan(quant, runtime.family, shape.tied_embeddings, two_digit_activations)
    threads = threads if runtime.decoder_backend().unit == "cpu" else None
    return simulate(shape, plan, device, runtime, Scenario(prompt_tokens=PROMPT_TOKENS, images=1, threads=threads,
                                                           context=context))


def _max_context(config: MLLMConfig, name: str, fmt: str, quant: str | None, device: DeviceProfile,
                 threads: int, two_digit_activations: bool = False) -> tuple[int, str]:
    image_tokens = 0
    if config.vision is not None:
        image_tokens = shape_from_config(config, name).vision.image_tokens
    floor = image_tokens + MIN_TEXT_CONTEXT
    model_ctx = config.text.max_position_embeddings
    context = min(model_ctx, PHONE_CONTEXT)
    why = (f"the model's {model_ctx} positions" if context == model_ctx else
           f"capped at {PHONE_CONTEXT} of the model's {model_ctx}: the KV cache is preallocated")
    while True:
        try:
            memory = predict_for(config, name, fmt, quant, device, threads, context, two_digit_activations).memory
        except ConfigError:  # the NPU backends cannot be simulated on every device: size for XNNPACK
            memory = predict_for(config, name, "executorch", quant, device, threads, context,
                                 two_digit_activations).memory
        if memory.fits:
            return context, (f"{why}; predicted peak {memory.peak_mib:.0f} MiB within the "
                             f"{memory.budget_mib:.0f} MiB app budget")
        if context // 2 < floor:
            raise EdgeMLLMError(f"the model does not fit {device.key}'s {memory.budget_mib:.0f} MiB app budget even "
                                f"with a {context}-position context (predicted {memory.peak_mib:.0f} MiB)")
        context //= 2
        why = f"halved until the predicted peak memory fits the {memory.budget_mib:.0f} MiB app budget"


def plan_target(device: DeviceProfile, config: MLLMConfig, name: str, *, quantized: str | None = None,
                fmt: str | None = None, quant: str | None = None, max_context: int | None = None,
                available=delegate_missing, two_digit_activations: bool = False) -> TargetPlan:
    """The export settings for ``device``. ``quantized``: the model's own scheme, if it has codes;
    ``fmt`` / ``quant`` / ``max_context``: the user's explicit choices, which win (the context is sized
    for ``two_digit_activations`` weights when asked). ``available``:
    ``fmt`` → why it cannot be exported here, or None (tests replace it)."""
    picked_quant = quant is None and quantized is None and config.weight_grid is None
    on_grid = quant is None and quantized is None and config.weight_grid is not None
    if quant is not None:
        quant_reason = "given (--quant)"
    elif quantized is not None:
        quant_reason = f"the model's own {quantized} codes"
    elif on_grid:
        quant = config.weight_grid
        quant_reason = (f"the {quant} grid the LLM was trained on (quantization-aware LoRA): its codes are the "
                        "trained weights exactly")
    else:
        quant = DEFAULT_SCHEME
        quant_reason = ("our 4-bit codes, group 32, symmetric: ExecuTorch 8da4w / GGUF Q4_0 / "
                        "ONNX MatMulNBits on the same codes")
    threads = _threads(device)
    reasons = {"format": "given (--format)", "quant": quant_reason}
    if fmt is None:
        context = min(config.text.max_position_embeddings, PHONE_CONTEXT)
        fmt, reasons["format"] = _pick_format(
            device, lambda f: predict_for(config, name, f, quant or quantized, device, threads, context).decode_tok_s,
            available)
    grid = QuantScheme.parse(quant) if on_grid else None
    if grid is not None and not grid.mixed:
        if fmt.startswith("executorch"):
            reasons["quant"] += ("; all at 4 bits: XNNPACK would run 8-bit group-wise linears (-mixed) in fp32, "
                                 "larger and slower")
        else:
            quant = replace(grid, mixed=True).name
            reasons["quant"] += (f"; with the token embedding / LM head and the first and last blocks at 8 bits "
                                 f"({quant}): {fmt}'s 4-bit operators take activations as floats, so the 4-bit "
                                 "embedding is what is left to lose, and 8 bits keep it")
    if picked_quant and fmt.startswith("executorch"):
        quant = EXECUTORCH_SCHEME
        reasons["quant"] = ("our 4-bit codes, group 32, symmetric, with SmoothQuant's scale migration: ExecuTorch's "
                            "8da4w linears also round activations to int8 per token, and moving the outlier channels "
                            "into the weights first keeps its answers close to the model's (calibrates first)")
    reasons["threads"] = ("this host's cores" if device.key == HOST else
                          f"the big cores ({threads} of {device.cores}; runtimes avoid the efficiency cores)")
    if max_context is None:
        context, reasons["max_context"] = _max_context(config, name, fmt, quant or quantized, device, threads,
                                                       two_digit_activations)
    else:
        context = min(max_context, config.text.max_position_embeddings)
        reasons["max_context"] = "given (--max-context)"
    return TargetPlan(device=device.key, format=fmt, backend=backend_for_format(fmt).name, quant=quant,
                      threads=threads, max_context=context, reasons=reasons)


def export_for_target(loaded, device: DeviceProfile, out_dir, *, fmt: str | None = None, quant: str | None = None,
                      max_context: int | None = None, progress: bool = True, fuse_vision: bool = True,
                      int8_vision: bool = False, two_digit_activations: bool = False,
                      ) -> tuple[TargetPlan, dict, Prediction | None, str | None]:
    """Plan for ``device``, export ``loaded`` (an edge-mllm ``LoadedModel``) with the plan's format,
    quantization and context, and record the plan and the prediction in the bundle's
    ``manifest.json`` under ``target``. → (plan, manifest, prediction, why there is no prediction)."""
    import json
    import os

    from edge_mllm.export.bundle import MANIFEST, export_bundle

    config = loaded.model.config
    name = os.path.basename(os.path.normpath(str(out_dir)))
    own = loaded.quantization.scheme if loaded.quantization is not None else None
    plan = plan_target(device, config, name, quantized=own, fmt=fmt, quant=quant, max_context=max_context,
                       two_digit_activations=two_digit_activations)
    prediction, unpredicted = None, None
    try:
        prediction = predict_for(config, name, plan.format, plan.quant or own, device, plan.threads,
                                 plan.max_context, two_digit_activations)
    except ConfigError as exc:
        unpredicted = str(exc)
    target = plan.to_dict() | {"prediction": _summary(prediction) if prediction else unpredicted}
    out = export_bundle(loaded, plan.format, out_dir, quant=plan.quant, progress=progress, fuse_vision=fuse_vision,
                        int8_vision=int8_vision, max_context=plan.max_context, manifest_extra={"target": target},
                        two_digit_activations=two_digit_activations)
    return plan, json.loads((out / MANIFEST).read_text()), prediction, unpredicted


def _summary(p: Prediction) -> dict:
    """The prediction's headline numbers, for the manifest."""
    return {"vision_encode_s": p.vision_encode_s, "ttft_s": p.ttft_s, "prefill_tok_s": p.prefill_tok_s,
            "decode_tok_s": p.decode_tok_s, "peak_memory_mib": p.memory.peak_mib,
            "app_budget_mib": p.memory.budget_mib, "fits": p.memory.fits, "prompt_tokens": p.prompt_tokens,
            "images": p.images, "notes": p.notes}
