"""The fused image path (``edge_mllm.model.fused_vision``) against the reference one: each fold on
its own, then the whole module for every projector type and several image sizes, and int8 weights."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from torch import nn

from edge_mllm.checkpoint import load_model
from edge_mllm.config import MLLMConfig, ProjectorConfig, TextConfig, VisionConfig
from edge_mllm.model.fused_vision import (
    FusedVisionEncoder,
    fold_affine_into_linear,
    fold_normalization,
    plain_norm,
)
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.pipeline import Pipeline
from edge_mllm.preprocess import NORMALIZED, RGB_FLOAT, RGB_UINT8, ImageProcessor

TEXT = TextConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FP32_ATOL = 1e-4
# int8 weights: relative L2 error of the image tokens, measured on these random models at 0.5–1.4%
# (per-channel symmetric codes, fp32 activations); the budget leaves room for other seeds.
INT8_REL_ERROR = 0.03
# ONNX Runtime's dynamic int8 also quantizes activations (per tensor, at run time): measured 3.7% on the
# tiny random MobileVLM V2 below, 0.64% on the default model's image tokens.
INT8_DYNAMIC_REL_ERROR = 0.06


def random_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial LayerNorm affines (init leaves γ=1, β=0, which would hide a wrong fold)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            with torch.no_grad():
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))


def random_model(projector: str, image_size: int, select_feature: str = "patch") -> MultimodalLM:
    torch.manual_seed(0)
    vision = VisionConfig(image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=3, num_attention_heads=4, select_feature=select_feature)
    model = MultimodalLM(MLLMConfig(text=TEXT, vision=vision, projector=ProjectorConfig(projector, num_queries=7)))
    random_norms(model)
    return model.eval()


def rgb_and_normalized(model: MultimodalLM, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    v = model.config.vision
    rgb = torch.rand(n, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(v.image_mean).view(3, 1, 1), torch.tensor(v.image_std).view(3, 1, 1)
    return rgb, (rgb - mean) / std


# ----------------------------------------------------------------------------------------------
# each fold on its own


@pytest.mark.parametrize("rgb_max", [1.0, 255.0])
def test_normalization_folds_into_the_patch_conv(rgb_max):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 14, stride=14, bias=False)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    rgb = torch.rand(2, 3, 42, 42) * rgb_max
    normalized = (rgb / rgb_max - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    folded = fold_normalization(conv, mean, std, rgb_max)
    torch.testing.assert_close(folded(rgb), conv(normalized), atol=1e-5, rtol=0)


def test_normalization_fold_refuses_a_padded_conv():
    with pytest.raises(ValueError, match="padding"):
        fold_normalization(nn.Conv2d(3, 4, 3, padding=1), (0.5,) * 3, (0.5,) * 3)


def test_layer_norm_affine_folds_into_the_qkv_linear():
    torch.manual_seed(0)
    norm = nn.LayerNorm(32)
    random_norms(norm)
    q, k, v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
    x = torch.randn(2, 5, 32) * 3 + 1
    fused = fold_affine_into_linear(norm, [q, k, v])
    assert fused.weight.shape == (96, 32)  # one GEMM for the three
    expected = torch.cat([q(norm(x)), k(norm(x)), v(norm(x))], dim=-1)
    torch.testing.assert_close(fused(plain_norm(norm)(x)), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# the whole image path


@pytest.mark.parametrize("image_size", [56, 84])
@pytest.mark.parametrize("projector", ["mlp2x_gelu", "ldp", "ldpv2", "query"])
def test_fused_equals_reference(projector, image_size):
    model = random_model(projector, image_size)
    fused = FusedVisionEncoder(model).eval()
    rgb, normalized = rgb_and_normalized(model)
    with torch.no_grad():
        expected = model.encode_images(normalized)
        got = fused(rgb)
    assert got.shape == expected.shape == (2, model.num_image_tokens, TEXT.hidden_size)
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=0)


def test_fused_keeps_the_class_token_when_selected():
    model = random_model("mlp2x_gelu", 56, select_feature="cls_patch")
    rgb, normalized = rgb_and_normalized(model)
    with torch.no_grad():
        torch.testing.assert_close(FusedVisionEncoder(model)(rgb), model.encode_images(normalized),
                                   atol=FP32_ATOL, rtol=0)


def test_fused_structure_stops_at_the_selected_layer(mobilevlm_v2):
    model = load_model(mobilevlm_v2.path).model
    fused = FusedVisionEncoder(model)
    assert len(fused.layers) == model.config.vision.num_layers_computed == model.config.vision.num_hidden_layers - 1
    assert not any(isinstance(m, nn.LayerNorm) and m.elementwise_affine for m in fused.layers.modules())
    assert all(layer.attn.qkv.out_features == 3 * model.config.vision.hidden_size for layer in fused.layers)


@pytest.mark.parametrize("kind", ["mobilevlm_v1", "mobilevlm_v2", "llava"])
def test_fused_equals_reference_on_checkpoints(kind, request, test_image):
    """Checkpoints in their real layouts (LDP, LDPv2, mlp2x_gelu), from an image file's pixels: the
    fused path reads uint8 RGB (as the app decoded it, rgb_max 255) or RGB in [0, 1]."""
    loaded = load_model(request.getfixturevalue(kind).path)
    model = loaded.model.eval()
    v = model.config.vision
    processor = ImageProcessor(v.image_size, v.image_mean, v.image_std, model.config.image_aspect_ratio)
    rgb = processor.rgb(test_image)[None]
    with torch.no_grad():
        expected = model.encode_images(processor(test_image)[None])
        torch.testing.assert_close(FusedVisionEncoder(model, rgb_max=255.0)(rgb.float()), expected,
                                   atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(FusedVisionEncoder(model)(rgb.float() / 255), expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["mobilevlm_v2", "llava"])
def test_pipeline_runs_the_fused_path(kind, request, test_image):
    """Eager ``Pipeline`` encodes images with the fused module (uint8 RGB in), equal to the reference
    path (``fuse_vision=False``), and answers with it."""
    loaded = load_model(request.getfixturevalue(kind).path)
    fused, reference = Pipeline(loaded), Pipeline(loaded, fuse_vision=False)
    torch.testing.assert_close(fused.encode_images([test_image]), reference.encode_images([test_image]),
                               atol=FP32_ATOL, rtol=0)
    assert "fused_vision" not in vars(reference)
    answering = Pipeline(loaded)
    assert len(answering.generate("What is it?", [test_image], max_new_tokens=3, stop_token_ids=()).token_ids) == 3
    assert isinstance(vars(answering)["fused_vision"], FusedVisionEncoder)


def test_vision_inputs_from_an_image_and_from_normalized_pixels(test_image):
    processor = ImageProcessor(56, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
    rgb = processor.rgb(test_image)
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 56, 56)
    normalized = processor(test_image)
    assert torch.equal(processor.vision_input(test_image, NORMALIZED), normalized)
    assert torch.equal(processor.vision_input(test_image, RGB_UINT8), rgb)
    torch.testing.assert_close(processor.vision_input(test_image, RGB_FLOAT), rgb.float() / 255, atol=1e-7, rtol=0)
    # what runtimes do with normalised pixels a caller passes: exact back to uint8, to 1e-6 in [0, 1]
    assert torch.equal(processor.from_normalized(normalized, RGB_UINT8), rgb)
    torch.testing.assert_close(processor.from_normalized(normalized, RGB_FLOAT), rgb.float() / 255, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown vision input"):
        processor.from_normalized(normalized, "bgr")


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "ldp", "ldpv2", "query"])
def test_int8_linears_error_is_measured_and_small(projector):
    from torchao.quantization import Int8Tensor

    model = random_model(projector, 56)
    fused = FusedVisionEncoder(model, int8=True).eval()
    linears = [m for m in fused.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m.weight, Int8Tensor) and m.weight.qdata.dtype == torch.int8 for m in linears)
    rgb, normalized = rgb_and_normalized(model)
    with torch.no_grad():
        expected = model.encode_images(normalized)
        error = float((fused(rgb) - expected).norm() / expected.norm())
    assert 0 < error < INT8_REL_ERROR, error


# ----------------------------------------------------------------------------------------------
# exported: the ONNX bundle's vision.onnx (the ExecuTorch one is checked in test_export_executorch)


def test_onnx_vision_graph_is_fused_and_reads_rgb(mobilevlm_v2, test_image, tmp_path):
    import onnx
    import onnxruntime as ort
    from edge_mllm.export.bundle import MANIFEST, export_bundle
    from edge_mllm.export.onnx.runtime import OnnxRunner

    loaded = load_model(mobilevlm_v2.path)
    model, v = loaded.model.eval(), loaded.model.config.vision
    out = export_bundle(loaded, "onnx", tmp_path / "fused", progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["image_preprocessing"]["vision_input"] == RGB_FLOAT and manifest["onnx"]["vision_fused"]
    graph = onnx.load(str(out / "vision.onnx"), load_external_data=False).graph
    ops = collections.Counter((n.domain, n.op_type) for n in graph.node)
    # one com.microsoft.Attention per computed block (its Q/K/V GEMM inside), no decomposed softmax
    assert ops[("com.microsoft", "Attention")] == v.num_layers_computed
    assert ops[("", "Softmax")] == 0
    # per block: out_proj, fc1, fc2; then the projector's two linears
    assert ops[("", "MatMul")] == 3 * v.num_layers_computed + 2

    processor = ImageProcessor(v.image_size, v.image_mean, v.image_std, model.config.image_aspect_ratio)
    with torch.no_grad():
        expected = model.encode_images(processor(test_image)[None]).numpy()
    session = ort.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"])
    rgb = processor.vision_input(test_image, RGB_FLOAT)[None].numpy()
    np.testing.assert_allclose(session.run(None, {"pixel_values": rgb})[0], expected[0], atol=FP32_ATOL, rtol=0)
    runner = OnnxRunner(out)  # fed normalised pixels, it gives the graph RGB
    np.testing.assert_allclose(runner.encode_images(runner.pixels([test_image])), expected, atol=FP32_ATOL, rtol=0)

    reference = export_bundle(load_model(mobilevlm_v2.path), "onnx", tmp_path / "reference", progress=False,
                              fuse_vision=False)
    manifest = json.loads((reference / MANIFEST).read_text())
    assert manifest["image_preprocessing"]["vision_input"] == NORMALIZED and not manifest["onnx"]["vision_fused"]
    graph = onnx.load(str(reference / "vision.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "Attention" for n in graph.node)
    runner = OnnxRunner(reference)
    np.testing.assert_allclose(runner.encode_images(runner.pixels([test_image])), expected, atol=FP32_ATOL, rtol=0)


def test_cli_no_fuse_vision_exports_the_reference_graph(mobilevlm_v2, tmp_path):
    from click.testing import CliRunner

    from edge_mllm.cli import cli

    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["export", str(mobilevlm_v2.path), "--format", "onnx", "--no-fuse-vision",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["image_preprocessing"]["vision_input"] == NORMALIZED


def test_onnx_int8_vision_runs_ort_dynamic_int8(mobilevlm_v2, test_image, tmp_path):
    """--int8-vision for ONNX: the fused vision graph through ONNX Runtime's dynamic int8 quantizer
    (QAttention + MatMulInteger, no float MatMul left), its error within the int8 budget."""
    import onnx
    from edge_mllm.export.bundle import MANIFEST, export_bundle
    from edge_mllm.export.onnx.runtime import OnnxRunner

    loaded = load_model(mobilevlm_v2.path)
    v = loaded.model.config.vision
    processor = ImageProcessor(v.image_size, v.image_mean, v.image_std, loaded.model.config.image_aspect_ratio)
    with torch.no_grad():
        expected = loaded.model.eval().encode_images(processor(test_image)[None]).numpy()
    out = export_bundle(loaded, "onnx", tmp_path / "int8", progress=False, int8_vision=True)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["onnx"]["vision_weights"].startswith("int8")
    ops = collections.Counter((n.domain, n.op_type) for n in onnx.load(str(out / "vision.onnx")).graph.node)
    assert ops[("com.microsoft", "QAttention")] == v.num_layers_computed and ops[("com.microsoft", "Attention")] == 0
    assert ops[("", "MatMulInteger")] == 3 * v.num_layers_computed + 2 and ops[("", "MatMul")] == 0
    runner = OnnxRunner(out)
    got = runner.encode_images(runner.pixels([test_image]))
    error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert 0 < error < INT8_DYNAMIC_REL_ERROR


def test_int8_vision_is_refused_where_not_offered(llava, tmp_path):
    from edge_mllm.export.bundle import export_bundle

    from edge_mllm.errors import ConfigError

    with pytest.raises(ConfigError, match="int8 vision method is XNNPACK's"):
        export_bundle(load_model(llava.path), "executorch-vulkan", tmp_path / "et", int8_vision=True, progress=False)
    assert not (tmp_path / "et").exists()
