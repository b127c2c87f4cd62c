"""The field's quantizers on our weights (edge_mllm.quant.engines): each engine's copy really is
quantized but stays close to the float model, leaves the input alone, reports the bytes its format
stores; ONNX Runtime's packed tensors unpack to what its own kernels compute; llama.cpp's quantizer
gives gguf-py's reference blocks back through our GGUF loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_llama
from edge_mllm.quant.calibration import calibration_set
from edge_mllm.quant.engines import (
    ENGINES,
    EngineResult,
    LlamaCppEngine,
    OrtMatMulNBitsEngine,
    TorchaoEngine,
    gather_block_tensor,
    get_engine,
    matmulnbits_tensor,
)
from edge_mllm.quant.storage import fp16_bytes
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from edge_mllm.checkpoint import load_model
from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.errors import QuantError

# Engines cheap enough for every run on the tiny model; the data-aware and K-quant ones are slow.
FAST = [
    "torchao-8da4w-g32",
    "ort-matmulnbits-w4-g32",
    "ort-matmulnbits-w4-g32-asym",
    "nncf-int4-sym-g64",
    "llamacpp-q4_0",
    "edge-mllm-rtn-w4-g32",
]
SLOW = [name for name in ENGINES if name not in FAST]


@pytest.fixture(scope="module")
def untied(llama_folder) -> LoadedModel:
    return load_model(llama_folder[0])


@pytest.fixture(scope="module")
def tied(tmp_path_factory, tokenizer) -> LoadedModel:
    folder = tmp_path_factory.mktemp("tied") / "llama"
    build_llama(folder, tokenizer, tie_word_embeddings=True, seed=7)
    return load_model(folder)


@pytest.fixture(scope="module")
def calibration(untied) -> list[torch.Tensor]:
    return calibration_set(untied, text_count=4, seq_len=64)


@pytest.fixture(scope="module")
def tied_calibration(tied) -> list[torch.Tensor]:
    return calibration_set(tied, text_count=4, seq_len=64)


def logits(loaded_or_result: LoadedModel | EngineResult, ids: torch.Tensor) -> torch.Tensor:
    llm = loaded_or_result.model.language_model
    llm.clear_cache()
    with torch.no_grad():
        return llm(llm.embed(ids))[0].float()


def token_ids(vocab: int = 320, length: int = 40) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(11))


def check_engine(name: str, loaded: LoadedModel, calibration: list[torch.Tensor]) -> EngineResult:
    """Run ``name``: a different, close model; the input untouched; a plausible size."""
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = get_engine(name).quantize(loaded, calibration)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items()), "input model modified"
    assert type(result.model.language_model) is type(loaded.model.language_model)

    ids = token_ids()
    ref, got = logits(loaded, ids), logits(result, ids)
    rel = float((got - ref).norm() / ref.norm())
    # The tiny random model is fragile (every 4-bit engine lands near 0.3); scrambled weights give ~1.4.
    assert 1e-3 < rel < (0.05 if "8_0" in name else 0.45), f"{name}: relative logit error {rel}"

    ratio = result.nbytes / fp16_bytes(loaded.model.language_model)
    # -mixed keeps the embedding and the first and last blocks at 8 bits: the tiny model's two blocks
    eight_bit = "8_0" in name or name.endswith("-mixed")
    low, high = (0.5, 0.6) if eight_bit else (0.25, 0.45)
    assert low < ratio < high, f"{name}: {result.nbytes} bytes = {ratio:.3f} of fp16"
    assert result.note
    return result


# ----------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_unknown_engine():
    for name, engine in ENGINES.items():
        assert engine.name == name
        assert isinstance(engine.needs_calibration, bool)
    assert ENGINES["nncf-int4-sym-g64-awq-se"].needs_calibration
    assert ENGINES["edge-mllm-awq-w4-g32"].needs_calibration
    assert not ENGINES["torchao-8da4w-g32"].needs_calibration
    with pytest.raises(QuantError, match="unknown engine"):
        get_engine("gptq-for-llama")


def test_calibrated_engine_refuses_to_run_without_data(untied):
    with pytest.raises(QuantError, match="calibration"):
        get_engine("nncf-int4-sym-g64-awq-se").quantize(untied, None)


# ----------------------------------------------------------------------------------------------
# every engine: quantized, close, input untouched, sized


@pytest.mark.parametrize("name", FAST)
def test_fast_engines_quantize_a_copy_close_to_the_float_model(untied, calibration, name):
    check_engine(name, untied, calibration)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_slow_engines_quantize_a_copy_close_to_the_float_model(untied, calibration, name):
    check_engine(name, untied, calibration)


@pytest.mark.parametrize("name", ["torchao-8da4w-g32", "ort-matmulnbits-w4-g32", "nncf-int4-sym-g64", "llamacpp-q4_0"])
def test_engines_on_a_tied_embedding(tied, tied_calibration, name):
    result = check_engine(name, tied, tied_calibration)
    llm = result.model.language_model
    ids = token_ids()
    with torch.no_grad():
        embeds, reference = llm.embed(ids), tied.model.language_model.embed(ids)
    rel = float((embeds - reference).norm() / reference.norm())
    assert 1e-3 < rel < 0.25  # the lookup works and is quantized
    if name.startswith("torchao"):  # ExecuTorch unties: a 4-bit lookup and a separate 8da4w head
        assert llm.lm_head.weight is not llm.model.embed_tokens.weight
    else:  # one quantized matrix serves both
        assert torch.equal(llm.lm_head.weight, llm.model.embed_tokens.weight)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SLOW if n.startswith(("nncf", "torchao"))])
def test_slow_engines_on_a_tied_embedding(tied, tied_calibration, name):
    check_engine(name, tied, tied_calibration)


# ----------------------------------------------------------------------------------------------
# stored sizes


def matrices(loaded: LoadedModel) -> tuple[list[tuple[int, int]], tuple[int, int], int]:
    """Linear weight shapes (LM head included), the embedding's shape, and the count of 1-D values."""
    llm = loaded.model.language_model
    linears = [tuple(m.weight.shape) for m in llm.modules() if isinstance(m, torch.nn.Linear)]
    vectors = sum(p.numel() for p in llm.parameters() if p.ndim == 1)
    return linears, tuple(llm.model.embed_tokens.weight.shape), vectors


