"""The ``edge-mllm`` command line.

Exit codes: 0 ok, 1 runtime error, 2 usage error. Errors print as one line; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import click

from edge_mllm import __version__
from edge_mllm.config import LAYER_SELECTIONS, RECIPE_PROJECTORS
from edge_mllm.export import FORMATS as EXPORT_FORMATS

# Library chatter (transformers' advisory warnings) would break --json output and one-line errors.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MODEL_ARG = click.argument("model", required=False, type=click.Path(path_type=str))


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False))


def _finite(obj):
    """NaN and infinities as null: JSON has no such numbers (a run with no step left has no loss)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(value) for value in obj]
    return obj


def _check_output(output: str, replaceable, *inputs: str | None) -> None:
    """Refuse OUTPUT before any work (a usage error): a file, the input itself, or a folder holding
    something other than an earlier output of this command (``fsutil.check_output_dir``)."""
    from edge_mllm.errors import OutputError
    from edge_mllm.fsutil import check_output_dir

    try:
        check_output_dir(output, replaceable, [i for i in inputs if i])
    except OutputError as exc:
        raise click.UsageError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-mllm")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """Distill, quantize and export compact multimodal LLMs for phones.

    MODEL is a checkpoint (edge-mllm folder, llama GGUF, LLaVA/MobileVLM or Hugging Face Llama
    folder); without it, the embedded default (SmolLM2-135M-Instruct + vision tower) is used.
    """


@cli.command()
@MODEL_ARG
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model: str | None, as_json: bool) -> None:
    """Architecture and parameter count per component; for a bundle, its manifest (files checked)."""
    from edge_mllm.pipeline import Pipeline
    from edge_mllm.runtime import is_bundle

    if is_bundle(model):
        _bundle_info(model, as_json)
        return
    data = Pipeline.load(model).info()
    data["model"] = model or "embedded default"
    if as_json:
        _emit_json(data)
        return
    cfg, params = data["config"], data["parameters"]
    text = cfg["text"]
    click.echo(f"model: {data['model']}")
    click.echo(
        f"language model: llama, {text['num_hidden_layers']} layers, hidden {text['hidden_size']}, "
        f"heads {text['num_attention_heads']}/{text['num_key_value_heads']} (q/kv), ffn {text['intermediate_size']}, "
        f"vocab {text['vocab_size']}, context {text['max_position_embeddings']}, rope theta {text['rope_theta']:g}, "
        f"tied embeddings {text['tie_word_embeddings']} — {params['language_model'] / 1e6:.2f}M params"
    )
    if cfg["vision"]:
        v = cfg["vision"]
        click.echo(
            f"vision tower: CLIP ViT {v['image_size']}px/{v['patch_size']}, hidden {v['hidden_size']}, "
            f"{v['num_hidden_layers']} layers (features from layer {v['select_layer']}, {v['select_feature']}), "
            f"{v['hidden_act']} — {params['vision_tower'] / 1e6:.2f}M params"
        )
        click.echo(
            f"projector: {cfg['projector']['type']} → {data['image_tokens']} image tokens — "
            f"{params['mm_projector'] / 1e6:.2f}M params"
        )
    else:
        click.echo("vision tower: none (text-only model)")
    click.echo(f"total: {sum(params.values()) / 1e6:.2f}M params; chat template: {data['chat_template']}")
    for key, note in data["notes"].items():
        click.echo(f"note ({key}): {note}")


def _bundle_info(path: str, as_json: bool) -> None:
    """An exported bundle's manifest, after checking its files against it."""
    from edge_mllm.runtime.bundle import read_manifest, verify_files

    manifest = read_manifest(path)
    verify_files(Path(path), manifest)
    if as_json:
        _emit_json(manifest | {"bundle": path, "files_verified": True})
        return
    text, vision = manifest["model"]["text"], manifest["model"].get("vision")
    click.echo(f"bundle: {path} ({manifest['format']}, {manifest.get('quantization') or 'float'}; "
               f"edge-mllm {manifest.get('edge_mllm_version')})")
    click.echo(f"language model: llama, {text['num_hidden_layers']} layers, hidden {text['hidden_size']}, "
               f"vocab {text['vocab_size']}; context {manifest.get('max_seq_len')} tokens")
    if vision:
        click.echo(f"vision: CLIP ViT {vision['image_size']}px/{vision['patch_size']}, "
                   f"{manifest['model']['projector']['type']} → {manifest.get('image_token_count')} image tokens")
    for f in manifest["files"]:
        click.echo(f"{f['size'] / 1e6:9.2f} MB  {f['path']}")
    total = sum(f["size"] for f in manifest["files"]) / 1e6
    click.echo(f"{total:9.2f} MB in {len(manifest['files'])} files, each matching the manifest's size and sha256")


