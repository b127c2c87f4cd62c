"""Build the ``.pte``: the staging of ExecuTorch's ``extension/llm`` export, for three methods.

source transform (``modules`` + ``quantize``) → ``torch.export`` per method → ``to_edge_transform_and_lower``
(one partitioner list per method, from ``targets``) → ``to_executorch`` → bytes. The constant methods the
LLM runners read (``extension/llm/runner/constants.h``: ``get_max_seq_len``, ``get_eos_ids``…) are added
at lowering.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from edge_mllm.quant.storage import QuantizedWeights
from torch.export import Dim, ExportedProgram
from tqdm import tqdm

from edge_mllm.checkpoint.base import LoadedModel

from .modules import FusedRGBVisionEncoder, TextDecoder, TokenEmbedding, VisionEncoder, load_custom_ops
from .quantize import VISION_INT8, NativeQuant, apply_codes, apply_native, dynamic_quantize_linears_, load_quantized_ops

# Deprecation notices torch 2.13 raises from inside ExecuTorch's own ops and pytree code, dozens per
# export (about 80 lines on the default model): meant for ExecuTorch's developers, not for a user.
LIBRARY_NOTICES = ("_check_is_size will be removed", r"`isinstance\(treespec, LeafSpec\)` is deprecated")

VISION_METHOD = "vision_encoder"
EMBEDDING_METHOD = "token_embedding"
DECODER_METHOD = "text_decoder"


@dataclass
class MethodSpec:
    """One method to export: the module, example inputs and torch.export dynamic shapes."""

    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple | None = None


def method_specs(
    vision: torch.nn.Module | None, embedding: torch.nn.Module, decoder: torch.nn.Module,
    image_size: int, hidden_size: int, max_seq_len: int, image_dtype: torch.dtype = torch.float32,
) -> dict[str, MethodSpec]:
    """The methods of a multimodal program with ExecuTorch's names. Prompt length is dynamic up to the
    cache length; the image is one fixed-size NCHW image: uint8 RGB for the fused encoder, normalised
    float32 for the reference one (our preprocessing makes either)."""
    tokens = Dim("tokens", min=1, max=max_seq_len)
    specs = {
        EMBEDDING_METHOD: MethodSpec(embedding, (torch.zeros(1, 4, dtype=torch.long),), ({1: tokens},)),
        DECODER_METHOD: MethodSpec(
            decoder,
            (torch.zeros(1, 4, hidden_size), torch.tensor([0], dtype=torch.long)),
            ({1: tokens}, None),
        ),
    }
    if vision is not None:
        specs[VISION_METHOD] = MethodSpec(vision, (torch.zeros(1, 3, image_size, image_size, dtype=image_dtype),))
    return specs


def runner_metadata(loaded: LoadedModel, max_seq_len: int) -> dict[str, object]:
    """Constant methods read by ExecuTorch's LLM runners (``get_llm_metadata`` / ``get_eos_ids`` in
    ``llm_runner_helper.cpp``) and by Android's ``LlmModule``."""
    tok = loaded.tokenizer
    text = loaded.model.config.text
    meta: dict[str, object] = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": text.vocab_size,
        "get_n_layers": text.num_hidden_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_eos_ids": list(tok.stop_token_ids()),
    }
    if tok.bos_token_id is not None:
        meta["get_bos_id"] = tok.bos_token_id
    return meta


def export_methods(specs: dict[str, MethodSpec], progress: bool,
                   step: Callable[[str], None] | None = None) -> dict[str, ExportedProgram]:
    """``torch.export`` each method (non-strict, as ExecuTorch's LLM export does). ``step(name)`` is
    called before each method (a caller's own progress bar)."""
    programs = {}
    for name, spec in tqdm(sorted(specs.items()), desc="torch.export", disable=not progress):
        if step is not None:
            step(f"torch.export {name}")
        with torch.no_grad():
            programs[name] = torch.export.export(
                spec.module.eval(), spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, strict=False
            )
    return programs


def lower_to_pte(
    programs: dict[str, ExportedProgram],
    partitioners: Callable[[str], list],
    constant_methods: dict[str, object],
    step: Callable[[str], None] | None = None,
) -> bytes:
    """Edge dialect + delegation + ExecuTorch program, serialized. ``step(stage)`` is called before
    each of the two stages (delegation, which packs the weights, takes most of the time)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if step is not None:
        step("lower (edge dialect, delegation)")
    edge = to_edge_transform_and_lower(
        programs,
        partitioner={name: partitioners(name) for name in programs},
        constant_methods=constant_methods,
        # the llama:: and quantized_decomposed:: ops are not core ATen: skip the IR validity check, as
        # ExecuTorch's own LLM exports do
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    if step is not None:
        step("memory planning, serialize")
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            # inputs come from the caller's buffers; planning them would copy every prompt
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            # plan dynamic shapes for their upper bound (the cache length), not the example's size
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )
    return program.buffer


@dataclass
class BuiltProgram:
    """A serialized program and what went into it (for the manifest)."""

    pte: bytes
    max_seq_len: int
    metadata: dict[str, object]
    methods: dict[str, dict] = field(default_factory=dict)
    quantized_tensors: list[str] = field(default_factory=list)

    @property
    def delegates(self) -> dict[str, dict[str, int]]:
        return delegates(self.pte)


def delegates(pte: bytes) -> dict[str, dict[str, int]]:
    """Delegate backends per method of a serialized program, with their partition counts."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    out: dict[str, dict[str, int]] = {}
    for plan in deserialize_pte_binary(pte).program.execution_plan:
        counts: dict[str, int] = {}
        for d in plan.delegates:
            counts[d.id] = counts.get(d.id, 0) + 1
        if counts or plan.name in (VISION_METHOD, EMBEDDING_METHOD, DECODER_METHOD):
            out[plan.name] = counts
    return out


