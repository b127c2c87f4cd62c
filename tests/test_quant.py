"""Quantization: round-trip error bounds per scheme, packing equal to each format's reference layout
(gguf-py's bytes; onnxruntime's MatMulNBits / GatherBlockQuantized kernels), GPTQ beating RTN where
inputs are correlated, AWQ's scaling leaving the float model unchanged, clear errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from edge_mllm.export.gguf.blocks import ggml_type, pack_blocks
from edge_mllm.export.onnx.nbits import pack_nbits
from edge_mllm.quant.gptq import HessianAccumulator, gptq_quantize
from edge_mllm.quant.groupwise import quantize_rtn, relative_error
from edge_mllm.quant.quantize import _InputRecorder, _migrate_scales, _run_layer, quantize_model
from edge_mllm.quant.scaling import apply_scales, search_scales, smoothquant_scales
from edge_mllm.quant.scheme import QuantScheme, TensorPlan, plan_tensor
from edge_mllm.quant.storage import fp16_bytes
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from torch import nn

from edge_mllm.checkpoint import load_model, save_native
from edge_mllm.errors import CheckpointError, QuantError


def weights(rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, ::37] *= 6  # outlier columns, as real LLM weights have
    return w


# ----------------------------------------------------------------------------------------------
# group-wise round trip


@pytest.mark.parametrize(
    ("bits", "group", "symmetric", "bound"),
    [(4, 32, True, 0.16), (4, 128, True, 0.28), (4, 32, False, 0.13), (4, 64, False, 0.16),
     (8, 32, True, 0.012), (8, 128, False, 0.014)],
)
def test_round_trip_error_is_bounded(bits, group, symmetric, bound):
    w = weights()
    qt = quantize_rtn(w, bits, group, symmetric)
    err = relative_error(w, qt)
    assert 0 < err < bound
    codes = qt.codes
    lo, hi = (-8, 7) if (bits, symmetric) == (4, True) else (-127, 127) if symmetric else (0, 2**bits - 1)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    # per element, the error is at most half a step of its group (plus the fp16 scale's rounding); Q4_0's
    # codes reach −8·d but only +7·d, so a value opposite the group's extreme may lose one whole step
    step = qt.scales.float().repeat_interleave(group, dim=1).abs()
    steps = 1.0 if (bits, symmetric) == (4, True) else 0.5
    assert bool(((w - qt.dequantize()).abs() <= step * steps + 1e-3 * w.abs().max()).all())
    assert qt.nbytes() < w.numel() * 2 * (bits / 16 + 0.07)


def test_more_bits_and_smaller_groups_are_more_accurate():
    w = weights()
    err = {(b, g): relative_error(w, quantize_rtn(w, b, g)) for b in (4, 8) for g in (32, 128)}
    assert err[(4, 32)] < err[(4, 128)]
    assert err[(8, 32)] < err[(4, 32)] / 10


def test_convs_quantize_per_output_channel_in_their_shape():
    conv = torch.randn(16, 1, 3, 3)
    qt = quantize_rtn(conv, 8, 9)
    assert qt.dequantize().shape == conv.shape
    assert relative_error(conv, qt) < 0.01


# ----------------------------------------------------------------------------------------------
# formats: GGUF blocks equal gguf-py's; ONNX Runtime's kernels compute our dequantized matmul


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0])
def test_our_blocks_equal_gguf_py(qtype):
    w = weights(64, 512, seed=1)
    w[3, :32] = 0  # an all-zero block
    bits = 4 if qtype == GGMLQuantizationType.Q4_0 else 8
    qt = quantize_rtn(w, bits, 32)
    data, got_type = pack_blocks(qt)
    assert got_type == qtype
    reference = gguf_quantize(w.numpy(), qtype)
    assert data.shape == reference.shape
    assert np.array_equal(data, reference)
    assert np.array_equal(gguf_dequantize(data, qtype), qt.dequantize().numpy())


def test_float_minimum_codes_are_gguf_py_q4_1_byte_for_byte():
    w = weights(64, 512, seed=1)
    w[3, :32] = 0.25  # a constant block
    qt = quantize_rtn(w, 4, 32, float_min=True)
    data, qtype = pack_blocks(qt)
    assert qtype == GGMLQuantizationType.Q4_1
    reference = gguf_quantize(w.numpy(), GGMLQuantizationType.Q4_1)
    assert np.array_equal(data, reference)
    assert np.array_equal(gguf_dequantize(data, qtype), qt.dequantize().numpy())


def test_weights_on_a_q4_1_grid_requantize_exactly_only_with_a_float_minimum():
    """SmolLM2 ships as Q4_1: its dequantized weights lie on such a grid. The -min form recovers them;
    an integer zero point or a symmetric grid cannot."""
    w = weights(64, 512, seed=7)
    on_grid = torch.from_numpy(gguf_dequantize(gguf_quantize(w.numpy(), GGMLQuantizationType.Q4_1),
                                               GGMLQuantizationType.Q4_1))
    assert relative_error(on_grid, quantize_rtn(on_grid, 4, 32, float_min=True)) < 1e-6
    assert relative_error(on_grid, quantize_rtn(on_grid, 4, 32, symmetric=False)) > 0.02
    assert relative_error(on_grid, quantize_rtn(on_grid, 4, 32)) > 0.02
    with pytest.raises(QuantError, match="4-bit only"):
        quantize_rtn(w, 8, 32, float_min=True)


@pytest.mark.parametrize("float_min", [True, False])
def test_double_quantized_scales_cost_half_a_bit_and_pack_as_ggml_blocks(float_min):
    from edge_mllm.quant.groupwise import double_quantize

    w = weights(64, 512, seed=8)
    w[5, :32] = 0  # a zero group
    on_grid = torch.from_numpy(gguf_dequantize(gguf_quantize(w.numpy(), GGMLQuantizationType.Q4_1),
                                               GGMLQuantizationType.Q4_1))
    qt = quantize_rtn(on_grid, 4, 32, float_min=float_min)
    dq = double_quantize(qt, on_grid)
    rows, groups = qt.scales.shape
    params = 2 if float_min else 1  # a byte saved per group parameter, fp16 steps added per row
    assert qt.nbytes() - dq.nbytes() == rows * groups * params - rows * 2 * (3 if float_min else 1)
    assert relative_error(on_grid, dq) < (0.02 if float_min else 1.02 * relative_error(on_grid, qt))
    data, qtype = pack_blocks(dq)  # the fp16 values the steps give are what GGUF stores
    assert np.array_equal(gguf_dequantize(data, qtype), dq.dequantize().numpy())


def test_asymmetric_codes_pack_as_q4_1():
    w = weights(32, 256, seed=2)
    qt = quantize_rtn(w, 4, 32, symmetric=False)
    data, qtype = pack_blocks(qt)
    assert qtype == GGMLQuantizationType.Q4_1
    # Q4_1 stores the minimum as fp16 rather than an integer zero point: equal up to its rounding
    got = gguf_dequantize(data, qtype)
    step = qt.scales.float().numpy().max()
    assert np.abs(got - qt.dequantize().numpy()).max() < 0.01 * step
    assert relative_error(w, qt) < 0.13


def test_unpackable_codes_are_refused():
    with pytest.raises(QuantError, match="group size 64"):
        ggml_type(quantize_rtn(weights(), 4, 64))
    with pytest.raises(QuantError, match="8-bit asymmetric"):
        ggml_type(quantize_rtn(weights(), 8, 32, symmetric=False))


def _run_ort(node, inputs: dict[str, np.ndarray], initializers: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in inputs.items()],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, n) for n, v in initializers.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


@pytest.mark.parametrize(("bits", "group", "symmetric"),
                         [(4, 32, True), (4, 64, False), (8, 32, True), (4, 128, True)])
def test_matmul_nbits_runs_in_onnxruntime_as_our_dequantized_matmul(bits, group, symmetric):
    from onnx import helper

    w = weights(48, 256, seed=3)
    w[2, :32] = -0.1  # a constant group
    qt = quantize_rtn(w, bits, group, symmetric)
    packed = pack_nbits(qt)
    init = {"B": packed.data, "scales": packed.scales}
    inputs = ["A", "B", "scales"]
    if packed.zero_points is not None:
        init["zero_points"] = packed.zero_points
        inputs.append("zero_points")
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft",
        K=packed.cols, N=packed.rows, bits=bits, block_size=group, accuracy_level=1,
    )
    a = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    got = _run_ort(node, {"A": a.numpy()}, init)
    expected = (a @ qt.dequantize().T).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_float_minimum_linear_runs_in_onnxruntime_through_its_offsets():
    """MatMulNBits' float zero points leave ONNX Runtime's fast kernels: the surgery keeps the integer
    default zero point and adds each group's offset beside it; the graph computes our weights."""
    import onnxruntime as ort
    from edge_mllm.export.onnx.surgery import to_matmul_nbits
    from onnx import TensorProto, helper, numpy_helper

    w = weights(48, 256, seed=3)
    w[2, :32] = -0.1  # a constant group
    qt = quantize_rtn(w, 4, 32, float_min=True)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["A", "Wt"], ["Y"])],
        "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w.numpy(), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert to_matmul_nbits(model, {"W": qt}, accuracy_level=1) == {"W"}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1 and len(nbits[0].input) == 3  # no float zero points
    a = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"A": a.numpy()})[0]
    expected = (a @ qt.dequantize().T).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_linears_of_one_input_share_one_matmul_nbits_in_onnxruntime():
    """Linears reading the same input with codes of one layout become one MatMulNBits over their
    stacked rows, split after (zero points of an odd block count padded per row); others stay apart."""
    import onnxruntime as ort
    from edge_mllm.export.onnx.surgery import to_matmul_nbits
    from onnx import TensorProto, helper, numpy_helper

    codes = {"W1": quantize_rtn(weights(48, 96, seed=6), 4, 32, symmetric=False),
             "W2": quantize_rtn(weights(16, 96, seed=7), 4, 32, symmetric=False),
             "W3": quantize_rtn(weights(32, 96, seed=8), 4, 32, float_min=True)}
    nodes = []
    for name in codes:
        nodes += [helper.make_node("Transpose", [name], [f"{name}t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["A", f"{name}t"], [f"Y{name[1]}"], name=f"matmul{name[1]}")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, 96])],
        [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, None) for i in "123"],
        [numpy_helper.from_array(qt.dequantize().numpy(), name) for name, qt in codes.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert to_matmul_nbits(model, codes, accuracy_level=1) == set(codes)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert [next(a.i for a in n.attribute if a.name == "N") for n in nbits] == [64, 32]
    assert [n.op_type for n in model.graph.node].count("Split") == 1
    a = torch.randn(5, 96, generator=torch.Generator().manual_seed(9))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, qt in zip(session.run(None, {"A": a.numpy()}), codes.values(), strict=True):
        expected = (a @ qt.dequantize().T).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_float_minimum_embedding_gathers_its_rows_in_onnxruntime():
    """GatherBlockQuantized takes integer zero points only: the surgery adds the rows' minimums."""
    import onnxruntime as ort
    from edge_mllm.export.onnx.surgery import to_gather_block_quantized
    from onnx import TensorProto, helper, numpy_helper

    table = weights(40, 64, seed=5)
    qt = quantize_rtn(table, 4, 32, float_min=True)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["Y"], name="embed")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table.numpy(), "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert to_gather_block_quantized(model, {"table": qt}) == {"table"}
    assert "table" not in {i.name for i in model.graph.initializer}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, 39, 7]], dtype=np.int64)
    got = session.run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, qt.dequantize().numpy()[ids], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_block_quantized_embeds_as_our_dequantized_rows(symmetric):
    from onnx import helper

    table = weights(40, 64, seed=5)
    qt = quantize_rtn(table, 4, 32, symmetric)
    packed = pack_nbits(qt)
    init = {"data": packed.data.reshape(packed.rows, -1), "scales": packed.scales}
    inputs = ["data", "ids", "scales"]
    if packed.zero_points is not None:
        init["zero_points"] = packed.zero_points.reshape(packed.rows, -1)
        inputs.append("zero_points")
    node = helper.make_node(
        "GatherBlockQuantized", inputs, ["Y"], domain="com.microsoft",
        gather_axis=0, quantize_axis=1, block_size=32, bits=4,
    )
    ids = np.array([[0, 7, 39, 7]], dtype=np.int64)
    got = _run_ort(node, {"ids": ids}, init)
    np.testing.assert_allclose(got, qt.dequantize().numpy()[ids], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# GPTQ and AWQ


def correlated_inputs(cols: int = 128, rows: int = 2048, seed: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, cols, generator=g)
    return torch.randn(rows, 16, generator=g) @ basis + 0.05 * torch.randn(rows, cols, generator=g)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((x @ (w - w_hat).T).norm() / (x @ w.T).norm())


def test_gptq_beats_rtn_on_correlated_inputs():
    w = weights(64, 128, seed=7)
    x = correlated_inputs()
    acc = HessianAccumulator(128)
    acc.add(x[None])
    gptq = gptq_quantize(w, acc.hessian, 4, 32, symmetric=True)
    rtn = quantize_rtn(w, 4, 32)
    assert output_error(w, gptq.dequantize(), x) < 0.5 * output_error(w, rtn.dequantize(), x)
    assert gptq.codes.abs().max() <= 8 and gptq.group_size == 32
    # GPTQ trades weight error for output error
    assert relative_error(w, gptq) > relative_error(w, rtn) * 0.9


def test_tied_head_objective_sits_between_gptq_and_rtn():
    """A tied LM head is also the token embedding: its GPTQ objective keeps the weight error near RTN's
    while still cutting the logits' error below RTN's."""
    from edge_mllm.quant.quantize import tied_head_hessian

    w = weights(64, 128, seed=7)
    x = correlated_inputs()
    acc = HessianAccumulator(128)
    acc.add(x[None])
    plain = gptq_quantize(w, acc.hessian, 4, 32, symmetric=True)
    tied = gptq_quantize(w, tied_head_hessian(w, acc.hessian), 4, 32, symmetric=True)
    rtn = quantize_rtn(w, 4, 32)
    assert relative_error(w, tied) < relative_error(w, plain)
    assert output_error(w, tied.dequantize(), x) < output_error(w, rtn.dequantize(), x)


def test_awq_scaling_keeps_the_float_layer_exact_and_lowers_its_error():
    g = torch.Generator().manual_seed(8)
    norm_weight = torch.nn.Parameter(torch.rand(128, generator=g) + 0.5)
    linear = torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weights(64, 128, seed=9))
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 30  # salient input channels, as LLM activations have
    producer = torch.nn.Module()
    producer.weight = norm_weight
    before = linear(x * norm_weight).detach()
    rtn_error = output_error(linear.weight.detach(), quantize_rtn(linear.weight, 4, 32).dequantize(), x * norm_weight)

    scales = search_scales([linear], (x * norm_weight).detach(), 4, 32, True)
    apply_scales(producer, [linear], scales)
    after = linear(x * norm_weight).detach()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    awq_error = output_error(before_w := linear.weight.detach(), quantize_rtn(before_w, 4, 32).dequantize(),
                             (x * norm_weight).detach())
    assert awq_error < rtn_error