@cli.command()
@MODEL_ARG
@click.option("--prompt", "-p", required=True, help="The question or instruction.")
@click.option("--image", "-i", "images", multiple=True, help="Image file (repeat for several).")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=None, type=int, help="Sampling seed.")
@click.option("--raw", is_flag=True, help="No chat template: the prompt is fed as is; <image> marks images.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def run(model, prompt, images, max_new_tokens, temperature, top_p, seed, raw, as_json) -> None:
    """Answer a prompt (optionally about images) with MODEL, or with a bundle in its own runtime."""
    from edge_mllm import runtime
    from edge_mllm.chat import check_image_markers
    from edge_mllm.errors import OptionError
    from edge_mllm.preprocess import load_image

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 (click keeps them as surrogates)
        raise click.BadParameter("is not valid UTF-8 text", param_hint="--prompt") from None
    try:
        check_image_markers(prompt, len(images), raw)
    except OptionError as exc:
        raise click.UsageError(str(exc)) from None
    bundle = runtime.is_bundle(model)
    if bundle and (temperature > 0 or top_p < 1 or seed is not None):
        raise click.UsageError("exported bundles generate greedily: --temperature/--top-p/--seed are for models")
    loaded_images = [load_image(path) for path in images]  # fail on a bad image before loading the model
    pipeline = runtime.load(model)
    stream = None if as_json else (lambda delta: click.echo(delta, nl=False))
    sampling = {} if bundle else {"temperature": temperature, "top_p": top_p, "seed": seed}
    result = pipeline.generate(prompt, loaded_images, raw=raw, max_new_tokens=max_new_tokens, stream=stream,
                               **sampling)
    if as_json:
        _emit_json(
            {
                "text": result.text,
                "token_ids": result.token_ids,
                "prompt_tokens": result.prompt_tokens,
                "generated_tokens": len(result.token_ids),
                "finish_reason": result.finish_reason,
                "timings": result.timings,
            }
        )
        return
    click.echo()
    t = result.timings
    rate = t["decode_tokens_per_s"]  # None: the answer was one token, so no decode step was timed
    decode = "no decode step" if rate is None else f"decode {rate:.1f} tok/s"
    click.echo(
        f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated; "
        f"TTFT {t['time_to_first_token_s'] * 1000:.0f} ms, {decode}]",
        err=True,
    )


@cli.group()
def data() -> None:
    """Make and inspect training / evaluation data."""


@data.command("synth")
@click.option("--split", type=click.Choice(["train", "val", "test"]), required=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-n", "count", default=500, show_default=True, type=click.IntRange(min=1), help="Number of scenes.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Output folder (an earlier split there is replaced).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written (records per file, questions per "
                                                      "type) as one JSON object.")
def data_synth(split: str, seed: int, count: int, output: str, as_json: bool) -> None:
    """Render synthetic scenes with captions, VQA and POPE questions (LLaVA JSON format).

    Writes OUTPUT/images/*.png, captions.json (stage 1), conversations.json (stage 2, multi-turn) and
    questions.json (evaluation, one question per record with its type)."""
    from collections import Counter

    from edge_mllm.data.synth import QUESTIONS_FILE, SPLIT_FILES, is_split, write_split

    _check_output(output, is_split)
    folder = write_split(output, split, seed, count, progress=not as_json)
    if not as_json:
        click.echo(f"wrote {count} {split} scenes to {output}", err=True)
        return
    records = {name: json.loads((Path(folder) / name).read_text()) for name in SPLIT_FILES}
    by_type = Counter(record["question_type"] for record in records[QUESTIONS_FILE])
    _emit_json({"output": output, "split": split, "seed": seed, "scenes": count,
                "records": {name: len(recs) for name, recs in records.items()},
                "questions_by_type": dict(sorted(by_type.items()))})


def _training_state_dir(output: str, *state_files: str) -> Path:
    """OUTPUT.train, beside OUTPUT (also when OUTPUT ends with a slash), where training keeps its
    resumable state: checked before any work by the rule every output follows (an earlier state may
    be there — its checkpoint or one of ``state_files`` —; a file, or a folder of other files, may not)."""
    from edge_mllm.train.trainer import CHECKPOINT_FILE

    out = Path(output).resolve()
    state = out.with_name(f"{out.name}.train")
    _check_output(str(state), lambda folder: any((folder / f).is_file() for f in (CHECKPOINT_FILE, *state_files)))
    return state


def _training_data(data_path: str, stage: str, images: str | None):
    from edge_mllm.data.llava import load_conversations
    from edge_mllm.data.synth import CAPTIONS_FILE, CONVERSATIONS_FILE

    path = Path(data_path)
    if path.is_dir():
        path = path / (CAPTIONS_FILE if stage == "pretrain" else CONVERSATIONS_FILE)
    return load_conversations(path, images)


SINGLE_TURNS = click.option(
    "--single-turns", is_flag=True,
    help="Learn each question on its own, as evaluation asks it (the questions about one image share its prompt in "
         "one packed row; --batch-size then counts such rows).")
FREEZE_PROJECTOR = click.option(
    "--freeze-projector", is_flag=True,
    help="Keep the connector as it is (e.g. grounded image tokens, while the LLM learns to read them).")


def precision_option(default: str):
    return click.option(
        "--precision", type=click.Choice(["fp32", "bf16", "auto"]), default=default, show_default=True,
        help="bf16: mixed precision (bfloat16 matmuls, fp32 weights and optimizer; 0.6x the time of a stage-2 step "
             "on an AVX512-BF16 CPU); auto: bf16 where the CPU (AVX512-BF16, AMX) or GPU multiplies bfloat16 "
             "natively, else fp32.")


PRECISION = precision_option("fp32")


@cli.command()
@MODEL_ARG
@click.option("--stage", type=click.Choice(["pretrain", "instruct"]), required=True,
              help="pretrain: connector only, caption loss; instruct: connector + LLM, response loss.")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, path_type=str),
              help="LLaVA-format JSON, or a folder from `edge-mllm data synth`.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Image folder (default: next to the JSON).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output model folder.")
