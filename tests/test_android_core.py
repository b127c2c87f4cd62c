"""The Android demo's plain-Java core (android_demo/core) against edge-mllm's own Python.

Python writes golden files — reference images of several sizes and PIL modes with what
``edge_mllm.preprocess`` makes of them, and prompts rendered by ``edge_mllm.chat`` — and exports real
bundles of a tiny LLaVA; the Java module's JUnit tests, compiled and run here with the JDK and Debian's
junit4, must reproduce the tensors (max abs diff ≤ 1e-5, uint8 exactly) and prompts, open the bundles
and reject broken copies of them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from edge_mllm.export.bundle import export_bundle, image_preprocessing, prompt_template
from PIL import Image

from edge_mllm.chat import ChatTemplate, user_message
from edge_mllm.checkpoint import load_model
from edge_mllm.preprocess import RGB_FLOAT, ImageProcessor

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "android_demo" / "core" / "src"
JARS = ("junit4.jar", "hamcrest-core.jar")  # Debian's junit4 package
JAVA_DIRS = (Path("/usr/share/java"),)


def junit_classpath() -> list[Path] | None:
    found = [next((d / jar for d in JAVA_DIRS if (d / jar).is_file()), None) for jar in JARS]
    return None if None in found or not shutil.which("javac") else found


@pytest.fixture(scope="module")
def classpath():
    jars = junit_classpath()
    if jars is None:
        message = "needs a JDK (javac) and Debian's junit4 (apt-get install default-jdk-headless junit4)"
        if os.environ.get("CI"):
            pytest.fail(message + ": .ci/run installs them")
        pytest.skip(message)
    return jars


def reference_images() -> dict[str, Image.Image]:
    """Pictures of the kinds phones give: odd sizes both ways, tiny, large, gray, with transparency."""
    rng = np.random.default_rng(0)
    noise = lambda h, w, c: rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)  # noqa: E731
    y, x = np.mgrid[0:480, 0:640]
    photo = np.stack([(x * 255 // 639), (y * 255 // 479), ((x + y) % 256)], axis=-1).astype(np.int16)
    photo = np.clip(photo + rng.integers(-20, 21, photo.shape), 0, 255).astype(np.uint8)  # smooth + grain
    rgba = noise(40, 60, 4)
    rgba[:, :, 3] = np.linspace(0, 255, 60, dtype=np.uint8)[None, :]  # fully transparent → opaque
    palette = Image.fromarray(noise(17, 33, 0) % 8, "L").convert("P")
    palette.info["transparency"] = 3
    return {
        "rgb_wide_37x23": Image.fromarray(noise(23, 37, 3)),
        "rgb_tall_23x50": Image.fromarray(noise(50, 23, 3)),
        "rgb_1x1": Image.fromarray(noise(1, 1, 3)),
        "rgb_photo_640x480": Image.fromarray(photo),
        "rgb_large_2000x1500": Image.fromarray(np.asarray(Image.fromarray(photo).resize((2000, 1500)))),
        "rgb_square_336": Image.fromarray(noise(336, 336, 3)),
        "gray_100x80": Image.fromarray(noise(80, 100, 0), "L"),
        "rgba_60x40": Image.fromarray(rgba, "RGBA"),
        "gray_alpha_30x31": Image.fromarray(noise(31, 30, 4)[:, :, :2].copy(), "LA"),
        "palette_transparent_33x17": palette,
    }


@pytest.fixture(scope="module")
def models(llava):
    return {"default": load_model(None), "tiny_llava": load_model(llava.path)}


@pytest.fixture(scope="module")
def golden(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("android_golden")
    specs = {name: image_preprocessing(loaded) for name, loaded in models.items()}
    # plus CLIP's own layout at an odd size: center crop only, no padding
    specs["clip_crop_30"] = {**specs["default"], "image_size": 30, "aspect_ratio": "crop",
                             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    cases = []
    for image_name, image in reference_images().items():
        (out / f"{image_name}.rgba").write_bytes(np.asarray(image.convert("RGBA")).tobytes())
        for spec_name, spec in specs.items():
            processor = ImageProcessor(spec["image_size"], tuple(spec["image_mean"]), tuple(spec["image_std"]),
                                       spec["aspect_ratio"])
            rgb = processor.rgb(image)
            name = f"{image_name}.{spec_name}"
            (out / f"{name}.u8").write_bytes(rgb.numpy().tobytes())
            (out / f"{name}.norm.f32").write_bytes(processor.normalize(rgb).numpy().astype("<f4").tobytes())
            (out / f"{name}.rgbf.f32").write_bytes(
                processor.vision_input(image, RGB_FLOAT).numpy().astype("<f4").tobytes())
            cases.append({"name": name, "spec": spec, "width": image.width, "height": image.height,
                          "pixels": f"{image_name}.rgba", "rgb": f"{name}.u8", "normalized": f"{name}.norm.f32",
                          "rgb_float": f"{name}.rgbf.f32"})
    (out / "images.json").write_text(json.dumps(cases))

    prompts = []
    for loaded in models.values():
        template = prompt_template(loaded)
        assert template is not None
        for question, images in (("What colour is the circle?", 1), ("Compare them.", 2), ("Hello!", 0),
                                 ("  Ünïcode ✓ and \"quotes\"\n", 1)):
            text = ChatTemplate(loaded.chat_template).render([user_message(question, images)], loaded.tokenizer)
            prompts.append({"prompt_template": template, "question": question, "images": images, "text": text,
                            "segments": segments(text)})
    (out / "prompts.json").write_text(json.dumps(prompts))
    return out


def segments(text: str) -> list[str]:
    """The prompt split at its images: texts and "<image>" in turn, empty texts left out."""
    out = []
    for i, piece in enumerate(text.split("<image>")):
        out += ["<image>"] * (i > 0) + [piece] * (piece != "")
    return out


@pytest.fixture(scope="module")
def bundles(models, tmp_path_factory) -> Path:
    """The tiny LLaVA exported as the app's two formats: a 4-bit ExecuTorch program and an fp16 GGUF."""
    root = tmp_path_factory.mktemp("android_bundles")
    tiny = models["tiny_llava"]
    export_bundle(copy.deepcopy(tiny), "executorch", root / "executorch", quant="rtn-w4-g32", progress=False)
    export_bundle(copy.deepcopy(tiny), "gguf", root / "gguf", progress=False)
    return root


@pytest.mark.slow
def test_java_core_reproduces_python(classpath, golden, bundles, tmp_path):
    classes = tmp_path / "classes"
    sources = sorted(str(p) for p in CORE.rglob("*.java"))
    cp = os.pathsep.join(str(j) for j in classpath)
    compiled = subprocess.run(["javac", "--release", "11", "-Xlint:all", "-Werror", "-d", str(classes), "-cp", cp,
                               *sources], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    tests = sorted(p.relative_to(CORE / "test" / "java").with_suffix("").as_posix().replace("/", ".")
                   for p in (CORE / "test" / "java").rglob("*Test.java"))
    assert len(tests) >= 7
    run = subprocess.run(["java", f"-Dedgemllm.golden={golden}", f"-Dedgemllm.bundles={bundles}",
                          "-Dedgemllm.require=true", "-cp", os.pathsep.join([str(classes), cp]),
                          "org.junit.runner.JUnitCore", *tests], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    assert "OK (" in run.stdout, run.stdout[-2000:]
