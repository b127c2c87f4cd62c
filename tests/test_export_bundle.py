"""The steps every export format shares: manifest, atomic writes, quantization resolution, errors.

A minimal format registered here writes the language model's weights with safetensors, so these tests
exercise the shared code alone; each real format has its own tests against its runtime."""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch
from edge_mllm.export import FORMATS
from edge_mllm.export.bundle import BACKENDS, MANIFEST, Backend, backend, export_bundle, register
from safetensors.torch import save_file

from edge_mllm.chat import ChatTemplate, user_message
from edge_mllm.checkpoint import load_model
from edge_mllm.errors import CheckpointError, ConfigError, EdgeMLLMError, OutputError, QuantError
from edge_mllm.fsutil import check_output_dir, sha256
from edge_mllm.runtime import is_bundle
from edge_mllm.runtime.bundle import read_manifest, verify_files


class Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module", autouse=True)
def weights_format():
    @register
    class WeightsBackend(Backend):
        name = "test-weights"
        native_quant = ("native8",)
        fail_after_first_file = False

        def check(self, loaded, scheme, native_quant):
            if scheme is not None and scheme.group_size != 32:
                raise QuantError("this format packs group size 32 only")

        def write(self, loaded, out_dir, weights, native_quant, progress):
            type(self).seen_calibration = self.calibration
            state = {k: v.contiguous() for k, v in loaded.model.language_model.state_dict().items()
                     if k != "lm_head.weight" or not loaded.model.config.text.tie_word_embeddings}
            save_file(state, str(out_dir / "llm.safetensors"))
            if type(self).fail_after_first_file:
                raise Interrupted("disk full")
            return {"model_file": "llm.safetensors", "native": native_quant}

    yield WeightsBackend
    del BACKENDS["test-weights"]


@pytest.fixture(scope="module")
def tiny(mobilevlm_v2):
    return load_model(mobilevlm_v2.path)


def test_manifest_describes_every_file(tiny, tmp_path):
    out = export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "b", progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(listed) == on_disk and "llm.safetensors" in listed and manifest["tokenizer"] in listed
    for path, entry in listed.items():
        assert entry["size"] == (out / path).stat().st_size and entry["sha256"] == sha256(out / path)
    config = tiny.model.config
    assert manifest["format"] == "test-weights" and manifest["quantization"] is None
    assert manifest["image_token_count"] == tiny.model.num_image_tokens > 0
    assert manifest["image_preprocessing"]["image_size"] == config.vision.image_size
    assert manifest["image_preprocessing"]["image_mean"] == list(config.vision.image_mean)
    assert manifest["max_seq_len"] == config.text.max_position_embeddings
    assert manifest["special_tokens"]["eos"] == tiny.tokenizer.eos_token_id
    assert manifest["model"] == json.loads(json.dumps(config.to_dict()))
    assert manifest["test-weights"] == {"model_file": "llm.safetensors", "native": None}


@pytest.mark.parametrize("template", ["vicuna_v1", "tokenizer"])
def test_manifest_prompt_template_renders_what_run_renders(tiny, template, tmp_path):
    """Apps build prompts from ``prompt_template`` without a Jinja engine: the same text as ours."""
    loaded = copy.deepcopy(tiny)
    loaded.chat_template = template
    if template == "tokenizer":  # the tiny tokenizer has none: give it SmolLM2's ChatML
        loaded.tokenizer.hf.chat_template = load_model(None).tokenizer.hf.chat_template
    out = export_bundle(loaded, "test-weights", tmp_path / "b", progress=False)
    pt = json.loads((out / MANIFEST).read_text())["prompt_template"]
    for question, images in (("What colour is the square?", 1), ("  two <b> images\n ", 2), ("no image", 0)):
        ours = ChatTemplate(template).render([user_message(question, images)], loaded.tokenizer)
        assert pt["prefix"] + pt["image"] * images + question + pt["suffix"] == ours


def test_template_that_changes_the_text_has_no_prompt_template(tiny, tmp_path):
    loaded = copy.deepcopy(tiny)
    loaded.chat_template = "tokenizer"
    loaded.tokenizer.hf.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}{% endfor %}"
    with pytest.raises(EdgeMLLMError, match="changes the user's text"):
        ChatTemplate("tokenizer").around_user_turn(loaded.tokenizer)
    out = export_bundle(loaded, "test-weights", tmp_path / "b", progress=False)
    assert json.loads((out / MANIFEST).read_text())["prompt_template"] is None


def test_export_is_deterministic(tiny, tmp_path):
    a = export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "a", progress=False)
    b = export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "b", progress=False)
    assert (a / MANIFEST).read_bytes() == (b / MANIFEST).read_bytes()


def test_our_scheme_quantizes_and_is_recorded(tiny, tmp_path):
    loaded = copy.deepcopy(tiny)
    out = export_bundle(loaded, "test-weights", tmp_path / "q", quant="rtn-w4-g32", progress=False)
    assert json.loads((out / MANIFEST).read_text())["quantization"] == "rtn-w4-g32"
    assert loaded.quantization.scheme == "rtn-w4-g32"
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    weight = dict(loaded.model.named_parameters())[name]
    assert torch.equal(weight.detach(), loaded.quantization.tensors[name].dequantize())