@click.option("--epochs", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=2e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--lora-rank", type=click.IntRange(min=0),
              help="instruct: LoRA rank on the LLM's linears; 0 trains the whole LLM.  [default: 8]")
@click.option("--freeze-llm", is_flag=True,
              help="instruct: keep the LLM frozen (connector, and the vision encoder with --train-vision, learn).")
@click.option("--train-vision", is_flag=True, help="Also train the vision encoder.")
@FREEZE_PROJECTOR
@click.option("--image-norm-weight", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Weight of a penalty keeping image tokens at a word embedding's norm (TRAINING.md).")
@SINGLE_TURNS
@click.option("--qat", metavar="SCHEME",
              help="instruct + LoRA: train the merged weights on this round-to-nearest scheme's grid (e.g. "
                   "rtn-w4-g32-min), so that exporting with --quant SCHEME keeps what was learnt.")
@click.option("--qat-activations", is_flag=True,
              help="With --qat: also round the linears' inputs to int8 per token, as ExecuTorch's 8da4w linears "
                   "(XNNPACK) do, so that ExecuTorch changes fewer answers (TRAINING.md, run 14).")
@click.option("--max-len", default=512, show_default=True, type=click.IntRange(min=8))
@PRECISION
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue from OUTPUT.train/ (optimizer, step).")
@click.option("--json", "as_json", is_flag=True)
def train(model, stage, data_path, images, output, epochs, batch_size, lr, lora_rank, freeze_llm, train_vision,
          freeze_projector, image_norm_weight, single_turns, qat, qat_activations, max_len, precision, seed, resume,
          as_json) -> None:
    """Train the connector (pretrain) or connector + LLM (instruct) on conversations."""

    import torch

    from edge_mllm.chat import ChatTemplate
    from edge_mllm.checkpoint import load_model, save_native
    from edge_mllm.checkpoint.native import is_native
    from edge_mllm.errors import EdgeMLLMError
    from edge_mllm.train.lora import merge_lora
    from edge_mllm.train.trainer import TrainConfig, Trainer

    if freeze_llm and lora_rank is not None:
        raise click.UsageError("--freeze-llm trains no LoRA (the LLM stays as it is): drop --lora-rank")
    lora = {} if lora_rank is None else {"lora_rank": lora_rank}
    try:  # options that do not go together (e.g. --qat with --freeze-llm) are usage errors
        config = TrainConfig(stage=stage, epochs=epochs, batch_size=batch_size, lr=lr, freeze_llm=freeze_llm,
                             train_vision=train_vision, train_projector=not freeze_projector,
                             image_norm_weight=image_norm_weight, single_turns=single_turns, qat=qat,
                             qat_activations=qat_activations,
                             max_len=max_len, precision=precision, seed=seed, **lora)
    except EdgeMLLMError as exc:
        raise click.UsageError(str(exc)) from exc
    _check_output(output, is_native, model, data_path, images)
    state_dir = _training_state_dir(output)
    conversations = _training_data(data_path, stage, images)
    loaded = load_model(model)
    torch.manual_seed(seed)
    trainer = Trainer(loaded.model, loaded.tokenizer, ChatTemplate(loaded.chat_template), config)
    stats = trainer.train(conversations, checkpoint_dir=state_dir, resume=resume)
    merge_lora(loaded.model)
    save_native(loaded, output)
    stats["output"] = output
    if as_json:
        _emit_json(stats)
    else:
        click.echo(f"trained {stats['steps']} steps, final loss {stats['final_loss']:.4f}; saved {output}", err=True)


@cli.command("train-default")
@click.option("-o", "--output", default="out/default-recipe", show_default=True, type=click.Path(path_type=str))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quick", is_flag=True, help="A minutes-long run of the same steps (to try the pipeline).")
@click.option("--scale", default=1, show_default=True, type=click.IntRange(min=1),
              help="K times the training scenes, vision-pretraining and grounding steps (and so stage-2 steps): "
                   "for a GPU; 1 is the CPU recipe.")
@click.option("--vision-from", type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Take the vision tower and projector of an earlier run's default_vision.safetensors and skip "
                   "vision pretraining and grounding (to try LLM-stage changes in a third of the time); its "
                   "projector only if of the recipe's type.")
@click.option("--continue-from", type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Go on training an earlier run's default_vision.safetensors: its tower and projector as "
                   "--vision-from takes them, and stage 2 starts from its LoRA (give --first-scene past the "
                   "scenes it saw).")
@click.option("--first-scene", default=0, show_default=True, type=click.IntRange(min=0),
              help="Train on the seed's training scenes from this index on (the test scenes stay).")
@click.option("--projector", type=click.Choice(RECIPE_PROJECTORS),
              help="The projector (MobileVLM v2's LDPv2 or v1's LDP) [default: the recipe's].")
@click.option("--ground-steps", type=click.IntRange(min=0),
              help="Steps grounding the vision tower with the projector, through the tower (0: none) "
                   "[default: the recipe's].")
@click.option("--projector-steps", type=click.IntRange(min=0),
              help="Steps grounding the projector alone on the frozen tower's cached features (0: none) "
                   "[default: the recipe's].")
@click.option("--instruct-epochs", type=click.FloatRange(min=0, min_open=True),
              help="Epochs of stage 2 (instruction tuning) over the training conversations [default: the recipe's].")
@precision_option("auto")
@click.option("--json", "as_json", is_flag=True)
def train_default(output: str, seed: int, quick: bool, scale: int, vision_from: str | None,
                  continue_from: str | None, first_scene: int, projector: str | None, ground_steps: int | None,
                  projector_steps: int | None, instruct_epochs: float | None, precision: str, as_json: bool) -> None:
    """Train the embedded default's vision tower and projector on synthetic data (TRAINING.md).

    Writes OUTPUT/default_vision.safetensors (copy it to edge_mllm/weights/ to ship it), training.json
    and eval.json."""
    from dataclasses import replace

    from edge_mllm.train.recipe import RecipeConfig, is_recipe_output, run_recipe

    _check_output(output, is_recipe_output)
    config = replace(RecipeConfig.quick() if quick else RecipeConfig(), seed=seed, vision_from=vision_from,
                     continue_from=continue_from, first_scene=first_scene, precision=precision)
    if projector is not None:
        config = replace(config, projector=projector)
    if ground_steps is not None:
        config = replace(config, ground_steps=ground_steps)
    if projector_steps is not None:
        config = replace(config, projector_ground_steps=projector_steps)
    if instruct_epochs is not None:
        config = replace(config, instruct_epochs=instruct_epochs)
    summary = run_recipe(output, config.scaled(scale))
    if as_json:
        _emit_json(summary)
        return
    click.echo(format_report(summary["test"]))
    click.echo(f"took {summary['wall_seconds']:.0f} s; wrote {output}", err=True)


@cli.command()
@click.argument("teacher", required=False, type=click.Path(path_type=str))
@click.option("--student-layers", required=True, type=click.IntRange(min=1),
              help="LLM blocks the student keeps (the last always).")
@click.option("--layer-selection", type=click.Choice(LAYER_SELECTIONS), default="ends", show_default=True,
              help="ends: the first and last N/2 blocks; front: the first N-1 and the last; even: evenly spaced.")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, path_type=str),
              help="LLaVA-format JSON, or a folder from `edge-mllm data synth` (its conversations.json).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output student folder.")
