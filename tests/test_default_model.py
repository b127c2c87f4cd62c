"""The embedded default model's shipped weights (vision tower, projector): small package data, the
LLM left exactly as SmolLM2 ships, and what the recipe's training demonstrably changed. The recipe
does not reach the issue's accuracy targets yet (TRAINING.md); these tests pin what it does achieve,
against the untrained start."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from edge_mllm.quant.groupwise import quantize_rtn
from safetensors.torch import save_file

from edge_mllm.checkpoint.weights import read_metadata, read_weights_file
from edge_mllm.data.llava import load_conversations
from edge_mllm.data.synth import COLORS, write_split
from edge_mllm.default import (
    TRAINED_WEIGHTS,
    TRAINED_WEIGHTS_FILE,
    apply_trained,
    load_default,
    trained_projector,
    untrained_default,
)
from edge_mllm.errors import OptionError
from edge_mllm.eval.metrics import normalize_answer
from edge_mllm.eval.runner import evaluate, load_eval_set, pipeline_answer
from edge_mllm.model.connectors import LDPProjector, LDPv2Projector
from edge_mllm.pipeline import Pipeline
from edge_mllm.train.recipe import RecipeConfig, run_recipe
from edge_mllm.train.text_replay import TEXT_FILE, held_out_prompts


def test_trained_weights_are_small_package_data():
    assert TRAINED_WEIGHTS.is_file()
    assert TRAINED_WEIGHTS.stat().st_size < 20 * 2**20


def test_default_language_model_is_smollm2_on_its_own_4bit_grid():
    # Stage 2 trains LoRA through the rtn-w4-g32-min grid of the Q4_1 SmolLM2 ships as, so every decoder
    # matrix of the shipped model lies on that grid (4-bit exports with that scheme keep it exactly),
    # and the LoRA updates moved a good part of them across grid points.
    assert read_metadata(TRAINED_WEIGHTS)["qat"] == "rtn-w4-g32-min"
    shipped = load_default(progress=False).model
    start = untrained_default(progress=False, projector=trained_projector(TRAINED_WEIGHTS)).model
    assert not any("lora" in name for name in shipped.state_dict())  # merged on load
    shipped_llm, start_llm = shipped.language_model.state_dict(), start.language_model.state_dict()
    moved = 0
    for name, weight in shipped_llm.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert torch.equal(quantize_rtn(weight, 4, 32, float_min=True).dequantize(), weight), name
            moved += not torch.equal(weight, start_llm[name])
        else:  # LoRA touches only the blocks' linears: embedding and norms are SmolLM2's
            assert torch.equal(weight, start_llm[name]), name
    assert moved > 100, moved  # of 210 (30 blocks x 7 matrices)
    key = "model.mlp.1.weight"  # LDP's first linear
    assert not torch.equal(shipped.mm_projector.state_dict()[key], start.mm_projector.state_dict()[key])


@pytest.mark.slow
def test_trained_default_answers_closed_set_and_beats_its_untrained_start(tmp_path):
    # Seed 1 of the test split: scenes the recipe never trained or evaluated on.
    questions = load_eval_set(write_split(tmp_path / "test", "test", 1, 30))
    questions = [q for q in questions if q.meta["question_type"] == "color"]
    trained = evaluate(pipeline_answer(Pipeline(load_default(progress=False))), questions, progress=False)
    untrained = evaluate(pipeline_answer(Pipeline(untrained_default(progress=False))), questions, progress=False)
    in_vocabulary = [normalize_answer(p["prediction"]) in COLORS for p in trained["predictions"]]
    assert sum(in_vocabulary) >= 0.9 * len(in_vocabulary), trained["predictions"]
    assert trained["vqa"]["accuracy"] >= untrained["vqa"]["accuracy"] + 0.15, (trained["vqa"], untrained["vqa"])


@pytest.mark.slow
def test_quick_recipe_runs_every_step_and_ships_a_file_that_loads_onto_its_grid(tmp_path):
    # The recipe end to end on SmolLM2 (minutes-long sizes): every step timed, the weights file
    # carries LoRA factors and names their grid, and loading it puts the decoder on that grid.
    summary = run_recipe(tmp_path, RecipeConfig.quick(), progress=False)
    assert set(summary["seconds"]) == {"data", "vision_pretrain", "ground_projector", "text_replay", "instruct",
                                      "eval", "eval_captions"}
    assert summary["wall_seconds"] > summary["total_seconds"]  # the untimed diagnostics count too
    # The teacher's answers to the replayed prompts are training data (those cut off left out); the
    # held-out text prompts were answered before and after, by SmolLM2 and by the shipped file.
    replayed = load_conversations(tmp_path / "data" / "train" / TEXT_FILE)
    assert all(c.image is None and c.messages[1]["content"] for c in replayed)
    agreement = summary["diagnostics"]["text_agreement"]
    assert agreement["prompts"] == len(held_out_prompts()) and 0 <= agreement["unchanged"] <= 1
    assert len(agreement["changed"]) == round((1 - agreement["unchanged"]) * agreement["prompts"])
    assert summary["ground"] is None  # the tower's own grounding is off by default
    assert {"background", "color", "shape", "row", "col", "size"} <= set(summary["ground_projector"])
    diagnostics = summary["diagnostics"]
    assert set(diagnostics["read_out"]) == {"ground", "instruct"}
    assert set(diagnostics["read_out"]["instruct"]) == {"background", "color", "shape", "row", "col", "size"}
    # stage 2 trains LoRA only: the tokens read exactly as grounding left them
    assert diagnostics["read_out"]["instruct"] == diagnostics["read_out"]["ground"]
    for when in ("before_instruct", "after_instruct"):
        reliance = diagnostics["image_reliance"][when]
        assert reliance["loss"] > 0 and reliance["loss_swapped_images"] > 0
    # Stage 2 trained LoRA, so the held-out loss moved (a recipe that skipped it would not)
    assert diagnostics["image_reliance"]["after_instruct"] != diagnostics["image_reliance"]["before_instruct"]
    weights = tmp_path / TRAINED_WEIGHTS_FILE
    assert read_metadata(weights)["qat"] == "rtn-w4-g32-min"
    assert any(key.endswith(".lora_A") for key in read_weights_file(weights))
    model = apply_trained(untrained_default(progress=False, projector=trained_projector(weights)), weights).model
    up = model.language_model.model.layers[3].mlp.up_proj.weight
    assert torch.equal(quantize_rtn(up, 4, 32, float_min=True).dequantize(), up)
    assert "rtn-w4-g32-min" in model.config.notes["vision_tower"]
    assert model.config.weight_grid == "rtn-w4-g32-min"  # what exports default to
    assert json.loads((tmp_path / "training.json").read_text())["test"]["vqa"]["count"] > 0
    # the shipped file describes test scenes (stage 2 learnt their captions too), scored and listed
    captions = json.loads((tmp_path / "eval.json").read_text())["captions"]
    assert captions["count"] == 2 == len(captions["predictions"]) and 0 <= captions["token_f1"] <= 1
    assert summary["test"]["captions"] == {k: v for k, v in captions.items() if k != "predictions"}


@pytest.mark.slow
def test_recipe_with_alignment_and_a_trained_connector(tmp_path):
    # The other road (runs 1-3): stage 1 aligns the projector, stage 2 trains tower and projector too,
    # on multi-turn conversations; the read-out records how far they move the grounded tokens.
    config = dataclasses.replace(RecipeConfig.quick(), ground_steps=2, align_epochs=0.5, instruct_train_vision=True,
                                 instruct_train_projector=True, instruct_single_turn=False, instruct_epochs=1.0,
                                 test_scenes=2, text_prompts=0)
    summary = run_recipe(tmp_path, config, progress=False)
    assert "text_agreement" not in summary["diagnostics"] and "text_replay" not in summary["seconds"]
    assert summary["seconds"]["align"] > 0 and summary["align"]["steps"] == 1
    assert summary["seconds"]["ground"] > 0 and summary["ground"]["loss"] > 0  # tower and projector grounded
    steps = list(summary["seconds"])  # the projector alone first: a fresh one is not worth the tower's steps
    assert steps.index("ground_projector") < steps.index("ground")
    read_out = summary["diagnostics"]["read_out"]
    assert set(read_out) == {"ground", "align", "instruct"}
    assert summary["instruct"]["steps"] == 4  # 16 multi-turn conversations, batch 4


@pytest.mark.slow
def test_scaled_recipe_multiplies_its_data_and_tower_steps():
    base = RecipeConfig(ground_steps=600)
    scaled = base.scaled(4)
    assert (scaled.train_scenes, scaled.vision_steps, scaled.ground_steps) == (2400, 1200, 2400)
    assert (scaled.projector_ground_steps, scaled.projector_ground_scenes) == (12000, 12000)
    assert dataclasses.replace(scaled, train_scenes=600, vision_steps=300, ground_steps=600,
                               projector_ground_steps=3000, projector_ground_scenes=3000) == base
    assert base.scaled(1) == base
    with pytest.raises(OptionError, match="positive integer"):
        base.scaled(0)


def test_recipe_can_start_from_an_earlier_files_eyes(tmp_path):
    # vision_from (train-default --vision-from): a trained file's tower and projector are used as they
    # are, vision pretraining and grounding are skipped, and stage 2 (here activation-aware) trains LoRA.
    config = dataclasses.replace(RecipeConfig.quick(), vision_from=str(TRAINED_WEIGHTS), projector="ldp",
                                 qat_activations=True, text_prompts=0, test_scenes=2)
    summary = run_recipe(tmp_path, config, progress=False)
    assert set(summary["seconds"]) == {"data", "instruct", "eval", "eval_captions"}
    assert summary["vision_pretrain"] is None and summary["recipe"]["qat_activations"] is True
    source, written = read_weights_file(TRAINED_WEIGHTS), read_weights_file(tmp_path / TRAINED_WEIGHTS_FILE)
    eyes = [k for k in source if k.startswith(("vision_tower.", "mm_projector."))]
    assert eyes and all(torch.equal(written[k], source[k]) for k in eyes)
    assert any(k.endswith(".lora_A") for k in written)


def test_recipe_can_go_on_training_an_earlier_file(tmp_path):
    # continue_from (train-default --continue-from): the file's eyes as vision_from takes them, and stage 2
    # starts from its LoRA (a few steps leave it close to the file's; a fresh LoRA's would point
    # elsewhere), on the training scenes from first_scene on.
    config = dataclasses.replace(RecipeConfig.quick(), continue_from=str(TRAINED_WEIGHTS), first_scene=1800,
                                 text_prompts=0, test_scenes=2)
    summary = run_recipe(tmp_path, config, progress=False)
    assert set(summary["seconds"]) == {"data", "instruct", "eval", "eval_captions"}
    images = sorted(p.name for p in (tmp_path / "data" / "train" / "images").iterdir())
    assert images[0] == "train-0-001800.png" and len(images) == config.train_scenes
    source, written = read_weights_file(TRAINED_WEIGHTS), read_weights_file(tmp_path / TRAINED_WEIGHTS_FILE)
    eyes = [k for k in source if k.startswith(("vision_tower.", "mm_projector."))]
    assert eyes and all(torch.equal(written[k], source[k]) for k in eyes)

    def update(state: dict[str, torch.Tensor], linear: str) -> torch.Tensor:
        return (state[f"{linear}.lora_B"].float() @ state[f"{linear}.lora_A"].float()).flatten()

    for linear in ("language_model.model.layers.3.mlp.up_proj", "language_model.model.layers.20.self_attn.q_proj"):
        assert not torch.equal(update(written, linear), update(source, linear))  # trained on ...
        assert torch.cosine_similarity(update(written, linear), update(source, linear), dim=0) > 0.9  # ... from it


def test_recipe_refuses_to_go_on_from_a_file_it_cannot_continue(tmp_path):
    eyes_only = tmp_path / "eyes.safetensors"
    save_file({"vision_tower.x": torch.zeros(1)}, str(eyes_only), metadata={"format": "pt", "projector": "ldp"})
    with pytest.raises(OptionError, match="no LoRA"):
        run_recipe(tmp_path / "refused", dataclasses.replace(RecipeConfig.quick(), continue_from=str(eyes_only)),
                   progress=False)
    with pytest.raises(OptionError, match="ldp projector"):  # its projector goes on as it is
        run_recipe(tmp_path / "refused", dataclasses.replace(RecipeConfig.quick(), continue_from=str(TRAINED_WEIGHTS),
                                                             projector="ldpv2"), progress=False)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(OptionError, match="not both"):
        RecipeConfig(vision_from=str(TRAINED_WEIGHTS), continue_from=str(TRAINED_WEIGHTS))
    with pytest.raises(OptionError, match="negative"):
        RecipeConfig(first_scene=-1)


def test_recipe_grounds_a_new_projector_on_an_earlier_files_tower(tmp_path, monkeypatch):
    # The file names its projector (files before that key are LDPv2); a recipe asked for another type
    # than an earlier file's keeps the tower and grounds a fresh projector on its features, and only then.
    assert trained_projector(TRAINED_WEIGHTS) == "ldp"
    save_file({"vision_tower.x": torch.zeros(1)}, str(tmp_path / "old.safetensors"), metadata={"format": "pt"})
    assert trained_projector(tmp_path / "old.safetensors") == "ldpv2"
    base = dataclasses.replace(RecipeConfig.quick(), vision_from=str(TRAINED_WEIGHTS), projector="ldpv2",
                               projector_ground_steps=0,
                               text_prompts=0, test_scenes=2)
    with pytest.raises(OptionError, match="ldp projector"):
        run_recipe(tmp_path / "refused", base, progress=False)
    assert not (tmp_path / "refused").exists()
    fresh = untrained_default(progress=False).model.mm_projector  # where the recipe starts: the shipped type
    assert isinstance(fresh, LDPProjector)
    norms = [m for m in fresh.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)  # seeded init: scale 1
    summary = run_recipe(tmp_path / "run", dataclasses.replace(base, projector_ground_steps=3), progress=False)
    assert set(summary["seconds"]) == {"data", "ground_projector", "instruct", "eval", "eval_captions"}
    assert summary["ground_projector"]["loss"] > 0
    weights = tmp_path / "run" / TRAINED_WEIGHTS_FILE
    assert trained_projector(weights) == "ldpv2"
    source, written = read_weights_file(TRAINED_WEIGHTS), read_weights_file(weights)
    tower = [k for k in source if k.startswith("vision_tower.")]
    assert tower and all(torch.equal(written[k], source[k]) for k in tower)
    assert "mm_projector.peg.peg.0.weight" in written and "mm_projector.model.mlp.1.weight" not in written
    monkeypatch.setattr("edge_mllm.default.TRAINED_WEIGHTS", weights)
    model = load_default(progress=False).model
    assert isinstance(model.mm_projector, LDPv2Projector) and model.num_image_tokens == 144
    assert "ldpv2 projector" in model.config.notes["vision_tower"]