def test_torchao_bytes_are_executorchs(untied):
    linears, (v, d), vectors = matrices(untied)
    engine = TorchaoEngine("t", group_size=32, embedding_bits=4, embedding_group=32)
    # XNNPACK: int4 codes + bf16 scales per group; ExecuTorch's embedding_4bit: int4 + fp32 scales
    expected = sum(n * k // 2 + 2 * n * k // 32 for n, k in linears) + v * d // 2 + 4 * v * d // 32 + 2 * vectors
    assert engine.quantize(untied).nbytes == expected


@pytest.mark.parametrize("symmetric", [True, False])
def test_ort_bytes_are_matmulnbits_initializers(untied, symmetric):
    linears, (v, d), vectors = matrices(untied)
    result = OrtMatMulNBitsEngine("o", block_size=32, symmetric=symmetric).quantize(untied)
    # int4 codes, fp32 scales (an fp32 model's), one zero-point nibble per block when asymmetric
    per_matrix = [(n * k // 2, n * k // 32) for n, k in [*linears, (v, d)]]
    expected = sum(codes + 4 * blocks + (0 if symmetric else blocks // 2) for codes, blocks in per_matrix)
    assert result.nbytes == expected + 2 * vectors


# ----------------------------------------------------------------------------------------------
# ONNX Runtime: unpacked weights = what its kernels compute from its packed tensors


def run_single_node(node, inputs: dict[str, np.ndarray], initializers: list) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
            for n, a in inputs.items()
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def ort_quantizer(block_size: int, symmetric: bool):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    return DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric))


@pytest.mark.parametrize(("block_size", "symmetric"), [(32, True), (32, False), (64, True)])
def test_matmulnbits_unpacking_matches_onnxruntime_kernel(untied, block_size, symmetric):
    from onnx import numpy_helper
    from onnx.helper import make_node

    weight = untied.model.language_model.model.layers[0].mlp.down_proj.weight.detach()  # [N=64, K=128]
    n, k = weight.shape
    packed, scales, zero_points = ort_quantizer(block_size, symmetric).qbits_block_quant(weight.T.contiguous().numpy())
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    if not symmetric:
        inits.append(numpy_helper.from_array(zero_points, "zero_points"))
    node = make_node(
        "MatMulNBits",
        ["A", "B", "scales"] + ([] if symmetric else ["zero_points"]),
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block_size,
        accuracy_level=1,
    )
    # A = I: the kernel's output is its dequantized B, [K, N]
    kernel = run_single_node(node, {"A": np.eye(k, dtype=np.float32)}, inits)
    ours = matmulnbits_tensor(packed, scales, None if symmetric else zero_points, block_size).dequantize()
    np.testing.assert_array_equal(ours.T.numpy(), kernel)
    assert float((ours - weight).norm() / weight.norm()) < 0.2

    # the engine's copy holds exactly these weights
    engine = OrtMatMulNBitsEngine("o", block_size=block_size, symmetric=symmetric)
    result = engine.quantize(untied)
    assert torch.equal(result.model.language_model.model.layers[0].mlp.down_proj.weight, ours)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_block_unpacking_matches_onnxruntime_kernel(untied, symmetric):
    from onnx import TensorProto, numpy_helper
    from onnx.helper import make_node, make_tensor

    table = untied.model.language_model.model.embed_tokens.weight.detach().numpy()  # [320, 64]
    packed, scales, zero_points = ort_quantizer(32, symmetric).quantize_ndarray(table, 1, 32, symmetric)
    int4 = TensorProto.INT4 if symmetric else TensorProto.UINT4  # as quantize_gather writes them
    inits = [
        make_tensor("data", int4, table.shape, packed.tobytes(), raw=True),
        numpy_helper.from_array(scales, "scales"),
    ]
    if not symmetric:
        inits.append(make_tensor("zero_points", int4, scales.shape, zero_points.tobytes(), raw=True))
    node = make_node(
        "GatherBlockQuantized",
        ["data", "ids", "scales"] + ([] if symmetric else ["zero_points"]),
        ["Y"],
        domain="com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=32,
        bits=4,
    )
    ids = np.arange(table.shape[0], dtype=np.int64)
    kernel = run_single_node(node, {"ids": ids}, inits)
    ours = gather_block_tensor(packed, scales, None if symmetric else zero_points, 32).dequantize()
    np.testing.assert_array_equal(ours.numpy(), kernel)
    assert float(np.linalg.norm(ours.numpy() - table) / np.linalg.norm(table)) < 0.2


# ----------------------------------------------------------------------------------------------
# llama.cpp: its quantizer's blocks, read back by our loader, are gguf-py's reference blocks


@pytest.mark.parametrize(("ftype", "matrix_type"), [("q4_0", "Q4_0"), ("q8_0", "Q8_0")])
def test_llamacpp_weights_are_gguf_reference_blocks(untied, ftype, matrix_type):
    result = LlamaCppEngine(f"llamacpp-{ftype}", ftype).quantize(untied)
    reference = untied.model.language_model.state_dict()
    got = result.model.language_model.state_dict()

    def round_trip(w: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
        return gguf_dequantize(gguf_quantize(w.numpy(), qtype), qtype)

    for name, w in reference.items():
        if w.ndim == 1:  # norms stay F32
            assert torch.equal(got[name], w)
            continue
        # llama.cpp gives the output matrix q6_K, or q8_0 when its rows are not 256-multiples (here, 64)
        qtype = GGMLQuantizationType.Q8_0 if name == "lm_head.weight" else GGMLQuantizationType[matrix_type]
        # Q/K rows are permuted in the file and back by the loader; blocks lie within rows, so compare directly
        np.testing.assert_array_equal(got[name].numpy(), round_trip(w, qtype), err_msg=name)

    linears, (v, d), vectors = matrices(untied)
    q8, q = 34 / 32, {"Q4_0": 18 / 32, "Q8_0": 34 / 32}[matrix_type]  # bytes per value of each block type
    head = untied.model.language_model.lm_head.weight.numel()
    expected = (sum(n * k for n, k in linears) - head + v * d) * q + head * q8 + 4 * vectors
    assert result.nbytes == expected
    assert f"{matrix_type}×" in result.note
