"""The ``edge-mllm`` command line, run the way users run it: in a subprocess, output captured.

Tests that load the embedded default model (SmolLM2-135M-Instruct, ~10-20 s a load) are marked slow
and kept few; everything that should fail before a model loads runs without one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DEFAULT_TIMEOUT = 60
MODEL_TIMEOUT = 600  # loading the default model plus a few tokens on a slow CI runner


def edge_mllm(*args: str, cwd: Path, timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m edge_mllm.cli ARGS``, as a user's shell would run it."""
    return subprocess.run(
        [sys.executable, "-m", "edge_mllm.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=os.environ.copy(),
    )


def console_script() -> Path | None:
    script = Path(sys.executable).parent / ("edge-mllm.exe" if os.name == "nt" else "edge-mllm")
    return script if script.is_file() else None


def assert_runtime_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 1, exactly one stderr line "error: ...", no traceback, nothing on stdout."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert len(line) > len("error: ") + 10, line
    for fragment in fragments:
        assert fragment.lower() in line.lower(), (fragment, line)
    assert proc.stdout == "", proc.stdout
    return line


def assert_usage_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr  # one line
    assert "--help' for help" not in proc.stderr and "--help')" in proc.stderr, proc.stderr  # where to look
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


def parse_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    data = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert isinstance(data, dict)
    return data


def check_run_json(data: dict, max_new_tokens: int) -> None:
    assert {"text", "token_ids", "prompt_tokens", "timings"} <= set(data)
    assert isinstance(data["text"], str)
    assert isinstance(data["token_ids"], list)
    assert all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in data["token_ids"])
    assert 1 <= len(data["token_ids"]) <= max_new_tokens
    assert isinstance(data["prompt_tokens"], int) and data["prompt_tokens"] > 0
    assert isinstance(data["timings"], dict) and data["timings"]
    timings = dict(data["timings"])
    decode_rate = timings.pop("decode_tokens_per_s")
    assert all(isinstance(v, (int, float)) and v >= 0 for v in timings.values())
    # a one-token answer has no decode step to time: null, not a made-up 0
    assert decode_rate is None if len(data["token_ids"]) == 1 else decode_rate > 0


@pytest.fixture
def png(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "picture.png"
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def text_file_png(tmp_path) -> Path:
    path = tmp_path / "notes.png"
    path.write_text("shopping list: eggs, milk\n")
    return path


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from edge_mllm.default import smollm2_gguf_path

    return smollm2_gguf_path()


# --------------------------------------------------------------------------------------------------
# Cheap: no model is loaded


def test_version_and_help(tmp_path):
    proc = edge_mllm("--version", cwd=tmp_path)
    assert proc.returncode == 0 and "edge-mllm" in proc.stdout and re.search(r"\d+\.\d+", proc.stdout)
    for args in (["--help"], ["run", "--help"], ["info", "-h"]):
        proc = edge_mllm(*args, cwd=tmp_path)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Usage:" in proc.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "--prompt", "hi", "--bogus"], "No such option"),
        (["run"], "Missing option"),
        (["run", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["run", "--prompt", "hi", "--max-new-tokens", "many"], "--max-new-tokens"),
        (["run", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
        (["run", "--prompt", "hi", "--top-p", "0"], "--top-p"),
        (["frobnicate"], "No such command"),
        (["info", "--bogus"], "No such option"),
    ],
    ids=["unknown-option", "missing-prompt", "zero-tokens", "non-int-tokens", "negative-temperature",
         "zero-top-p", "unknown-command", "info-unknown-option"],
)
def test_usage_errors_exit_2(tmp_path, args, fragment):
    assert_usage_error(edge_mllm(*args, cwd=tmp_path), fragment)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--format", "gguf", "--quant", "q3_x"], "gguf's own types: f16, f32, q4_0"),
        (["--format", "executorch", "--quant", "q4_k_m"], "executorch's own types: 8da4w"),
        (["--format", "onnx", "--quant", "gptq-w3-g32"], "3-bit weights are not supported"),
        (["--target", "tensor-g3", "--quant", "zzz"], "a format's own types"),
        (["--format", "executorch-vulkan", "--int8-vision"], "int8 vision weights in executorch-vulkan bundles"),
        (["--format", "gguf", "--two-digit-activations"], "two-digit activations in gguf bundles"),
        (["--format", "executorch-coreml", "--two-digit-activations"], "use --format executorch"),
    ],
    ids=["gguf-unknown-quant", "quant-of-another-format", "bad-scheme", "target-unknown-quant", "et-int8-vision",
         "gguf-two-digits", "coreml-two-digits"],
)
def test_export_option_errors_exit_2_before_loading(tmp_path, args, fragment):
    # The model path does not exist: exit 2 (not "not found", exit 1) shows the options are checked first.
    out = tmp_path / "bundle"
    assert_usage_error(edge_mllm("export", "no/such/model", *args, "-o", str(out), cwd=tmp_path), fragment)
    assert not out.exists()


