"""Image → LLM-ready tokens, ms per image, every path on the same weights, at 1 and 2 threads.

Paths: eager PyTorch through the reference modules (``MultimodalLM.encode_images``) and through
``FusedVisionEncoder``; ExecuTorch (XNNPACK, the bundle's ``vision_encoder`` method) and ONNX Runtime
(``vision.onnx``), each with the reference graph (``--no-fuse-vision``) and the fused one; and
llama.cpp's clip (libmtmd through llama-cpp-python) on the bundle's ``mmproj.gguf``. The int8 rows are
``--int8-vision`` as each export writes it (XNNPACK's qd8-f32-qc8w GEMMs, ONNX Runtime's dynamic
int8, a Q8_0 mmproj) and
``FusedVisionEncoder(int8=True)`` in eager PyTorch; their error is the relative L2 column.

Encoders: the default model's (CLIP ViT 336 px / 14, width 256, 5 layers run, LDPv2), and a CLIP
ViT-L/14-336-shaped tower (24 layers, 23 run, as MobileVLM and LLaVA select) with LDPv2, random
weights, projecting to the default LLM's width (576; MobileVLM V2 1.7B projects to 2048, ~3 GFLOP more
of ~180). Every path gets one 336×336 image, as its runtime takes it (llama.cpp: the uint8 RGB
bitmap, which it rescales and normalises itself). Median of ``--repeats`` after one warm-up call.

``python benchmarks/vision_path.py [--models default vit-l] [--threads 1 2] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from edge_mllm.bench.measure import settle
from edge_mllm.checkpoint import load_model
from edge_mllm.checkpoint.base import LoadedModel
from edge_mllm.config import MLLMConfig, ProjectorConfig, VisionConfig
from edge_mllm.model.fused_vision import FusedVisionEncoder
from edge_mllm.model.mllm import MultimodalLM
from edge_mllm.preprocess import ImageProcessor

PATHS = ("eager unfused", "eager fused", "eager fused int8", "ExecuTorch XNNPACK unfused",
         "ExecuTorch XNNPACK fused", "ExecuTorch XNNPACK fused int8", "ONNX Runtime unfused", "ONNX Runtime fused",
         "ONNX Runtime fused int8",
         "llama.cpp clip", "llama.cpp clip Q8_0")
LLAMACPP = ("llama.cpp clip", "llama.cpp clip Q8_0")
VIT_L_336 = VisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=24, num_attention_heads=16)


def vit_l_model(default: LoadedModel) -> LoadedModel:
    """ViT-L/14-336 + LDPv2 (random) in front of the default model's language model and tokenizer."""
    torch.manual_seed(0)
    config = MLLMConfig(text=default.model.config.text, vision=VIT_L_336, projector=ProjectorConfig("ldpv2"))
    model = MultimodalLM(config)
    model.language_model = default.model.language_model
    return LoadedModel(model.eval(), default.tokenizer, default.chat_template)


