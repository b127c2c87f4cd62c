"""Checkpoint layouts (MobileVLM V1/V2, LLaVA-1.5, HF Llama single/sharded/.bin, edge-mllm native)
and the errors a broken checkpoint gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edge_mllm.checkpoint import detect_layout, load_model, save_native
from edge_mllm.errors import CheckpointError, EdgeMLLMError
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX
from edge_mllm.pipeline import Pipeline

ATOL = 1e-4
MLLM_KINDS = ["mobilevlm_v1", "mobilevlm_v2", "llava"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def ids(n: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (1, n), generator=gen)


def lm_logits(loaded, token_ids: torch.Tensor) -> torch.Tensor:
    lm = loaded.model.language_model.eval()
    with torch.no_grad():
        return lm(lm.embed(token_ids))


@pytest.fixture
def mllm(request):
    """The session checkpoint named by the test's ``kind`` parameter."""
    return request.getfixturevalue({"mobilevlm_v1": "mobilevlm_v1", "mobilevlm_v2": "mobilevlm_v2",
                                    "llava": "llava"}[request.param])


def expected_image_tokens(ckpt) -> int:
    grid = ckpt.grid
    return grid * grid if ckpt.kind == "llava" else (grid // 2) ** 2


# ----------------------------------------------------------------------------------------------
# MobileVLM V1 / V2 and LLaVA-1.5


@pytest.mark.parametrize("mllm", MLLM_KINDS, indirect=True)
def test_mllm_layout_loads_and_generates(mllm, test_image):
    assert detect_layout(mllm.path).name == "llava/mobilevlm"
    loaded = load_model(mllm.path)
    model = loaded.model
    assert loaded.chat_template == "vicuna_v1"
    assert model.config.projector.type == {"mobilevlm_v1": "ldp", "mobilevlm_v2": "ldpv2", "llava": "mlp2x_gelu"}[
        mllm.kind
    ]
    assert model.config.image_aspect_ratio == "pad"
    assert model.config.text.rope_theta == 50000.0  # read from the 4.x-style top-level key
    n_img = expected_image_tokens(mllm)
    assert model.num_image_tokens == n_img

    pipe = Pipeline(loaded)
    text_ids = pipe.tokenizer.encode_with_images(pipe.render_prompt("describe", 1))
    assert text_ids.count(IMAGE_TOKEN_INDEX) == 1
    result = pipe.generate("describe", images=[test_image], max_new_tokens=5)
    assert result.prompt_tokens == len(text_ids) - 1 + n_img
    if result.finish_reason == "length":
        assert len(result.token_ids) == 5
    else:
        assert result.finish_reason == "stop" and len(result.token_ids) < 5
    assert all(0 <= t < model.config.text.vocab_size for t in result.token_ids)
    assert isinstance(result.text, str)
    assert result.timings["vision_encode_s"] >= 0


@pytest.mark.parametrize("mllm", MLLM_KINDS, indirect=True)
def test_mllm_language_model_matches_transformers(mllm):
    loaded = load_model(mllm.path)
    token_ids = ids()
    with torch.no_grad():
        expected = mllm.hf_llm(input_ids=token_ids).logits
    assert max_diff(lm_logits(loaded, token_ids), expected) <= ATOL


@pytest.mark.parametrize("mllm", MLLM_KINDS, indirect=True)
def test_mllm_vision_tower_matches_transformers(mllm, hf_builders):
    """The tower equals CLIP with the weights in the files: the mm_vision_tower folder for V1/LLaVA,
    the checkpoint's own model.vision_tower.* tensors for V2."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    loaded = load_model(mllm.path)
    pixels = hf_builders.pixels(2, seed=7)
    if mllm.kind == "mobilevlm_v2":
        tower_dir = mllm.path / mllm.config["mm_vision_tower"]
        assert not list(tower_dir.glob("*.safetensors"))  # config only: weights come from the checkpoint
        prefix = "model.vision_tower.vision_tower.vision_model."
        state = {k[len(prefix):]: v for k, v in load_file(str(mllm.path / "model.safetensors")).items()
                 if k.startswith(prefix)}
        reference = CLIPVisionModel(CLIPVisionConfig.from_pretrained(str(tower_dir))).eval()
        missing, unexpected = reference.load_state_dict(state, strict=False)
        assert not missing and not unexpected
    else:
        tower_dir = Path(mllm.config["mm_vision_tower"])
        tower_dir = tower_dir if tower_dir.is_absolute() else mllm.path / tower_dir
        reference = CLIPVisionModel.from_pretrained(str(tower_dir)).eval()
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = loaded.model.vision_tower(pixels)
    assert max_diff(got, expected) <= ATOL
    assert len(loaded.model.vision_tower.encoder.layers) == reference.config.num_hidden_layers - 1


@pytest.mark.parametrize("mllm", MLLM_KINDS, indirect=True)
def test_mllm_projector_weights_loaded(mllm):
    loaded = load_model(mllm.path)
    ours = loaded.model.mm_projector.state_dict()
    assert set(ours) == set(mllm.projector_state)
    for name, value in mllm.projector_state.items():
        assert torch.equal(ours[name], value), name


def test_ldpv2_projector_matches_functional_reference(mobilevlm_v2):
    """MobileVLM V2's LDPv2 written out with torch.nn.functional, from the checkpoint tensors:
    Linear → GELU → Linear → AdaptiveAvgPool2d(grid/2) → depthwise 3x3 conv + residual."""
    state = load_file(str(mobilevlm_v2.path / "model.safetensors"))
    w = {k[len("model.mm_projector."):]: v for k, v in state.items() if k.startswith("model.mm_projector.")}
    assert set(w) == {"mlp.mlp.0.weight", "mlp.mlp.0.bias", "mlp.mlp.2.weight", "mlp.mlp.2.bias",
                      "peg.peg.0.weight", "peg.peg.0.bias"}
    loaded = load_model(mobilevlm_v2.path)
    grid = mobilevlm_v2.grid
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, grid * grid, loaded.model.config.vision.hidden_size, generator=gen)

    x = F.linear(F.gelu(F.linear(feats, w["mlp.mlp.0.weight"], w["mlp.mlp.0.bias"])),
                 w["mlp.mlp.2.weight"], w["mlp.mlp.2.bias"])
    b, n, c = x.shape
    x = x.permute(0, 2, 1).reshape(b, c, grid, grid)
    x = F.adaptive_avg_pool2d(x, (grid // 2, grid // 2))
    x = F.conv2d(x, w["peg.peg.0.weight"], w["peg.peg.0.bias"], padding=1, groups=c) + x
    expected = x.flatten(2).transpose(1, 2)

    with torch.no_grad():
        got = loaded.model.mm_projector(feats)
    assert got.shape == (2, (grid // 2) ** 2, c)
    assert max_diff(got, expected) <= 1e-5


def test_ldp_projector_matches_functional_reference(mobilevlm_v1):
    """MobileVLM V1's LDP (torchvision InvertedResidual + timm LayerNorm2d + SE) written out with
    torch.nn.functional from the checkpoint tensors."""
    state = load_file(str(mobilevlm_v1.path / "model.safetensors"))
    p = "model.mm_projector.model."
    w = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
    loaded = load_model(mobilevlm_v1.path)
    grid = mobilevlm_v1.grid
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(1, grid * grid, loaded.model.config.vision.hidden_size, generator=gen)

    def ln2d(x, prefix):
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w[f"{prefix}.weight"], w[f"{prefix}.bias"],
                            eps=1e-5).permute(0, 3, 1, 2)

    def inverted_residual(x, i, stride):
        q = f"mb_block.{i}.block"
        c = x.shape[1]
        y = F.conv2d(x, w[f"{q}.0.0.weight"], None, stride=stride, padding=1, groups=c)
        y = F.hardswish(ln2d(y, f"{q}.0.1"))
        s = F.adaptive_avg_pool2d(y, 1)
        s = F.relu(F.conv2d(s, w[f"{q}.1.fc1.weight"], w[f"{q}.1.fc1.bias"]))
        s = F.hardsigmoid(F.conv2d(s, w[f"{q}.1.fc2.weight"], w[f"{q}.1.fc2.bias"]))
        y = y * s
        y = ln2d(F.conv2d(y, w[f"{q}.2.0.weight"]), f"{q}.2.1")
        return x + y if stride == 1 else y

    x = F.linear(F.gelu(F.linear(feats, w["mlp.1.weight"], w["mlp.1.bias"])), w["mlp.3.weight"], w["mlp.3.bias"])
    b, n, c = x.shape
    x = x.transpose(1, 2).reshape(b, c, grid, grid)
    x = inverted_residual(inverted_residual(x, 1, 1), 2, 2)
    expected = x.flatten(2).transpose(1, 2)
    with torch.no_grad():
        got = loaded.model.mm_projector(feats)
    assert got.shape == (1, (grid // 2) ** 2, c)
    assert max_diff(got, expected) <= 1e-5


@pytest.mark.parametrize("mllm", MLLM_KINDS, indirect=True)
def test_image_changes_the_answer_logits(mllm):
    """The image embeddings really reach the LLM: two different images give different logits."""
    loaded = load_model(mllm.path)
    model = loaded.model.eval()
    token_ids = [1, 5, IMAGE_TOKEN_INDEX, 7, 9]
    gen = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    logits = []
    with torch.no_grad():
        for _ in range(2):
            emb = model.encode_images(torch.randn(1, 3, size, size, generator=gen))
            assert emb.shape == (1, model.num_image_tokens, model.config.text.hidden_size)
            inputs = model.embed_prompt(token_ids, emb)
            assert inputs.shape[1] == model.prompt_length(token_ids)
            logits.append(model(inputs)[0, -1])
    assert max_diff(logits[0], logits[1]) > 1e-3


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_mobilevlm_v2_vision_tower_path(tmp_path, hf_builders, where):
    ckpt = hf_builders.mllm(tmp_path / "v2", "mobilevlm_v2", vision_tower=where)
    assert Path(ckpt.config["mm_vision_tower"]).is_absolute() is (where == "absolute")
    loaded = load_model(ckpt.path)
    pixels = hf_builders.pixels(1)
    prefix = "model.vision_tower.vision_tower.vision_model."
    state = load_file(str(ckpt.path / "model.safetensors"))
    with torch.no_grad():
        got = loaded.model.vision_tower(pixels)
    assert torch.equal(loaded.model.vision_tower.embeddings.patch_embedding.weight,
                       state[prefix + "embeddings.patch_embedding.weight"])
    assert got.shape[1] == ckpt.grid**2


# ----------------------------------------------------------------------------------------------
# edge-mllm native format


@pytest.mark.parametrize("source", ["mobilevlm_v1", "mobilevlm_v2", "llava", "llama_folder"])
def test_native_round_trip(request, tmp_path, source, test_image):
    src = request.getfixturevalue(source)
    src_path = src[0] if source == "llama_folder" else src.path
    original = load_model(src_path)
    out = save_native(original, tmp_path / "native")
    config = json.loads((out / "config.json").read_text())
    assert "edge_mllm_format" in config
    assert detect_layout(out).name == "edge-mllm"
    reloaded = load_model(out)
    assert reloaded.chat_template == original.chat_template
    assert reloaded.model.config == original.model.config
    a, b = original.model.state_dict(), reloaded.model.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    token_ids = ids()
    assert torch.equal(lm_logits(original, token_ids), lm_logits(reloaded, token_ids))
    images = [test_image] if original.model.config.has_vision else []
    r1 = Pipeline(original).generate("describe", images=images, max_new_tokens=6)
    r2 = Pipeline(reloaded).generate("describe", images=images, max_new_tokens=6)
    assert (r1.token_ids, r1.prompt_tokens, r1.text) == (r2.token_ids, r2.prompt_tokens, r2.text)


def test_native_round_trip_tied_embeddings(tmp_path, hf_builders):
    hf = hf_builders.llama(tmp_path / "tied", tie_word_embeddings=True, seed=9)
    original = load_model(tmp_path / "tied")
    out = save_native(original, tmp_path / "native")
    assert "language_model.lm_head.weight" not in load_file(str(out / "model.safetensors"))
    reloaded = load_model(out)
    lm = reloaded.model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    token_ids = ids()
    with torch.no_grad():
        assert max_diff(lm_logits(reloaded, token_ids), hf(input_ids=token_ids).logits) <= ATOL


def test_native_save_replaces_existing_folder(tmp_path, llama_folder, mobilevlm_v1):
    target = tmp_path / "native"
    save_native(load_model(mobilevlm_v1.path), target)
    (target / "stale.txt").write_text("from an earlier save")
    text_only = load_model(llama_folder[0])
    save_native(text_only, target)
    assert not (target / "stale.txt").exists()
    reloaded = load_model(target)
    assert not reloaded.model.config.has_vision
    assert torch.equal(lm_logits(reloaded, ids()), lm_logits(text_only, ids()))
    # No temporary or backup folders are left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_native_save_failure_keeps_existing_folder(tmp_path, llama_folder, monkeypatch):
    target = tmp_path / "native"
    loaded = load_model(llama_folder[0])
    save_native(loaded, target)
    before = (target / "model.safetensors").read_bytes()

    def broken_save(folder):
        raise OSError("disk full")

    monkeypatch.setattr(loaded.tokenizer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_native(loaded, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]
    load_model(target)


# ----------------------------------------------------------------------------------------------
# Hugging Face Llama weight files


def test_sharded_safetensors(tmp_path, hf_builders):
    folder = tmp_path / "sharded"
    hf = hf_builders.llama(folder, save=False, seed=11)
    hf.save_pretrained(str(folder), max_shard_size="40KB")
    hf_builders.tokenizer.save_pretrained(str(folder))
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert (folder / "model.safetensors.index.json").is_file()
    assert not (folder / "model.safetensors").exists()
    loaded = load_model(folder)
    token_ids = ids()
    with torch.no_grad():
        assert max_diff(lm_logits(loaded, token_ids), hf(input_ids=token_ids).logits) <= ATOL


def test_sharded_index_with_missing_shard(tmp_path, hf_builders):
    folder = tmp_path / "sharded"
    hf = hf_builders.llama(folder, save=False)
    hf.save_pretrained(str(folder), max_shard_size="40KB")
    hf_builders.tokenizer.save_pretrained(str(folder))
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(folder)


def test_pytorch_model_bin(tmp_path, hf_builders):
    folder = tmp_path / "bin"
    hf = hf_builders.llama(folder, seed=12)
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    loaded = load_model(folder)
    token_ids = ids()
    with torch.no_grad():
        assert max_diff(lm_logits(loaded, token_ids), hf(input_ids=token_ids).logits) <= ATOL


class _Payload:
    """Unpickling this would create a file: weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pytorch_model_bin_refuses_arbitrary_pickles(tmp_path, hf_builders):
    folder = tmp_path / "bin"
    hf = hf_builders.llama(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    state = dict(hf.state_dict())
    state["payload"] = _Payload(marker)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(folder)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_garbage_pytorch_model_bin(tmp_path, llama_folder, copy_folder):
    folder = copy_folder(llama_folder[0])
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80not a pickle at all" * 50)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(folder)


# ----------------------------------------------------------------------------------------------
# broken checkpoints → CheckpointError with a clear message


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "does-not-exist")


def test_unrecognised_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unrecognised"):
        load_model(tmp_path)


def test_invalid_config_json(tmp_path, llama_folder, copy_folder):
    folder = copy_folder(llama_folder[0])
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(folder)


def test_garbage_safetensors(llama_folder, copy_folder):
    folder = copy_folder(llama_folder[0])
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("source", MLLM_KINDS + ["llama"])
def test_truncated_safetensors(request, copy_folder, source):
    src = request.getfixturevalue("llama_folder")[0] if source == "llama" else request.getfixturevalue(source).path
    folder = copy_folder(src)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(folder)


def test_no_weight_files(llama_folder, copy_folder):
    folder = copy_folder(llama_folder[0])
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(folder)


def test_missing_llm_tensors_are_named(llama_folder, copy_folder):
    folder = copy_folder(llama_folder[0])
    state = load_file(str(folder / "model.safetensors"))
    removed = ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight"]
    for name in removed:
        del state[name]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing 2 tensor") as info:
        load_model(folder)
    message = str(info.value)
    assert all(name in message for name in removed)


def test_missing_lm_head_untied(llama_folder, copy_folder):
    folder = copy_folder(llama_folder[0])
    state = load_file(str(folder / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_model(folder)


def test_wrong_tensor_shape(llama_folder, copy_folder):
    folder = copy_folder(llama_folder[0])
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="wrong shape.*up_proj"):
        load_model(folder)


@pytest.mark.parametrize(("kind", "component", "part"), [
    ("mobilevlm_v1", "model.mm_projector.", "model.mb_block.2."),
    ("mobilevlm_v2", "model.mm_projector.", "peg."),
    ("mobilevlm_v2", "model.vision_tower.vision_tower.vision_model.", "encoder.layers.0."),
    ("llava", "model.mm_projector.", "2."),
])
def test_missing_multimodal_tensors_are_named(request, copy_folder, kind, component, part):
    folder = copy_folder(request.getfixturevalue(kind).path)
    state = load_file(str(folder / "model.safetensors"))
    removed = [k for k in state if k.startswith(component + part)]
    assert removed
    for name in removed:
        del state[name]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing") as info:
        load_model(folder)
    # Named relative to the component (projector / vision tower) that lacks them.
    assert any(k[len(component):] in str(info.value) for k in removed)


def test_missing_tokenizer(llama_folder, copy_folder):
    folder = copy_folder(llama_folder[0])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model(folder)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_hub_vision_tower(mobilevlm_v2, copy_folder):
    folder = copy_folder(mobilevlm_v2.path)
    _edit_config(folder, mm_vision_tower="someone/unknown-clip")
    with pytest.raises(CheckpointError, match="someone/unknown-clip"):
        load_model(folder)


def test_known_hub_vision_tower_without_weights(mobilevlm_v1, copy_folder):
    """V1 needs CLIP weights from mm_vision_tower: a hub name is never downloaded."""
    folder = copy_folder(mobilevlm_v1.path)
    shutil.rmtree(folder / "clip")
    _edit_config(folder, mm_vision_tower="openai/clip-vit-base-patch16", mm_hidden_size=768)
    state = load_file(str(folder / "model.safetensors"))  # a projector for that tower's 768 wide features
    name = "model.mm_projector.model.mlp.1.weight"
    state[name] = torch.randn(state[name].shape[0], 768)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no vision tower weights"):
        load_model(folder)


def test_vision_tower_folder_without_weights(mobilevlm_v1, copy_folder):
    folder = copy_folder(mobilevlm_v1.path)
    (folder / "clip" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no vision tower weights"):
        load_model(folder)


def test_unknown_projector_type(mobilevlm_v1, copy_folder):
    folder = copy_folder(mobilevlm_v1.path)
    _edit_config(folder, mm_projector_type="qformer_xl")
    with pytest.raises(CheckpointError, match="qformer_xl"):
        load_model(folder)


def test_mm_hidden_size_mismatch(mobilevlm_v1, copy_folder):
    folder = copy_folder(mobilevlm_v1.path)
    _edit_config(folder, mm_hidden_size=48)
    with pytest.raises(CheckpointError, match="mm_hidden_size"):
        load_model(folder)


def test_unsupported_rope_scaling(llama_folder, copy_folder):
    folder = copy_folder(llama_folder[0])
    _edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0})
    with pytest.raises(CheckpointError, match="yarn"):
        load_model(folder)


def test_ldp_needs_even_grid(tmp_path, hf_builders):
    """A 3x3 patch grid cannot be halved by LDP: a clear error, not a reshape crash."""
    ckpt = hf_builders.mllm(tmp_path / "odd", "llava")
    clip_cfg_path = ckpt.path / ckpt.config["mm_vision_tower"] / "config.json"
    clip_cfg = json.loads(clip_cfg_path.read_text())
    clip_cfg["image_size"] = 3 * clip_cfg["patch_size"]
    clip_cfg_path.write_text(json.dumps(clip_cfg))
    _edit_config(ckpt.path, mm_projector_type="ldpnetv2")
    with pytest.raises(EdgeMLLMError, match="even"):
        load_model(ckpt.path)