def test_output_folder_is_checked_before_any_work(tmp_path):
    """A folder holding a user's files, a file, or the input model itself is refused (exit 2) and kept."""
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "thesis.txt").write_text("important")
    a_file = tmp_path / "afile"
    a_file.write_text("keep")
    assert_usage_error(edge_mllm("data", "synth", "--split", "test", "-n", "1", "-o", str(mine), cwd=tmp_path),
                       "holds other files")
    assert_usage_error(edge_mllm("data", "synth", "--split", "test", "-n", "1", "-o", str(a_file), cwd=tmp_path),
                       "not a folder")
    assert_usage_error(edge_mllm("train-default", "--quick", "-o", str(mine), cwd=tmp_path), "holds other files")
    assert_usage_error(edge_mllm("train-default", "--scale", "0", "-o", str(tmp_path / "new"), cwd=tmp_path),
                       "--scale")
    assert_usage_error(edge_mllm("train-default", "--ground-steps", "-1", "-o", str(tmp_path / "new"), cwd=tmp_path),
                       "--ground-steps")
    assert_usage_error(edge_mllm("train-default", "--instruct-epochs", "0", "-o", str(tmp_path / "new"), cwd=tmp_path),
                       "--instruct-epochs")
    model = tmp_path / "model"  # need not exist: the check comes before loading
    assert_usage_error(edge_mllm("export", str(model), "--format", "gguf", "-o", str(model), cwd=tmp_path),
                       "would overwrite the input")
    assert_usage_error(edge_mllm("quantize", str(model / "sub"), "--scheme", "rtn-w4-g32", "-o", str(model),
                                 cwd=tmp_path), "would overwrite the input")
    assert (mine / "thesis.txt").read_text() == "important" and a_file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "precious"]


def test_prompt_that_is_not_utf8_is_a_usage_error(tmp_path):
    # the shell hands over bytes; Python keeps the invalid ones as surrogates (PEP 383)
    assert_usage_error(edge_mllm("run", "--prompt", "caf\udce9", cwd=tmp_path), "not valid UTF-8")


