"""Quantize a MultimodalLM's weights by a scheme: the one entry point every command and export uses.

Decoder blocks are processed in order on calibration sequences (GPTQ / AWQ / SmoothQuant): each block sees the
outputs of the already-quantized blocks before it, as it will at run time. The model's weights are
replaced in place by their dequantized values, so the PyTorch model computes what the quantized
runtimes compute; the integer codes come back for packing into each runtime's format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from edge_mllm.quant.gptq import HessianAccumulator, gptq_quantize
from edge_mllm.quant.groupwise import QuantizedTensor, as_matrix, double_quantize, quantize_rtn
from edge_mllm.quant.scaling import apply_scales, migration_groups, search_scales, smoothquant_scales
from edge_mllm.quant.scheme import QuantScheme, TensorPlan, plan_tensor
from edge_mllm.quant.storage import QuantizedWeights
from torch import nn
from tqdm import tqdm

from edge_mllm.errors import QuantError
from edge_mllm.model.llama import LlamaDecoderLayer
from edge_mllm.model.mllm import MultimodalLM

LLM_PREFIX = "language_model."


@dataclass
class TensorReport:
    bits: int
    group_size: int
    method: str
    weight_error: float  # ‖W − Ŵ‖ / ‖W‖
    output_error: float | None = None  # ‖(W − Ŵ)X‖² / ‖WX‖² on calibration inputs (GPTQ's objective)


@dataclass
class QuantizationResult:
    scheme: QuantScheme
    tensors: dict[str, QuantizedTensor]  # parameter name → codes
    report: dict[str, TensorReport] = field(default_factory=dict)

    def weights(self) -> QuantizedWeights:
        """The codes, as stored in a checkpoint and packed by exporters."""
        return QuantizedWeights(self.scheme.name, self.tensors)


def unique_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by name, tied ones once (under their first name)."""
    return dict(model.named_parameters())


def _output_error(weight: torch.Tensor, qt: QuantizedTensor, hessian: torch.Tensor) -> float:
    w = as_matrix(weight)
    delta = w - as_matrix(qt.dequantize())
    return float(((delta @ hessian) * delta).sum() / ((w @ hessian) * w).sum().clamp_min(1e-12))


def _quantize_one(weight: torch.Tensor, plan: TensorPlan, hessian: torch.Tensor | None) -> QuantizedTensor:
    group = plan.group_size or as_matrix(weight).shape[1]
    if plan.method in ("gptq", "awq+gptq") and hessian is not None:
        qt = gptq_quantize(weight, hessian, plan.bits, group, plan.symmetric, float_min=plan.float_min)
        target = qt.dequantize()  # GPTQ's compensated values, not the original weight
    else:
        qt, target = quantize_rtn(weight, plan.bits, group, plan.symmetric, plan.float_min), weight
    return double_quantize(qt, target) if plan.double_quant else qt