def timed(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per path of ``repeats`` rounds, the paths interleaved within each round (the CPU is
    shared: a path timed in one block would take whatever load that moment had), after one warm-up;
    each timed call waits for the previous runtime's threads to stop spinning (``settle``)."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            settle()
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def build_artifacts(loaded: LoadedModel, folder: Path) -> None:
    """The vision graphs as the exports write them, fused and (``--no-fuse-vision``) reference:
    ``vision[_ref|_int8].pte`` (the ``vision_encoder`` method alone, lowered as the bundle lowers it) and
    ``vision[_ref].onnx`` (and ``vision_int8.onnx``); and the GGUF bundle's ``model.gguf`` +
    ``mmproj.gguf`` (and its ``--int8-vision`` twin)."""
    from edge_mllm.export.bundle import export_bundle
    from edge_mllm.export.executorch.modules import FusedRGBVisionEncoder, VisionEncoder
    from edge_mllm.export.executorch.program import VISION_METHOD, MethodSpec, export_methods, lower_to_pte
    from edge_mllm.export.executorch.quantize import VISION_INT8, dynamic_quantize_linears_
    from edge_mllm.export.executorch.targets import XnnpackTarget
    from edge_mllm.export.onnx import files, graphs
    from edge_mllm.export.onnx.bundle import quantize_vision_int8

    model = loaded.model.eval()
    s = model.config.vision.image_size
    for suffix, encoder, dtype in (("", FusedRGBVisionEncoder, torch.uint8), ("_ref", VisionEncoder, torch.float32),
                                   ("_int8", FusedRGBVisionEncoder, torch.uint8)):
        method = encoder(model)
        if suffix == "_int8":
            dynamic_quantize_linears_(method, VISION_INT8)
        spec = MethodSpec(method, (torch.zeros(1, 3, s, s, dtype=dtype),))
        programs = export_methods({VISION_METHOD: spec}, progress=False)
        quantized = suffix == "_int8"
        pte = lower_to_pte(programs, lambda name, q=quantized: XnnpackTarget().partitioners(name, q), {})
        (folder / f"vision{suffix}.pte").write_bytes(pte)
        if quantized:
            continue
        graph = graphs.export_vision(model, fused=not suffix)
        files.fold_weight_transposes(graph)
        if not suffix:  # before saving: save() points the graph's weights at its data file
            files.save(quantize_vision_int8(graph), folder / "vision_int8.onnx")
        files.save(graph, folder / f"vision{suffix}.onnx")
    export_bundle(copy.deepcopy(loaded), "gguf", folder / "gguf", progress=False)
    export_bundle(copy.deepcopy(loaded), "gguf", folder / "gguf_int8", progress=False, int8_vision=True)


def measure(loaded: LoadedModel, folder: Path, threads: int, repeats: int) -> dict[str, list[float]]:
    """[ms per image, max |Δ|, relative L2 error of the tokens against the reference] of every path,
    at ``threads``.
    Runs in a fresh process per thread count: resetting ExecuTorch's process-wide threadpool after
    other runtimes have run crashed them here (a glibc priority-mutex assertion, a segfault in ONNX
    Runtime), so each process sets it once, first."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(threads)
    torch.set_num_threads(threads)
    import onnxruntime as ort
    from edge_mllm.export.executorch.program import VISION_METHOD
    from executorch.runtime import Runtime

    model = loaded.model.eval()
    v = model.config.vision
    image = np.random.default_rng(0).integers(0, 256, size=(v.image_size, v.image_size, 3), dtype=np.uint8)
    processor = ImageProcessor(v.image_size, v.image_mean, v.image_std, model.config.image_aspect_ratio)
    rgb = processor.rgb(image)[None]  # square at the encoder's size: no resize, as llama.cpp sees it
    normalized, rgb01 = processor.normalize(rgb), rgb.float() / 255
    fused = FusedVisionEncoder(model).eval()
    fused_int8 = FusedVisionEncoder(model, int8=True).eval()
    method, method_ref, method_int8 = (
        Runtime.get().load_program(folder / f"vision{suffix}.pte").load_method(VISION_METHOD)
        for suffix in ("", "_ref", "_int8"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session, session_ref, session_int8 = (
        ort.InferenceSession(str(folder / f"vision{suffix}.onnx"), options, providers=["CPUExecutionProvider"])
        for suffix in ("", "_ref", "_int8"))
    gguf, gguf_int8 = folder / "gguf", folder / "gguf_int8"
    with (torch.inference_mode(),
          llamacpp_encoder(gguf / "model.gguf", gguf / "mmproj.gguf", image, threads) as clip,
          llamacpp_encoder(gguf_int8 / "model.gguf", gguf_int8 / "mmproj.gguf", image, threads) as clip_q8):
        calls = {
            "eager unfused": lambda: model.encode_images(normalized)[0].numpy(),
            "eager fused": lambda: fused(rgb01)[0].numpy(),
            "eager fused int8": lambda: fused_int8(rgb01)[0].numpy(),
            "ExecuTorch XNNPACK unfused": lambda: method_ref.execute([normalized])[0][0].numpy(),
            "ExecuTorch XNNPACK fused": lambda: method.execute([rgb])[0][0].numpy(),
            "ExecuTorch XNNPACK fused int8": lambda: method_int8.execute([rgb])[0][0].numpy(),
            "ONNX Runtime unfused": lambda: session_ref.run(None, {"pixel_values": normalized.numpy()})[0],
            "ONNX Runtime fused": lambda: session.run(None, {"pixel_values": rgb01.numpy()})[0],
            "ONNX Runtime fused int8": lambda: session_int8.run(None, {"pixel_values": rgb01.numpy()})[0],
            "llama.cpp clip": clip,
            "llama.cpp clip Q8_0": clip_q8,
        }
        ms = timed(calls, repeats)
        outputs = {name: call() for name, call in calls.items()}
    reference = outputs["eager unfused"]
    llamacpp_reference = outputs["llama.cpp clip"]  # its own token order (see the README's footnote)
    out = {}
    for name, tokens in outputs.items():
        ref = llamacpp_reference if name == "llama.cpp clip Q8_0" else reference
        diff = tokens.reshape(ref.shape) - ref
        out[name] = [ms[name], float(np.abs(diff).max()), float(np.linalg.norm(diff) / np.linalg.norm(ref))]
    return out


@contextmanager
def llamacpp_encoder(model_gguf: Path, mmproj_gguf: Path, image: np.ndarray, threads: int):
    """A call running libmtmd's ``mtmd_encode_chunk`` on ``image`` (its preprocessing + the clip
    graph), returning the image embeddings [N, D]; the model, mmproj and bitmap load once."""
    import ctypes

    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=str(model_gguf), n_ctx=256, n_threads=threads, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, threads, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj_gguf).encode(), llm.model, params)
    pixels = np.ascontiguousarray(image)
    buffer = (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes())
    bitmap = mtmd.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0], buffer)
    text = mtmd.mtmd_input_text()
    marker = mtmd.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
            raise RuntimeError("libmtmd could not tokenize the image")
        every = (mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks)))
        chunk = next(c for c in every if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)
        n_tokens, n_embd = mtmd.mtmd_input_chunk_get_n_tokens(chunk), llama_cpp.llama_model_n_embd(llm.model)

        def encode() -> np.ndarray:
            if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                raise RuntimeError("libmtmd failed to encode the image")
            out = mtmd.mtmd_get_output_embd(ctx)
            return np.ctypeslib.as_array(out, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()

        yield encode
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llm.close()


def print_table(title: str, results: dict[int, dict[str, list[float]]]) -> None:
    threads = sorted(results)
    base = {n: results[n]["eager unfused"][0] for n in threads}
    print(f"\n{title}")
    print("| path | " + " | ".join(f"ms, {n} thread{'s' * (n > 1)} | × unfused" for n in threads)
          + " | max abs Δ vs reference | rel. L2 vs reference |")
    print("| --- | " + " | ".join("---: | ---:" for _ in threads) + " | ---: | ---: |")
    for path in PATHS:
        cells = " | ".join(f"{results[n][path][0]:.1f} | {base[n] / results[n][path][0]:.2f}×" for n in threads)
        print(f"| {path} | {cells} | {results[threads[0]][path][1]:.1e} | {results[threads[0]][path][2]:.1e} |")
    for n in threads:
        ours = min(results[n][p][0] for p in PATHS if p not in LLAMACPP and "int8" not in p)
        print(f"{n} thread(s): our fastest fp32 path is {results[n]['llama.cpp clip'][0] / ours:.2f}× llama.cpp's clip")


def model_for(name: str) -> LoadedModel:
    default = load_model(None)
    return default if name == "default" else vit_l_model(default)


TITLES = {"default": "default model (CLIP 336/14, width 256, 5 of 6 layers, LDPv2)",
          "vit-l": "CLIP ViT-L/14-336 (23 of 24 layers) + LDPv2, random weights"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TITLES), choices=list(TITLES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build", nargs=2, metavar=("MODEL", "ARTIFACTS"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "ARTIFACTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build_artifacts(model_for(args.build[0]), Path(args.build[1]))
        return
    if args.worker:  # one thread count in this process; JSON on the last line of stdout
        name, folder = args.worker
        print(json.dumps(measure(model_for(name), Path(folder), args.threads[0], args.repeats)))
        return
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            # each step in its own process: ViT-L's export copies would otherwise stay resident
            # (12 GB) beside the timed process
            subprocess.run([sys.executable, __file__, "--build", name, tmp], check=True, capture_output=True)
            results = {}
            for n in args.threads:
                done = subprocess.run([sys.executable, __file__, "--worker", name, tmp, "--threads", str(n),
                                       "--repeats", str(args.repeats)], check=True, capture_output=True, text=True)
                results[n] = json.loads(done.stdout.strip().splitlines()[-1])
        print_table(TITLES[name], results)


if __name__ == "__main__":
    main()
