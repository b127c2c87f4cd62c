"""The ``edge-mllm`` command line.

Exit codes: 0 ok, 1 runtime error, 2 usage error. Errors print as one line; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from edge_mllm import __version__

# Library chatter (transformers' advisory warnings) would break --json output and one-line errors.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MODEL_ARG = click.argument("model", required=False, type=click.Path(path_type=str))


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


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
    """Architecture and parameter count per component."""
    from edge_mllm.pipeline import Pipeline

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
    """Answer a prompt (optionally about images)."""
    from edge_mllm.pipeline import Pipeline
    from edge_mllm.preprocess import load_image

    loaded_images = [load_image(path) for path in images]  # fail on a bad image before loading the model
    pipeline = Pipeline.load(model)
    stream = None if as_json else (lambda delta: click.echo(delta, nl=False))
    result = pipeline.generate(
        prompt, loaded_images, raw=raw, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, stream=stream,
    )
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
    click.echo(
        f"[{result.prompt_tokens} prompt tokens, {len(result.token_ids)} generated; "
        f"TTFT {t['time_to_first_token_s'] * 1000:.0f} ms, decode {t['decode_tokens_per_s']:.1f} tok/s]",
        err=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps errors to exit codes and one-line messages."""
    from edge_mllm.errors import EdgeMLLMError

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="edge-mllm", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # usage errors
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except Exception as exc:
        if debug:
            traceback.print_exc()
        kind = "" if isinstance(exc, EdgeMLLMError) else f"{type(exc).__name__}: "
        message = " ".join(str(exc).split()) or type(exc).__name__
        click.echo(f"error: {kind}{message}", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