class _InputRecorder:
    """Forward pre-hooks that keep each linear's inputs (rows) for one block's calibration pass."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
        self._handles = [
            lin.register_forward_pre_hook(lambda _m, args, name=name: self.inputs[name].append(args[0].detach()))
            for name, lin in linears.items()
        ]

    def rows(self, name: str) -> torch.Tensor:
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self.inputs[name]])

    def divide(self, name: str, scales: torch.Tensor) -> None:
        """What the linear reads once ``scales`` are folded into its producer: each input ÷ ``scales``."""
        self.inputs[name] = [x / scales for x in self.inputs[name]]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _migrate_scales(layer: LlamaDecoderLayer, rec: _InputRecorder, names: dict[str, str], plan: TensorPlan,
                    smooth: bool) -> None:
    """Fold per-channel scales into the block: SmoothQuant's when ``smooth``, else AWQ's search. The
    recorded inputs follow (the consumers now read them ÷ the scales, the block's output is unchanged),
    so GPTQ's Hessians need no second calibration pass."""
    name_of = {module: name for name, module in layer.named_modules()}
    for producer, consumers, reader in migration_groups(layer):
        x = rec.rows(names[reader])
        scales = (smoothquant_scales(consumers, x) if smooth else
                  search_scales(consumers, x, plan.bits, plan.group_size, plan.symmetric, plan.float_min))
        apply_scales(producer, consumers, scales)
        for consumer in consumers:
            rec.divide(name_of[consumer], scales)


@torch.no_grad()
def quantize_model(
    model: MultimodalLM,
    scheme: QuantScheme,
    calibration: Sequence[torch.Tensor] | None = None,
    progress: bool = True,
) -> QuantizationResult:
    """Quantize ``model`` in place by ``scheme``.

    ``calibration``: inputs_embeds [1, T, D] sequences (text and image prompts from the model's own
    domain), needed by GPTQ, AWQ and ``-sq``. Returns the codes and a per-tensor error report.
    """
    if scheme.needs_calibration and not calibration:
        raise QuantError(f"{scheme.name} needs calibration data (--calib)")
    model.eval()
    llm = model.language_model
    llm.clear_cache()
    num_layers = llm.config.num_hidden_layers
    params = unique_parameters(model)
    plans = {name: plan_tensor(scheme, name, tuple(p.shape), num_layers) for name, p in params.items()}
    result = QuantizationResult(scheme, {})

    def store(name: str, qt: QuantizedTensor, hessian: torch.Tensor | None = None) -> None:
        param = params[name]
        plan = plans[name]
        weight_error = float((param.float() - qt.dequantize()).norm() / param.float().norm().clamp_min(1e-12))
        out_err = None if hessian is None else _output_error(param, qt, hessian)
        result.report[name] = TensorReport(plan.bits, plan.group_size, plan.method, weight_error, out_err)
        result.tensors[name] = qt
        param.copy_(qt.dequantize().to(param.dtype))

    if calibration:
        _quantize_blocks(model, plans, calibration, store, progress, scheme.smooth)
    for name, plan in plans.items():
        if plan is not None and name not in result.tensors:
            store(name, _quantize_one(params[name], plan, None))
    return result


def _quantize_blocks(
    model: MultimodalLM,
    plans: dict[str, TensorPlan | None],
    calibration: Sequence[torch.Tensor],
    store: Callable[..., None],
    progress: bool,
    smooth: bool = False,
) -> None:
    llm = model.language_model
    hidden = [x.detach().float() for x in calibration]
    params = unique_parameters(model)
    for index, layer in enumerate(tqdm(llm.model.layers, desc="calibrating blocks", disable=not progress)):
        prefix = f"{LLM_PREFIX}model.layers.{index}."
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        short = {n.rsplit(".", 1)[-1]: n for n in linears}
        rec = _InputRecorder(linears)
        for x in hidden:
            _run_layer(llm, layer, x)
        rec.remove()
        plan_any = next(p for n, p in plans.items() if n.startswith(prefix) and p is not None)
        if smooth or plan_any.method in ("awq", "awq+gptq"):
            _migrate_scales(layer, rec, short, plan_any, smooth)
        for name in linears:
            full = f"{prefix}{name}.weight"
            plan = plans.get(full)
            if plan is None:
                continue
            acc = HessianAccumulator(params[full].shape[1])
            for x in rec.inputs[name]:
                acc.add(x)
            hessian = acc.hessian
            store(full, _quantize_one(params[full], plan, hessian), hessian)
        hidden = [_run_layer(llm, layer, x) for x in hidden]
    head = f"{LLM_PREFIX}lm_head.weight"
    tied = head not in params
    if tied:
        head = f"{LLM_PREFIX}model.embed_tokens.weight"
    plan = plans.get(head)
    if plan is not None:
        acc = HessianAccumulator(params[head].shape[1])
        for x in hidden:
            acc.add(llm.model.norm(x))
        objective = tied_head_hessian(params[head], acc.hessian) if tied else acc.hessian
        store(head, _quantize_one(params[head], plan, objective), acc.hessian)


def tied_head_hessian(weight: torch.Tensor, head_hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ's objective for an LM head tied to the token embedding. GPTQ on the head alone minimises
    the logits' error, tr(ΔW H ΔWᵀ), and pushes the rounding error of each row into the directions the
    final hidden states rarely take; but the same rows are also read as they are, as the prompt's
    token embeddings, where every direction counts (||ΔW||²). The two uses' relative errors are
    weighed equally: H / tr(W H Wᵀ) + I / ||W||²."""
    w = as_matrix(weight).float()
    out_scale = ((w @ head_hessian) * w).sum().clamp_min(1e-12)
    in_scale = (w * w).sum().clamp_min(1e-12)
    return head_hessian / out_scale + torch.eye(head_hessian.shape[0]) / in_scale


def _run_layer(llm: nn.Module, layer: LlamaDecoderLayer, x: torch.Tensor) -> torch.Tensor:
    t = x.shape[1]
    positions = torch.arange(t)
    return layer(x, llm.rope_cos[positions], llm.rope_sin[positions], None)