def test_sigterm_leaves_no_temporary_folder(tmp_path):
    out = tmp_path / "split"
    proc = subprocess.Popen([sys.executable, "-m", "edge_mllm.cli", "data", "synth", "--split", "test", "-n", "2000",
                             "-o", str(out)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while not list(tmp_path.glob(".split.*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.glob(".split.*")), "the temporary folder never appeared"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEFAULT_TIMEOUT) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_bundle_info_checks_its_files_and_a_bundle_is_not_a_model(tmp_path, llava):
    bundle = tmp_path / "bundle"
    assert edge_mllm("export", str(llava.path), "--format", "gguf", "-o", str(bundle), cwd=tmp_path).returncode == 0
    data = parse_json(edge_mllm("info", str(bundle), "--json", cwd=tmp_path))
    assert data["files_verified"] and data["format"] == "gguf" and data["image_token_count"] > 0
    proc = edge_mllm("info", str(bundle), cwd=tmp_path)
    assert proc.returncode == 0 and "each matching the manifest's size and sha256" in proc.stdout, proc.stderr
    assert_runtime_error(edge_mllm("export", str(bundle), "--format", "onnx", "-o", str(tmp_path / "again"),
                                   cwd=tmp_path), "is an exported bundle, not a model")
    weights = bundle / "model.gguf"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_runtime_error(edge_mllm("info", str(bundle), cwd=tmp_path), "model.gguf is corrupt")
    assert_runtime_error(edge_mllm("run", str(bundle), "-p", "hi", cwd=tmp_path), "model.gguf is corrupt")


def test_missing_model_path(tmp_path):
    line = assert_runtime_error(edge_mllm("run", "does/not/exist", "--prompt", "hi", cwd=tmp_path), "not found")
    assert "does/not/exist" in line
    assert_runtime_error(edge_mllm("info", "does/not/exist", cwd=tmp_path), "not found")


def test_garbage_file_as_model(tmp_path):
    garbage = tmp_path / "model.bin"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_runtime_error(edge_mllm("run", str(garbage), "--prompt", "hi", cwd=tmp_path), "model.bin")
    # The same bytes under a .gguf name, and an empty .gguf, are not taken for GGUFs either.
    fake = tmp_path / "model.gguf"
    fake.write_bytes(garbage.read_bytes())
    assert_runtime_error(edge_mllm("run", str(fake), "--prompt", "hi", cwd=tmp_path), "model.gguf")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_runtime_error(edge_mllm("info", str(empty), cwd=tmp_path), "empty.gguf")


def test_empty_folder_as_model(tmp_path):
    folder = tmp_path / "emptymodel"
    folder.mkdir()
    assert_runtime_error(edge_mllm("run", str(folder), "--prompt", "hi", cwd=tmp_path), "emptymodel")


@pytest.mark.parametrize("size", [4, 100, 1_000_000], ids=["4B", "100B", "1MB"])
def test_truncated_gguf(tmp_path, gguf_path, size):
    with open(gguf_path, "rb") as f:
        head = f.read(size)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(head)
    line = assert_runtime_error(edge_mllm("run", str(truncated), "--prompt", "hi", cwd=tmp_path), "cut.gguf")
    assert "gguf" in line.lower()


def test_text_file_as_image_fails_fast(tmp_path, text_file_png):
    # The image is read before any model is touched: a bad image is reported even when the model
    # path is bad too, and without paying for the default model's load.
    proc = edge_mllm("run", "--prompt", "hi", "--image", str(text_file_png), cwd=tmp_path)
    assert_runtime_error(proc, "not an image", "notes.png")
    proc = edge_mllm("run", "no/such/model", "--prompt", "hi", "--image", str(text_file_png), cwd=tmp_path)
    assert_runtime_error(proc, "not an image", "notes.png")


def test_missing_image_fails_fast(tmp_path):
    proc = edge_mllm("run", "no/such/model", "--prompt", "hi", "--image", "missing.png", cwd=tmp_path)
    assert_runtime_error(proc, "image not found", "missing.png")
    proc = edge_mllm("run", "--prompt", "hi", "--image", "missing.png", cwd=tmp_path)
    assert_runtime_error(proc, "image not found", "missing.png")


def test_second_bad_image_is_reported(tmp_path, png, text_file_png):
    proc = edge_mllm("run", "no/such/model", "-p", "hi", "-i", str(png), "-i", str(text_file_png), cwd=tmp_path)
    assert_runtime_error(proc, "notes.png")


def test_truncated_image_fails_fast(tmp_path, png):
    half = tmp_path / "half.png"
    data = png.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    proc = edge_mllm("run", "no/such/model", "--prompt", "hi", "--image", str(half), cwd=tmp_path)
    assert_runtime_error(proc, "half.png")


def test_directory_as_image(tmp_path):
    proc = edge_mllm("run", "no/such/model", "--prompt", "hi", "--image", str(tmp_path), cwd=tmp_path)
    assert_runtime_error(proc, "directory")


def test_debug_shows_traceback(tmp_path):
    proc = edge_mllm("--debug", "run", "does/not/exist", "--prompt", "hi", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "CheckpointError" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: model not found")


def test_console_script(tmp_path):
    script = console_script()
    if script is None:
        pytest.skip("the edge-mllm console script is not installed next to this interpreter")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=DEFAULT_TIMEOUT)
    assert proc.returncode == 0 and "edge-mllm" in proc.stdout
    proc = subprocess.run([str(script), "run", "nowhere", "-p", "hi"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=DEFAULT_TIMEOUT)
    assert_runtime_error(proc, "model not found")
    proc = subprocess.run([str(script), "run"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=DEFAULT_TIMEOUT)
    assert_usage_error(proc, "Missing option")


# --------------------------------------------------------------------------------------------------
# The embedded default model (SmolLM2-135M-Instruct + trained vision tower, projector and LoRA)


@pytest.mark.slow
def test_run_text_json_knows_paris(tmp_path):
    proc = edge_mllm("run", "--prompt", "What is the capital of France?", "--max-new-tokens", "16", "--json",
                     cwd=tmp_path, timeout=MODEL_TIMEOUT)
    data = parse_json(proc)
    check_run_json(data, 16)
    assert data["text"].strip()
    assert "Paris" in data["text"], data["text"]
    assert data["prompt_tokens"] < 144  # no image tokens in a text-only prompt
    assert proc.stderr.strip() == "", proc.stderr  # --json output is not interleaved with chatter


@pytest.mark.slow
def test_run_with_image_json(tmp_path, png):
    proc = edge_mllm("run", "--image", str(png), "--prompt", "What is in this picture?", "--max-new-tokens", "4",
                     "--json", cwd=tmp_path, timeout=MODEL_TIMEOUT)
    data = parse_json(proc)
    check_run_json(data, 4)
    assert data["prompt_tokens"] > 144  # the 144 image tokens plus the templated text


@pytest.mark.slow
def test_run_of_one_token_times_no_decode_step(tmp_path):
    proc = edge_mllm("run", "--prompt", "What is the capital of France?", "--max-new-tokens", "1", cwd=tmp_path,
                     timeout=MODEL_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "1 generated" in proc.stderr and "no decode step" in proc.stderr and "0.0 tok/s" not in proc.stderr


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(tmp_path):
    args = ("run", "--prompt", "Write a short poem about the sea.", "--temperature", "0.8", "--seed", "1234",
            "--max-new-tokens", "12", "--json")
    first = parse_json(edge_mllm(*args, cwd=tmp_path, timeout=MODEL_TIMEOUT))
    second = parse_json(edge_mllm(*args, cwd=tmp_path, timeout=MODEL_TIMEOUT))
    check_run_json(first, 12)
    assert first["token_ids"] == second["token_ids"]
    assert first["text"] == second["text"]


@pytest.mark.slow
def test_raw_prompt_with_image_marker_streams(tmp_path, png):
    # Plain (streaming) output: the answer on stdout, one stats line on stderr.
    proc = edge_mllm("run", "--raw", "--image", str(png), "--prompt", "<image>\nDescribe the image.",
                     "--max-new-tokens", "4", cwd=tmp_path, timeout=MODEL_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    stats = re.fullmatch(r"\[(\d+) prompt tokens, (\d+) generated; TTFT \d+ ms, "
                         r"(decode [\d.]+ tok/s|no decode step)\]\n", proc.stderr)
    assert stats, proc.stderr
    assert int(stats.group(1)) > 144
    assert 1 <= int(stats.group(2)) <= 4
    assert proc.stdout.endswith("\n")


def test_image_markers_are_checked_before_loading(tmp_path, png):
    # The model path does not exist: exit 2 (not "not found", exit 1) shows the prompt is checked first.
    proc = edge_mllm("run", "no/such/model", "--raw", "--image", str(png), "--prompt", "Describe the image.",
                     cwd=tmp_path)
    assert_usage_error(proc, "0 <image> marker(s) but 1 image(s)")
    proc = edge_mllm("run", "no/such/model", "--prompt", "<image> what is it?", cwd=tmp_path)
    assert_usage_error(proc, "the prompt contains <image>")


@pytest.mark.slow
def test_prompt_past_the_context(tmp_path):
    proc = edge_mllm("run", "--prompt", "hi", "--max-new-tokens", "9000", cwd=tmp_path, timeout=MODEL_TIMEOUT)
    assert_runtime_error(proc, "context", "8192", "9000")


@pytest.mark.slow
def test_info_json_and_text(tmp_path):
    data = parse_json(edge_mllm("info", "--json", cwd=tmp_path, timeout=MODEL_TIMEOUT))
    params = data["parameters"]
    for component in ("vision_tower", "mm_projector", "language_model"):
        assert isinstance(params[component], int) and params[component] > 0, component
    assert 100e6 < params["language_model"] < 200e6  # SmolLM2-135M
    assert data["image_tokens"] == 144
    assert "trained on synthetic scenes" in data["notes"]["vision_tower"]
    assert data["config"]["text"]["max_position_embeddings"] == 8192

    proc = edge_mllm("info", cwd=tmp_path, timeout=MODEL_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert any("trained on synthetic scenes" in line for line in proc.stdout.splitlines()), proc.stdout
    assert "vision tower: CLIP ViT" in proc.stdout
    assert "144 image tokens" in proc.stdout