def build_program(
    loaded: LoadedModel,
    weights: QuantizedWeights | None,
    native: NativeQuant | None,
    partitioners: Callable[[str, bool], list],
    max_seq_len: int,
    progress: bool = True,
    fuse_vision: bool = True,
    int8_vision: bool = False,
    outliers: dict[str, torch.Tensor] | None = None,
    high_steps: dict[str, float] | None = None,
) -> BuiltProgram:
    """``loaded`` → a serialized multimodal ExecuTorch program.

    ``weights``: our codes (4-bit linears → 8da4w, embedding → quantized lookup); ``native``: torchao's
    quantizer instead; neither: fp32. ``partitioners(method, quantized)`` picks the delegates.
    ``fuse_vision``: ``vision_encoder`` is ``FusedRGBVisionEncoder`` (uint8 RGB in) rather than the
    reference ``VisionEncoder`` (normalised pixels in). ``int8_vision``: its linears as int8 weights per
    output channel with int8 dynamic activations (``VISION_INT8``, XNNPACK's ``qd8-f32-qc8w`` GEMMs).
    ``outliers``: per decoder linear, the input channels our 4-bit codes multiply in fp32
    (``quantize.input_outliers``); ``high_steps``: per decoder linear, the high digit's step of its
    two-digit activations (``quantize.two_digit_steps``; None: XNNPACK's int8 rounding).
    """
    load_custom_ops()
    load_quantized_ops()
    model = loaded.model.eval()
    config = model.config
    # stages: source transform, torch.export of each method (2 or 3), delegation, serialization
    steps = tqdm(total=5 + config.has_vision, desc="executorch export", disable=not progress)
    steps.set_postfix_str("source transform")

    def step(stage: str) -> None:  # the stage shown is done
        steps.update()
        steps.set_postfix_str(stage)

    vision = None
    if config.has_vision:
        vision = FusedRGBVisionEncoder(model) if fuse_vision else VisionEncoder(model)
        if int8_vision:
            dynamic_quantize_linears_(vision, VISION_INT8)
    embedding = TokenEmbedding(model.language_model)
    decoder = TextDecoder(model.language_model, max_seq_len)
    used: list[str] = []
    if weights is not None:
        used = apply_codes(decoder, embedding, weights, prefix="language_model.", outliers=outliers,
                           high_steps=high_steps)
    elif native is not None:
        apply_native(decoder, embedding, native)
    quantized = weights is not None or native is not None
    image_size = config.vision.image_size if vision is not None else 0
    image_dtype = torch.uint8 if fuse_vision else torch.float32
    specs = method_specs(vision, embedding, decoder, image_size, config.text.hidden_size, max_seq_len, image_dtype)
    with warnings.catch_warnings():
        for notice in LIBRARY_NOTICES:
            warnings.filterwarnings("ignore", message=notice, category=FutureWarning)
        programs = export_methods(specs, progress=False, step=step)
        metadata = runner_metadata(loaded, max_seq_len)
        pte = lower_to_pte(programs, lambda name: partitioners(name, quantized or int8_vision), metadata, step)
    steps.update()
    steps.close()
    return BuiltProgram(pte, max_seq_len, metadata, describe_methods(specs, model, max_seq_len), used)


def non_delegated_ops(pte: bytes) -> dict[str, list[str]]:
    """Per method of a serialized program, the operators that run outside every delegate (on
    ExecuTorch's portable / optimized kernels)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    out = {}
    for plan in deserialize_pte_binary(pte).program.execution_plan:
        called = {i.instr_args.op_index for chain in plan.chains for i in chain.instructions
                  if hasattr(i.instr_args, "op_index")}
        out[plan.name] = sorted({plan.operators[k].name for k in called})
    return out


def describe_methods(specs: dict[str, MethodSpec], model: torch.nn.Module, max_seq_len: int) -> dict[str, dict]:
    """Inputs and outputs of each method, for apps that call them directly."""
    d = model.config.text.hidden_size
    out = {
        EMBEDDING_METHOD: {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, f"T<={max_seq_len}"]}],
                           "output": {"dtype": "float32", "shape": [1, "T", d]}},
        DECODER_METHOD: {"inputs": [{"name": "inputs_embeds", "dtype": "float32", "shape": [1, "T", d]},
                                    {"name": "start_pos", "dtype": "int64", "shape": [1]}],
                         "output": {"dtype": "float32", "shape": [1, model.config.text.vocab_size],
                                    "note": "logits of the last position; the KV cache is updated in place"}},
    }
    if VISION_METHOD in specs:
        s = model.config.vision.image_size
        fused = specs[VISION_METHOD].example_inputs[0].dtype == torch.uint8
        out[VISION_METHOD] = {
            "inputs": [{"name": "pixel_values", "dtype": "uint8" if fused else "float32", "shape": [1, 3, s, s],
                        "note": "RGB 0-255 (resized, cropped, padded; normalised in the graph)" if fused
                        else "normalised RGB, see image_preprocessing"}],
            "output": {"dtype": "float32", "shape": [1, model.num_image_tokens, d]},
        }
    return out