@click.option("--temperature", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0, 1), help="Hard-label CE weight.")
@click.option("--hidden-weight", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Weight of final hidden-state matching (0: off).")
@click.option("--layer-weight", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Weight of matching each student block's output to its teacher block's (cosine; 0: off).")
@click.option("--teacher-answers", is_flag=True,
              help="Sequence-level KD: learn the teacher's greedy answers to the data's questions (each asked "
                   "alone with its image; kept in OUTPUT.train/) instead of the data's answers.")
@click.option("--epochs", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@SINGLE_TURNS
@FREEZE_PROJECTOR
@PRECISION
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue from OUTPUT.train/.")
@click.option("--json", "as_json", is_flag=True)
def distill(teacher, student_layers, layer_selection, data_path, images, output, temperature, alpha, hidden_weight,
            layer_weight, teacher_answers, epochs, batch_size, lr, single_turns, freeze_projector, precision, seed,
            resume, as_json) -> None:
    """Distill TEACHER (default: the embedded model) into a student with fewer LLM layers."""
    from edge_mllm.chat import ChatTemplate
    from edge_mllm.checkpoint import LoadedModel, load_model, save_native
    from edge_mllm.checkpoint.native import is_native
    from edge_mllm.distill.distiller import DistillConfig, Distiller
    from edge_mllm.distill.student import make_student, select_layers
    from edge_mllm.distill.teacher_answers import ANSWERS_FILE, pipeline_answers, with_teacher_answers
    from edge_mllm.pipeline import Pipeline
    from edge_mllm.train.trainer import TrainConfig

    _check_output(output, is_native, teacher, data_path, images)
    state_dir = _training_state_dir(output, ANSWERS_FILE)
    conversations = _training_data(data_path, "instruct", images)
    loaded = load_model(teacher)
    if teacher_answers:
        cache = state_dir / ANSWERS_FILE
        if not resume:  # another teacher's, or other data's
            cache.unlink(missing_ok=True)
        conversations = with_teacher_answers(conversations, pipeline_answers(Pipeline(loaded)), cache,
                                             progress=not as_json)
    layers = tuple(select_layers(loaded.model.config.text.num_hidden_layers, student_layers, layer_selection))
    student = make_student(loaded.model, layers)
    config = TrainConfig(stage="instruct", epochs=epochs, batch_size=batch_size, lr=lr, lora_rank=0,
                         train_projector=not freeze_projector, single_turns=single_turns, precision=precision,
                         seed=seed)
    distiller = Distiller(student, loaded.model, loaded.tokenizer, ChatTemplate(loaded.chat_template), config,
                          DistillConfig(temperature, alpha, hidden_weight, layer_weight, layers, teacher_answers))
    stats = distiller.train(conversations, checkpoint_dir=state_dir, resume=resume)
    save_native(LoadedModel(student, loaded.tokenizer, loaded.chat_template), output)
    stats.update(output=output, parameters=student.parameter_counts(),
                 teacher_parameters=loaded.model.parameter_counts())
    if as_json:
        _emit_json(stats)
    else:
        click.echo(f"distilled {stats['steps']} steps, final loss {stats['final_loss']:.4f}; saved {output}", err=True)


def _parse_scheme(_ctx, _param, value: str):
    from edge_mllm.errors import QuantError
    from edge_mllm.quant.scheme import QuantScheme

    try:
        return QuantScheme.parse(value)
    except QuantError as exc:
        raise click.BadParameter(str(exc)) from exc


@cli.command()
@MODEL_ARG
@click.option("--scheme", required=True, callback=_parse_scheme,
              help="METHOD-wBITS-gGROUP[-asym|-min][-dq][-sq][-mixed]: rtn|gptq|awq|awq+gptq, 4|8 bits, group "
                   "32|64|128 (e.g. awq-w4-g32; gptq-w4-g32-sq for ExecuTorch's int8-activation linears).")
@click.option("--calib", "calib_path", type=click.Path(exists=True, file_okay=False, path_type=str),
              help="LLaVA-format folder for GPTQ/AWQ calibration (default: a synthetic val split + stdlib text).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output model folder.")
@click.option("--report", is_flag=True, help="Measure perplexity, KL, top-1 agreement and VQA/POPE vs unquantized.")
@click.option("--eval-data", type=click.Path(exists=True, path_type=str),
              help="VQA/POPE set for --report (default: a held-out synthetic test split).")
@click.option("--eval-scenes", default=40, show_default=True, type=click.IntRange(min=1),
              help="Scenes in the default synthetic test split (~11 questions each).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def quantize(model, scheme, calib_path, output, report, eval_data, eval_scenes, as_json) -> None:
    """Quantize MODEL's weights by SCHEME and save it; --report measures what it cost.

    The folder holds the codes (loadable by every command) and quant_report.json."""
    import copy
    import tempfile

    from edge_mllm.checkpoint import detect_layout, load_model, save_native
    from edge_mllm.checkpoint.native import is_native
    from edge_mllm.data.synth import write_split
    from edge_mllm.quant.calibration import calibration_set
    from edge_mllm.quant.quantize import quantize_model
    from edge_mllm.quant.report import format_report, quality_report, size_report

    _check_output(output, is_native, model, calib_path, eval_data)
    loaded = load_model(model)
    reference = copy.deepcopy(loaded) if report else None
    calibration = calibration_set(loaded, calib_path) if scheme.needs_calibration else None
    result = quantize_model(loaded.model, scheme, calibration)
    loaded.quantization = result.weights()
    summary: dict = {"model": model or "default", "scheme": scheme.name,
                     "size": size_report(loaded.quantization, loaded), "notes": []}
    if model is None or detect_layout(Path(model)).name == "gguf":
        summary["notes"].append("the source weights come from a GGUF (the embedded SmolLM2-135M-Instruct ships as "
                                "Q4_1): 'reference' is their dequantized fp32 values, not the original bf16 model")
    summary["tensors"] = {name: vars(r) for name, r in sorted(result.report.items())}
    if report:
        with tempfile.TemporaryDirectory() as tmp:
            data = eval_data
            if data is None and loaded.model.config.has_vision:
                data = write_split(Path(tmp) / "test", "test", seed=0, n=eval_scenes)
            summary.update(quality_report(reference, loaded, vqa_data=data))
    save_native(loaded, output, extra_files={"quant_report.json": json.dumps(summary, indent=2) + "\n"})
    summary["output"] = output
    if as_json:
        _emit_json(summary)
    else:
        click.echo(format_report(summary))
        click.echo(f"saved {output}", err=True)


@cli.command()
@MODEL_ARG
@click.option("--format", "fmt", type=click.Choice(list(EXPORT_FORMATS)),
              help="executorch (XNNPACK) and its -coreml/-vulkan/-qnn/-mediatek delegates, gguf, onnx "
                   "(required unless --target picks it).")
@click.option("--quant", help="Our scheme (e.g. awq-w4-g32) or the format's own type "
                              "(gguf: f32, f16, q8_0, q4_0, q4_k_m; executorch: 8da4w[-gN], 8da8w; "
                              "onnx: ort-int4[-gN]). Default: floats, or a quantized MODEL's codes.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Bundle folder (an earlier bundle there is replaced).")
@click.option("--target", "target", callback=lambda ctx, param, value: _target_device(param, value),
              help="Device profile (`edge-mllm devices`): picks format, quantization, threads and max context "
                   "for it, records them in the manifest and prints the simulator's prediction.")
@click.option("--no-fuse-vision", "no_fuse_vision", is_flag=True,
              help="Export the reference vision graph (normalised pixels in) instead of the fused one "
                   "(RGB in; normalisation, LayerNorm affines and Q/K/V folded).")
@click.option("--int8-vision", "int8_vision", is_flag=True,
              help="The vision tower's matrices as int8 weights: XNNPACK's int8 GEMMs with int8 dynamic "
                   "activations (executorch), ONNX Runtime's dynamic int8 (onnx) or Q8_0 mmproj blocks (gguf).")
@click.option("--max-context", type=click.IntRange(min=1),
              help="Cap the bundle's context (prompt + image tokens + answer) below the model's: a smaller "
                   "preallocated KV cache. Default: the model's (ExecuTorch: at most 2048), or --target's pick.")
@click.option("--two-digit-activations", "two_digit", is_flag=True,
              help="executorch, our 4-bit codes: each linear reads its input as two int8 digits (about 12 "
                   "bits) instead of XNNPACK's one per token, for PyTorch's answers; the weights are held "
                   "twice (about 1.5x the size, decode about 0.75x).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export(model, fmt, quant, output, target, no_fuse_vision, int8_vision, max_context, two_digit, as_json) -> None:
    """Export MODEL as a bundle for a phone runtime: artifacts + tokenizer + manifest.json."""
    from edge_mllm.checkpoint import load_model
    from edge_mllm.errors import ConfigError, QuantError
    from edge_mllm.export.bundle import MANIFEST, check_options, export_bundle
    from edge_mllm.runtime import is_bundle

    try:  # before loading the model: option values no model could export are usage errors
        check_options(fmt, quant, int8_vision, two_digit)
    except (ConfigError, QuantError) as exc:
        raise click.UsageError(str(exc)) from exc
    _check_output(output, is_bundle, model)
    if target is not None:
        _export_for_target(model, target, fmt, quant, max_context, output, not no_fuse_vision, int8_vision, two_digit,
                           as_json)
        return
    if fmt is None:
        raise click.UsageError("give --format FORMAT, or --target DEVICE to have it picked")
    out = export_bundle(load_model(model), fmt, output, quant=quant, fuse_vision=not no_fuse_vision,
                        int8_vision=int8_vision, max_context=max_context, two_digit_activations=two_digit)
    manifest = json.loads((out / MANIFEST).read_text())
    if as_json:
        _emit_json(manifest)
        return
    for f in manifest["files"]:
        click.echo(f"{f['size'] / 1e6:9.2f} MB  {f['path']}")
    click.echo(f"exported {fmt} bundle ({manifest['quantization'] or 'float'}) to {output}", err=True)


def _target_device(param, name: str | None):
    """``--target``'s device profile; an unknown name is a usage error listing the valid ones."""
    from edge_mllm.errors import ConfigError
    from edge_mllm.sim.profiles import get_device

    try:
        return None if name is None else get_device(name)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param=param) from exc


def _export_for_target(model, device, fmt, quant, max_context, output, fuse_vision, int8_vision, two_digit,
                       as_json) -> None:
    """``export --target``: the device's picks (explicit --format/--quant/--max-context win), then the
    prediction."""
    from edge_mllm.checkpoint import load_model
    from edge_mllm.sim.target import export_for_target

    plan, manifest, prediction, unpredicted = export_for_target(
        load_model(model), device, output, fmt=fmt, quant=quant, max_context=max_context, fuse_vision=fuse_vision,
        int8_vision=int8_vision, two_digit_activations=two_digit)
    if as_json:
        _emit_json(manifest)
        return
    click.echo(f"target {device.key} ({device.name}):")
    for key in ("format", "quant", "threads", "max_context"):
        value = getattr(plan, key) or "(the model's codes)"
        click.echo(f"  {key:<12} {value}: {plan.reasons[key]}")
    for f in manifest["files"]:
        click.echo(f"{f['size'] / 1e6:9.2f} MB  {f['path']}")
    click.echo(format_prediction(prediction) if prediction else f"no prediction: {unpredicted}")
    click.echo(f"exported {plan.format} bundle ({manifest['quantization'] or 'float'}) for {device.key} to {output}",
               err=True)


@cli.command("eval")
@MODEL_ARG
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, path_type=str),
              help="Folder with questions.json (`edge-mllm data synth`) or a LLaVA-format JSON file.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N questions.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (with every prediction) as JSON.")
def eval_command(model: str | None, data_path: str, limit: int | None, as_json: bool) -> None:
    """VQA accuracy per question type and POPE metrics per negative-sampling setting, for MODEL or for
    an exported bundle in its own runtime."""
    from edge_mllm import runtime
    from edge_mllm.eval.runner import evaluate, load_eval_set, pipeline_answer

    questions = load_eval_set(data_path, limit)
    report = evaluate(pipeline_answer(runtime.load(model)), questions)
    if as_json:
        _emit_json(report)
        return
    click.echo(format_report(report))


def format_report(report: dict) -> str:
    """The evaluation report as a small text table."""
    lines = []
    if report["vqa"]:
        vqa = report["vqa"]
        lines.append(f"VQA accuracy {vqa['accuracy'] * 100:.1f}% ({vqa['count']} questions)")
        lines += [f"  {t:<10} {r['accuracy'] * 100:5.1f}%  ({r['count']})" for t, r in vqa["by_type"].items()]
    if report["pope"]:
        lines.append("POPE        acc    prec   recall F1     yes-ratio")
        lines += [f"  {s:<10}{m['accuracy']:.3f}  {m['precision']:.3f}  {m['recall']:.3f}  {m['f1']:.3f}  "
                  f"{m['yes_ratio']:.3f}" for s, m in report["pope"].items()]
    if report.get("captions"):
        c = report["captions"]
        lines.append(f"Descriptions: {c['exact'] * 100:.1f}% exact, word F1 {c['token_f1']:.3f} ({c['count']} images)")
    return "\n".join(lines)


def _sim_param(lookup):
    """A click callback resolving a device/backend name; an unknown one is a usage error listing the names."""

    def callback(_ctx, param, value):
        from edge_mllm.errors import ConfigError

        if value is None:
            return None
        try:
            return lookup(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param=param) from exc

    return callback


def _get_device(name: str):
    from edge_mllm.sim.profiles import get_device

    return get_device(name)


def _get_backend(name: str):
    from edge_mllm.sim.backends import get_backend

    return get_backend(name)


@cli.command("simulate")
@click.argument("bundle", required=False, type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--config", "config_path", type=click.Path(exists=True, path_type=str),
              help="A Hugging Face or edge-mllm config.json (or its folder) instead of a bundle.")
@click.option("--quant", help="With --config: our scheme (e.g. awq-w4-g32), the backend's own type "
                              "(llama.cpp: q4_0, q4_k_m, q8_0, f16…; executorch: 8da4w[-gN]; onnx: ort-int4[-gN]) "
                              "or 'none' for floats. Default: a quantized edge-mllm model's own scheme.")
@click.option("--device", required=True, callback=_sim_param(_get_device),
              help="Device profile (`edge-mllm devices` lists them; 'host' measures this machine).")
@click.option("--backend", callback=_sim_param(_get_backend),
              help="Runtime (default: the bundle's format's, llama.cpp for --config).")
@click.option("--threads", type=click.IntRange(min=1), help="Decode threads (default: the device's big cores).")
@click.option("--batch-threads", type=click.IntRange(min=1), help="Prefill / vision threads (default: --threads).")
@click.option("--prompt-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Text tokens in the prompt (image tokens are added per image).")
@click.option("--images", type=click.IntRange(min=0), help="Images in the prompt (default: 1 if the model sees).")
@click.option("--context", type=click.IntRange(min=2), help="KV-cache positions (default: the model's context).")
@click.option("--emulate", is_flag=True, help="Also run BUNDLE here with the device's big-core thread count (capped "
                                              "at this host's cores); exit 1 if its peak RSS exceeds the app budget.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def simulate_command(bundle, config_path, quant, device, backend, threads, batch_threads, prompt_tokens, images,
                     context, emulate, as_json) -> None:
    """Predict vision-encode time, prefill / decode speed, TTFT and peak memory of BUNDLE (or of
    --config quantized by --quant) on a device, from its profile and a roofline model."""
    from edge_mllm.errors import ConfigError
    from edge_mllm.sim.backends import BACKENDS
    from edge_mllm.sim.formats import weight_plan
    from edge_mllm.sim.inputs import BackendMismatch, from_bundle
    from edge_mllm.sim.predict import Scenario, simulate
    from edge_mllm.sim.shapes import load_config

    if (bundle is None) == (config_path is None):
        raise click.UsageError("give a BUNDLE folder or --config CONFIG_JSON (not both)")
    if emulate and bundle is None:
        raise click.UsageError("--emulate runs a BUNDLE; --config has nothing to run")
    if bundle is not None:
        if quant is not None:
            raise click.UsageError("--quant goes with --config; a bundle's quantization is in its manifest")
        try:
            shape, plan, runtime = from_bundle(bundle, backend.name if backend else None)
        except BackendMismatch as exc:
            raise click.BadParameter(str(exc), param_hint="'--backend'") from exc
    else:
        runtime = backend or BACKENDS["llama.cpp"]
        shape, own_scheme = load_config(config_path)
        quant = quant or own_scheme
        if quant is None:
            raise click.UsageError("--config needs --quant (a scheme, a format type, or 'none')")
        try:
            plan = weight_plan(None if quant.lower() == "none" else quant, runtime.family, shape.tied_embeddings)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="'--quant'") from exc
    if images and shape.vision is None:
        raise click.BadParameter(f"{shape.name} has no vision encoder: it takes no images", param_hint="'--images'")
    scenario = Scenario(prompt_tokens=prompt_tokens, images=1 if images is None else images, threads=threads,
                        batch_threads=batch_threads, context=context)
    try:
        result = simulate(shape, plan, device, runtime, scenario)
    except ConfigError as exc:  # options that do not go together: threads, context, backend on device
        raise click.UsageError(str(exc)) from exc
    emulation = None
    if emulate:
        from edge_mllm.sim.emulate import emulate as run_emulation

        emulation = run_emulation(bundle, device, threads)
    if as_json:
        _emit_json(result.to_dict() | ({"emulation": emulation.to_dict()} if emulation else {}))
    else:
        click.echo(format_prediction(result))
    if emulation is not None:
        from edge_mllm.errors import EdgeMLLMError
        from edge_mllm.sim.emulate import format_emulation

        if not as_json:
            click.echo(format_emulation(emulation))
        if not emulation.fits:
            raise EdgeMLLMError(f"{bundle} needs {emulation.bundle_rss_mib:.0f} MiB resident (peak RSS above the "
                                f"interpreter's), over {device.key}'s {emulation.budget_mib:.0f} MiB app budget")


def format_prediction(p) -> str:
    """A prediction as a few aligned lines."""
    threads = f", {p.threads} threads" + (f" (prefill {p.batch_threads})" if p.batch_threads != p.threads else "") \
        if p.threads else ""
    m = p.memory
    runtime = p.backend if p.decoder_backend == p.backend else f"{p.backend} (decoder on {p.decoder_backend})"
    lines = [f"{p.model} ({p.quantization}) on {p.device} with {runtime}{threads}"]
    if p.vision_encode_s is not None:
        took = f"{p.vision_encode_s:.2f} s" if p.vision_encode_s >= 1 else f"{p.vision_encode_s * 1e3:.1f} ms"
        lines.append(f"  vision encode  {took} per image ({p.image_tokens} image tokens)")
    image = f" + {p.prefill_tokens - p.prompt_tokens} image" if p.images else ""
    lines += [
        f"  prefill        {p.prefill_tok_s:.1f} tok/s over {p.prefill_tokens} tokens ({p.prompt_tokens} text{image})",
        f"  TTFT           {p.ttft_s:.2f} s",
        f"  decode         {p.decode_tok_s:.1f} tok/s ({p.decode_bound}-bound; "
        f"{p.attainable_bandwidth_gbs:.1f} GB/s attainable)",
        f"  peak memory    {m.peak_mib:.0f} MiB = weights {m.weights_mib:.0f} + KV cache {m.kv_cache_mib:.0f} "
        f"({p.context} positions) + activations {m.activations_mib:.0f} + runtime {m.overhead_mib:.0f}",
        f"  app budget     {m.budget_mib:.0f} MiB: {'fits' if m.fits else 'does NOT fit'}",
    ]
    lines += [f"note: {note}" for note in p.notes]
    return "\n".join(lines)


@cli.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Every profile with the source of each number.")
def devices_command(as_json: bool) -> None:
    """List the device profiles `simulate` knows (host is measured now)."""
    from edge_mllm.sim.profiles import device_names, get_device, load_data

    profiles = [get_device(name) for name in device_names()]
    if as_json:
        _emit_json({"devices": {p.key: p.data for p in profiles}, "sources": load_data()["sources"]})
        return
    for p in profiles:
        cpu = " + ".join(f"{c.count}x {c.core}" + (f" {c.ghz:g} GHz" if c.ghz else "") for c in p.clusters)
        isa = ",".join(k for k in ("dotprod", "i8mm", "sve") if getattr(p.isa, k)) or "-"
        npu = p.npu.name + (f" {p.npu.peaks_tops['int8']:g} TOPS" if "int8" in p.npu.peaks_tops else "") \
            if p.npu else "-"
        click.echo(f"{p.key:<20} {p.name}")
        click.echo(f"{'':<20} CPU {cpu}; ISA {isa}; {p.memory_type} {p.peak_gbs:.1f} GB/s; RAM {p.ram_gb:.1f} GB "
                   f"(app budget {p.app_budget_gb:.1f} GB); NPU {npu}")


@cli.command("bench")
@click.argument("bundles", nargs=-1, required=True, type=str)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for every runtime (default: all cores).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per bundle (after a warm-up); medians are reported.")
@click.option("--tokens", default=32, show_default=True, type=click.IntRange(min=2), help="Decoded tokens per run.")
@click.option("--eval", "eval_data", type=click.Path(exists=True, path_type=str),
              help="Also score accuracy on this eval set (`edge-mllm data synth` folder or LLaVA JSON).")
@click.option("--eval-limit", type=click.IntRange(min=1), help="Only the first N eval questions.")
@click.option("--no-rss", is_flag=True, help="Skip the peak-RSS runs (one fresh process per bundle).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=str),
              help="Also write the markdown table to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=str), help="Also write a PNG plot.")
def bench_command(bundles, threads, repeats, tokens, eval_data, eval_limit, no_rss, as_json, markdown_path,
                  plot_path) -> None:
    """Benchmark BUNDLES (exported bundles, model folders, or 'default') side by side on this host:
    vision encode, TTFT, prefill / decode speed, peak RSS, size, accuracy, and ratios to llama.cpp
    and to the host's memory-bandwidth roofline."""
    from edge_mllm.bench import BenchSettings, run_bench
    from edge_mllm.bench.report import markdown_table, plot
    from edge_mllm.bench.suite import host_cores

    if threads and threads > host_cores():  # allowed: oversubscription can be what is being measured
        click.echo(f"warning: --threads {threads} is more than this host's {host_cores()} cores: the runtimes' "
                   "threads will share them, and the timings measure that contention", err=True)
    for path in (markdown_path, plot_path):  # checked before the runs, not after them
        if path and not Path(path).resolve().parent.is_dir():
            raise click.UsageError(f"{path}: its folder does not exist")
    if eval_limit and not eval_data:
        raise click.UsageError("--eval-limit limits --eval's questions: give --eval DATA too")
    settings = BenchSettings(list(bundles), threads=threads, repeats=repeats, tokens=tokens, eval_data=eval_data,
                             eval_limit=eval_limit, rss=not no_rss,
                             progress=None if as_json else (lambda msg: click.echo(msg, err=True)))
    report = run_bench(settings)
    table = markdown_table(report)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(table + "\n")
    if plot_path:
        plot(report, plot_path)
    if as_json:
        _emit_json(report)
    else:
        click.echo(table)


def _terminated(signum: int, _frame) -> None:
    # SIGTERM (timeout, CI cancellation, kill, container stop) unwinds like Ctrl-C, so atomic
    # outputs remove their temporary folders
    raise SystemExit(128 + signum)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps errors to exit codes and one-line messages."""
    from edge_mllm.errors import EdgeMLLMError, OptionError

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="edge-mllm", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:  # one line, as every other error, with where to look
        where = exc.ctx.command_path if exc.ctx is not None else "edge-mllm"
        click.echo(f"error: {_one_line(exc.format_message())} (see '{where} --help')", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except Exception as exc:
        if debug:
            traceback.print_exc()
        kind = "" if isinstance(exc, EdgeMLLMError) else f"{type(exc).__name__}: "
        click.echo(f"error: {kind}{_one_line(str(exc)) or type(exc).__name__}", err=True)
        return 2 if isinstance(exc, OptionError) else 1


if __name__ == "__main__":
    sys.exit(main())