def test_calibration_is_built_once_and_handed_to_the_format(tiny, tmp_path, weights_format, monkeypatch):
    """A scheme that calibrates gets its inputs built once; the format sees the same ones (ExecuTorch
    finds its outlier channels on them) and None for a scheme that needs none."""
    import edge_mllm.quant.calibration as calibration

    built = []
    original = calibration.calibration_set

    def counted(*args, **kwargs):
        built.append(original(*args, text_count=2, image_count=1))
        return built[-1]

    monkeypatch.setattr(calibration, "calibration_set", counted)
    export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "g", quant="gptq-w4-g32", progress=False)
    assert len(built) == 1 and weights_format.seen_calibration is built[0]
    export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "r", quant="rtn-w4-g32", progress=False)
    assert len(built) == 1 and weights_format.seen_calibration is None


def test_native_types_pass_through(tiny, tmp_path):
    out = export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "n", quant="NATIVE8", progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["quantization"] == "native8" and manifest["test-weights"]["native"] == "native8"


@pytest.mark.parametrize(
    ("fmt", "quant", "error", "message"),
    [("nope", None, ConfigError, "unknown export format 'nope'"),
     ("test-weights", "int3", QuantError, "unknown quantization scheme"),
     ("test-weights", "rtn-w4-g64", QuantError, "group size 32 only")],
)
def test_bad_requests_fail_before_any_work(tiny, tmp_path, fmt, quant, error, message):
    loaded = copy.deepcopy(tiny)
    with pytest.raises(error, match=message):
        export_bundle(loaded, fmt, tmp_path / "x", quant=quant, progress=False)
    assert not (tmp_path / "x").exists() and loaded.quantization is None  # refused before quantizing


def test_already_quantized_model_refuses_another_scheme(tiny, tmp_path):
    loaded = copy.deepcopy(tiny)
    export_bundle(loaded, "test-weights", tmp_path / "a", quant="rtn-w4-g32", progress=False)
    with pytest.raises(ConfigError, match="already quantized"):
        export_bundle(loaded, "test-weights", tmp_path / "b", quant="rtn-w8-g32", progress=False)


def test_interrupted_export_leaves_nothing_and_keeps_the_old_bundle(tiny, tmp_path, weights_format):
    out = export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "b", progress=False)
    before = (out / MANIFEST).read_bytes()
    weights_format.fail_after_first_file = True
    try:
        with pytest.raises(Interrupted):
            export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "b", progress=False)
        with pytest.raises(Interrupted):
            export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "new", progress=False)
    finally:
        weights_format.fail_after_first_file = False
    assert (out / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_output_folder_holding_other_files_is_refused_and_kept(tiny, tmp_path):
    """A user's folder, a file, a symlink or the input itself is never replaced; an empty folder and
    an earlier bundle are."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("important")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(mine)
    for out, fragment in ((mine, "holds other files"), (a_file, "not a folder"), (link, "not a folder"),
                          (tmp_path / "notes.txt" / "sub", "cannot write")):
        with pytest.raises(OutputError, match=fragment):
            export_bundle(copy.deepcopy(tiny), "test-weights", out, progress=False)
    assert (mine / "thesis.txt").read_text() == "important" and a_file.read_text() == "keep" and link.is_symlink()
    with pytest.raises(OutputError, match="would overwrite the input"):
        check_output_dir(tmp_path / "model", is_bundle, [tmp_path / "model"])
    with pytest.raises(OutputError, match="would overwrite the input"):  # the input lies inside it
        check_output_dir(tmp_path, is_bundle, [tmp_path / "data" / "train"])
    empty = tmp_path / "empty"
    empty.mkdir()
    out = export_bundle(copy.deepcopy(tiny), "test-weights", empty, progress=False)
    assert is_bundle(out)
    export_bundle(copy.deepcopy(tiny), "test-weights", empty, progress=False)  # an earlier bundle: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link", "mine", "notes.txt"]


def test_output_modes_follow_the_umask(tiny, tmp_path):
    old = os.umask(0o022)
    try:
        out = export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "b", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's private 0700
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.rglob("*") if f.is_file()} == {0o644}


def test_bundle_files_are_checked_against_the_manifest(tiny, tmp_path):
    out = export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "b", progress=False)
    manifest = read_manifest(out)
    verify_files(out, manifest)
    weights = out / manifest["files"][0]["path"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        verify_files(out, manifest)
    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match=f"{len(data) - 10} bytes, manifest.json says {len(data)}"):
        verify_files(out, manifest)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify_files(out, manifest)
    (out / MANIFEST).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="malformed"):
        read_manifest(out)


def test_a_bundle_is_not_a_model_and_the_context_must_hold_an_image(tiny, tmp_path):
    out = export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "b", progress=False)
    with pytest.raises(CheckpointError, match="is an exported bundle, not a model"):
        load_model(out)
    image_tokens = tiny.model.num_image_tokens
    with pytest.raises(ConfigError, match=f"one image alone takes {image_tokens} positions"):
        export_bundle(copy.deepcopy(tiny), "test-weights", tmp_path / "c", max_context=image_tokens, progress=False)
    assert not (tmp_path / "c").exists()


def test_backend_lookup_lists_formats():
    with pytest.raises(ConfigError, match="executorch-coreml, .*gguf, onnx, test-weights"):
        backend("tflite")


def test_format_table_names_what_each_package_registers():
    import importlib

    for package in set(FORMATS.values()):
        importlib.import_module(f"edge_mllm.export.{package}.bundle")
    registered = {name: cls.__module__.split(".")[2] for name, cls in BACKENDS.items() if name != "test-weights"}
    assert registered == FORMATS