def per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """What XNNPACK's 8da4w linears read: each row (token) rounded to 256 asymmetric int8 steps."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    step = ((hi - lo) / 255).clamp_min(1e-12)
    zero = torch.round(-lo / step) - 128
    return (torch.clamp(torch.round(x / step) + zero, -128, 127) - zero) * step


def test_smoothquant_scaling_keeps_the_float_layer_exact_and_lowers_the_int8_activation_error():
    g = torch.Generator().manual_seed(10)
    norm_weight = torch.nn.Parameter(torch.rand(128, generator=g) + 0.5)
    linears = [torch.nn.Linear(128, 64, bias=False) for _ in range(2)]
    with torch.no_grad():
        for k, lin in enumerate(linears):
            lin.weight.copy_(weights(64, 128, seed=11 + k))
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 50  # outlier channels: each token's int8 step is set by them
    producer = torch.nn.Module()
    producer.weight = norm_weight

    def outputs(quantize_input: bool) -> list[torch.Tensor]:
        h = x * norm_weight
        return [lin(per_token_int8(h) if quantize_input else h).detach() for lin in linears]

    before, before_int8 = outputs(False), outputs(True)
    apply_scales(producer, linears, smoothquant_scales(linears, (x * norm_weight).detach()))
    after, after_int8 = outputs(False), outputs(True)
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    error_before = sum(float((q - f).norm() / f.norm()) for q, f in zip(before_int8, before, strict=True))
    error_after = sum(float((q - f).norm() / f.norm()) for q, f in zip(after_int8, after, strict=True))
    assert error_after < 0.5 * error_before, (error_after, error_before)


# ----------------------------------------------------------------------------------------------
# schemes and the model-level quantizer


@pytest.mark.parametrize(
    ("name", "message"),
    [("int4", "unknown quantization scheme"), ("foo-w4-g32", "unknown quantization method"),
     ("rtn-w3-g32", "3-bit"), ("rtn-w4-g48", "group size 48"), ("rtn-w4-g32-sym", "unknown quantization scheme"),
     ("rtn-w8-g32-min", "4-bit only"), ("rtn-w4-g32-asym-min", "unknown quantization scheme"),
     ("rtn-w4-g32-asym-dq", "integer zero points"), ("awq-w4-g32-sq", "both pick per-channel scales"),
     ("gptq-w4-g32-mixed-sq", "unknown quantization scheme")],
)
def test_bad_scheme_names_are_clear(name, message):
    with pytest.raises(QuantError, match=message):
        QuantScheme.parse(name)


def test_scheme_names_round_trip():
    for name in ("rtn-w4-g32", "gptq-w4-g64-asym", "awq-w4-g128-mixed", "rtn-w8-g32-asym-mixed", "awq+gptq-w4-g32",
                 "awq-w4-g32-min-mixed", "gptq-w4-g32-min-dq-mixed", "rtn-w4-g64-dq", "gptq-w4-g32-sq",
                 "rtn-w4-g32-sq-mixed"):
        assert QuantScheme.parse(name).name == name
    assert QuantScheme.parse("AWQ-W4-G32").needs_calibration
    rtn_sq = QuantScheme.parse("rtn-w4-g32-sq")
    assert rtn_sq.smooth and rtn_sq.needs_calibration  # the scales come from calibration activations
    assert plan_tensor(rtn_sq, "language_model.model.embed_tokens.weight", (64, 64), 4).method == "rtn"


def test_incompatible_group_size_names_the_tensor():
    scheme = QuantScheme.parse("rtn-w4-g128")
    with pytest.raises(QuantError, match=r"language_model\.model\.layers\.0\.mlp\.down_proj\.weight.*96"):
        plan_tensor(scheme, "language_model.model.layers.0.mlp.down_proj.weight", (64, 96), 2)


def test_mixed_policy_keeps_sensitive_tensors_at_8_bits():
    scheme = QuantScheme.parse("awq-w4-g32-mixed")
    plan = {n: plan_tensor(scheme, f"language_model.{n}", (64, 64), 4)
            for n in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                      "model.layers.2.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight")}
    assert {n: p.bits for n, p in plan.items()} == {
        "model.embed_tokens.weight": 8, "model.layers.0.mlp.up_proj.weight": 8,
        "model.layers.2.mlp.up_proj.weight": 4, "model.layers.3.self_attn.q_proj.weight": 8}
    assert plan["model.layers.2.mlp.up_proj.weight"].method == "awq"
    assert plan["model.embed_tokens.weight"].method == "gptq"
    assert plan_tensor(scheme, "vision_tower.encoder.layers.0.mlp.fc1.weight", (64, 32), 4).bits == 8
    assert plan_tensor(scheme, "language_model.model.norm.weight", (64,), 4) is None


@pytest.fixture(scope="module")
def tiny_mllm(mobilevlm_v2):
    return load_model(mobilevlm_v2.path)


def _logits(model, ids):
    lm = model.language_model
    lm.clear_cache()
    with torch.no_grad():
        return lm(lm.embed(ids))[0]


@pytest.mark.parametrize(
    "scheme_name", ["rtn-w4-g32", "gptq-w4-g32", "awq-w4-g32-mixed", "awq+gptq-w4-g64-asym", "rtn-w8-g32-asym",
                    "gptq-w4-g32-min", "awq-w4-g32-min-dq", "gptq-w4-g32-sq", "rtn-w4-g32-sq"]
)
def test_quantize_model_replaces_weights_by_their_codes(tiny_mllm, scheme_name):
    model = copy.deepcopy(tiny_mllm.model)
    ids = torch.tensor([[1, 5, 9, 40, 77, 3, 120, 8]])
    reference = _logits(model, ids)
    embed = model.language_model.embed
    calibration = [embed(torch.randint(3, 300, (1, 32), generator=torch.Generator().manual_seed(s))) for s in range(4)]
    scheme = QuantScheme.parse(scheme_name)
    result = quantize_model(model, scheme, calibration if scheme.needs_calibration else None, progress=False)

    params = dict(model.named_parameters())
    assert set(result.tensors) == set(result.report)
    assert any(n.startswith("vision_tower.") for n in result.tensors)
    for name, qt in result.tensors.items():
        torch.testing.assert_close(params[name].detach().float(), qt.dequantize())  # the model computes the codes
    assert "language_model.model.norm.weight" not in result.tensors
    norm = "language_model.model.layers.0.input_layernorm.weight"
    scales_folded = not torch.equal(params[norm], dict(tiny_mllm.model.named_parameters())[norm])
    if scheme.smooth or "awq" not in scheme.method:  # AWQ's search may settle on scales of 1
        assert scales_folded == scheme.smooth
    got = _logits(model, ids)
    rel = float((got - reference).norm() / reference.norm())
    assert 0 < rel < (0.02 if scheme.bits == 8 else 0.5)
    # the tiny model's two blocks are both "first/last": -mixed keeps them at 8 bits
    eight_bit = scheme.bits == 8 or scheme.mixed
    assert result.weights().nbytes(model) < fp16_bytes(model) * (0.62 if eight_bit else 0.42)
    if scheme.needs_calibration:
        llm_reports = [r for n, r in result.report.items() if n.startswith("language_model.model.layers.")]
        assert all(r.output_error is not None and r.output_error < 0.2 for r in llm_reports)


@pytest.mark.parametrize("smooth", [True, False])
@torch.no_grad()
def test_migrated_block_inputs_follow_the_folded_scales_without_a_second_pass(tiny_mllm, smooth):
    # After folding, each linear reads its recorded input ÷ the scales: what a fresh pass records.
    llm = copy.deepcopy(tiny_mllm.model).language_model
    layer = llm.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    hidden = [llm.embed(torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(s))) for s in range(3)]

    def record() -> _InputRecorder:
        rec = _InputRecorder(linears)
        for x in hidden:
            _run_layer(llm, layer, x)
        rec.remove()
        return rec

    rec = record()
    plan = TensorPlan(4, 32, True, "awq")
    _migrate_scales(layer, rec, {n.rsplit(".", 1)[-1]: n for n in linears}, plan, smooth)
    fresh = record()
    if smooth:  # the scales did move something (AWQ's search may settle on 1)
        assert not torch.equal(layer.input_layernorm.weight,
                               tiny_mllm.model.language_model.model.layers[0].input_layernorm.weight)
    for name in linears:
        torch.testing.assert_close(rec.rows(name), fresh.rows(name), rtol=1e-4, atol=1e-5)  # float rounding


def test_data_aware_schemes_need_calibration(tiny_mllm):
    with pytest.raises(QuantError, match="needs calibration"):
        quantize_model(copy.deepcopy(tiny_mllm.model), QuantScheme.parse("gptq-w4-g32"), None, progress=False)


# ----------------------------------------------------------------------------------------------
# quantized checkpoints and the CLI


@pytest.mark.parametrize("scheme_name", ["rtn-w4-g32-asym", "rtn-w4-g32-min", "rtn-w4-g32-min-dq", "rtn-w4-g32-dq"])
def test_quantized_checkpoint_keeps_the_codes(tiny_mllm, tmp_path, scheme_name):
    loaded = copy.deepcopy(tiny_mllm)
    result = quantize_model(loaded.model, QuantScheme.parse(scheme_name), progress=False)
    loaded.quantization = result.weights()
    save_native(loaded, tmp_path / "q")
    back = load_model(tmp_path / "q")
    assert back.quantization.scheme == scheme_name
    for name, qt in result.tensors.items():
        got = back.quantization.tensors[name]
        assert torch.equal(got.codes, qt.codes) and torch.equal(got.scales, qt.scales)
        assert (got.double is None) == (qt.double is None)
        for field in ("zero_points", "mins"):
            ours, theirs = getattr(qt, field), getattr(got, field)
            assert (ours is None) == (theirs is None) and (ours is None or torch.equal(ours, theirs))
    ids = torch.tensor([[1, 5, 9, 40, 77]])
    torch.testing.assert_close(_logits(back.model, ids), _logits(loaded.model, ids))
    # 4-bit codes take half a byte: the file is far smaller than the float one
    float_size = (save_native(tiny_mllm, tmp_path / "f") / "model.safetensors").stat().st_size
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.6 * float_size


def test_incomplete_quantized_checkpoint_is_a_clear_error(tiny_mllm, tmp_path):
    from safetensors.torch import load_file, save_file

    loaded = copy.deepcopy(tiny_mllm)
    loaded.quantization = quantize_model(loaded.model, QuantScheme.parse("rtn-w4-g32"), progress=False).weights()
    folder = save_native(loaded, tmp_path / "q")
    state = load_file(folder / "model.safetensors")
    del state["language_model.model.layers.1.mlp.up_proj.weight.scales"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"incomplete.*up_proj\.weight\.scales"):
        load_model(folder)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_mllm.cli", *args], capture_output=True, text=True)


def test_cli_quantize_writes_model_and_report(mobilevlm_v2, tmp_path):
    out = tmp_path / "q"
    proc = _cli("quantize", str(mobilevlm_v2.path), "--scheme", "gptq-w4-g32", "-o", str(out), "--report",
                "--eval-scenes", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["scheme"] == "gptq-w4-g32"
    assert 0 < report["size"]["ratio_vs_fp16"] < 0.45
    assert report["quantized"]["kl_divergence"] > 0 and 0 < report["quantized"]["top1_agreement"] <= 1
    assert report["reference"]["vqa_accuracy"] is not None and "pope_f1_mean" in report["quantized"]
    assert json.loads((out / "quant_report.json").read_text())["size"] == report["size"]
    assert load_model(out).quantization.scheme == "gptq-w4-g32"
    # the folder's config predicts with its own scheme; another quantization on export is a usage error
    proc = _cli("simulate", "--config", str(out), "--device", "tensor-g3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["quantization"] == "gptq-w4-g32"
    proc = _cli("export", str(out), "--format", "gguf", "--quant", "q8_0", "-o", str(tmp_path / "b"))
    assert proc.returncode == 2 and "already quantized (gptq-w4-g32)" in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()


def test_cli_quantize_bad_scheme_is_a_usage_error(mobilevlm_v2, tmp_path):
    proc = _cli("quantize", str(mobilevlm_v2.path), "--scheme", "rtn-w4-g48", "-o", str(tmp_path / "q"))
    assert proc.returncode == 2 and "group size 48" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "q").exists()
