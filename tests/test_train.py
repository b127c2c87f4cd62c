"""Training: loss masks on real batches, LoRA, a training step that learns, checkpoint resume, and
vision-tower attribute pretraining. All on tiny checkpoints in the real MobileVLM layout."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from edge_mllm.quant.groupwise import quantize_rtn
from edge_mllm.quant.quantize import quantize_model
from edge_mllm.quant.scheme import QuantScheme, TensorPlan
from safetensors.torch import save_file

from edge_mllm.chat import ChatTemplate
from edge_mllm.checkpoint import load_model
from edge_mllm.data.llava import Conversation, load_conversations, single_turns
from edge_mllm.data.synth import (
    CAPTIONS_FILE,
    COLS,
    CONVERSATIONS_FILE,
    QUESTIONS_FILE,
    ROWS,
    render,
    sample_scene,
    scene_rng,
    write_split,
)
from edge_mllm.default import apply_trained
from edge_mllm.errors import EdgeMLLMError, OptionError
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX
from edge_mllm.preprocess import ImageProcessor
from edge_mllm.tokenizer import Tokenizer
from edge_mllm.train.examples import IGNORE_INDEX, Example, embed_batch, pack_shared_prefix, tokenize_conversation
from edge_mllm.train.grounding import (
    VOCABULARY,
    ground_image_tokens,
    ground_projector,
    read_out,
    token_words,
    word_accuracy,
)
from edge_mllm.train.lora import (
    LoRALinear,
    add_lora_factors,
    apply_lora,
    load_lora_factors,
    lora_factors,
    merge_lora,
    per_token_int8,
    snap,
)
from edge_mllm.train.precision import autocast, resolve_precision
from edge_mllm.train.recipe import RecipeConfig, trained_tensors
from edge_mllm.train.trainer import TrainConfig, Trainer, epoch_batches
from edge_mllm.train.vision_pretrain import disc_pool, final_metrics, object_discs, pretrain_vision


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("synth") / "train", "train", 0, 6)


@pytest.fixture
def tiny(mobilevlm_v2):
    return load_model(mobilevlm_v2.path)


def conversation(*turns: str, image=None) -> Conversation:
    roles = ("user", "assistant")
    return Conversation("c", [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)], image)


def targets(example, tokenizer: Tokenizer) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=False)


def assert_steps_lower_the_loss(trainer: Trainer, batch: list, steps: int = 5) -> None:
    with torch.no_grad():
        before = float(trainer.batch_loss(batch)[0])
    for _ in range(steps):
        loss = trainer.batch_loss(batch)[0]
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
    with torch.no_grad():
        after = float(trainer.batch_loss(batch)[0])
    assert after < before * 0.9, (before, after)


def test_vicuna_mask_covers_only_the_answers(tokenizer):
    tok = Tokenizer(tokenizer)
    conv = conversation("<image>\nWhat is in the picture?", "a dog", "Describe the scene.", "a blue sky")
    example = tokenize_conversation(conv, tok, ChatTemplate("vicuna_v1"))
    assert example.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert len(example.labels) == len(example.input_ids)
    assert targets(example, tok).replace(" ", "") == "adog</s>ablue sky</s>".replace(" ", "")
    # Piecewise tokenization equals tokenizing the whole rendered text.
    text = ChatTemplate("vicuna_v1").render(conv.messages, tok, add_generation_prompt=False)
    assert example.input_ids == tok.encode_with_images(text)


def test_chatml_mask_covers_answers_and_end_of_turn(chatml_tokenizer):
    tok = Tokenizer(chatml_tokenizer)
    conv = conversation("<image>\nDescribe the image.", "a cat sitting on a red mat.")
    example = tokenize_conversation(conv, tok, ChatTemplate("tokenizer"))
    assert targets(example, tok) == "a cat sitting on a red mat.<|im_end|>\n"
    text = ChatTemplate("tokenizer").render(conv.messages, tok, add_generation_prompt=False)
    assert example.input_ids == tok.encode_with_images(text)
    # The prompt part (user turn, image placeholder, assistant header) carries no loss.
    first_target = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    prompt = [t for t in example.input_ids[:first_target] if t != IMAGE_TOKEN_INDEX]
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_caption_batch_labels_line_up_after_image_expansion(tiny, synth_data):
    conv = load_conversations(synth_data / CAPTIONS_FILE)[0]
    example = tokenize_conversation(conv, tiny.tokenizer, ChatTemplate(tiny.chat_template))
    n_img = tiny.model.num_image_tokens
    embeds = torch.zeros(n_img, tiny.model.config.text.hidden_size)
    batch = embed_batch(tiny.model, [example, example], [embeds, embeds], max_len=4096)
    inputs, labels = batch.inputs, batch.labels
    assert batch.attn_mask is None  # one causal sequence per row: SDPA's causal kernel
    assert inputs.shape[:2] == labels.shape and labels.shape[1] == len(example.input_ids) - 1 + n_img
    image_at = example.input_ids.index(IMAGE_TOKEN_INDEX)
    assert (labels[:, image_at : image_at + n_img] == IGNORE_INDEX).all()
    caption_ids = [t for t in labels[0].tolist() if t != IGNORE_INDEX]
    answer = conv.messages[1]["content"]
    assert tiny.tokenizer.decode(caption_ids).strip() == answer


def test_questions_packed_after_their_image_prompt_learn_exactly_as_one_by_one(tiny, synth_data):
    """pack_shared_prefix's rows give the loss and gradients of the single questions they hold."""
    config = TrainConfig(stage="instruct", lora_rank=4, train_vision=True, seed=0)
    trainer = Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template), config)
    conversations = load_conversations(synth_data / CONVERSATIONS_FILE)[:2]
    singles = [tokenize_conversation(c, tiny.tokenizer, trainer.template) for c in single_turns(conversations)]
    trainer.config = dataclasses.replace(config, single_turns=True)
    packed = trainer.examples(conversations)
    # The tiny model's 256 positions hold two or three questions per row.
    assert sum(max(1, len(row.branches)) for row in packed) == len(singles) and len(packed) < len(singles)
    assert all(trainer.model.prompt_length(row.input_ids) <= trainer.max_len for row in packed)
    assert sum(map(len, (r.input_ids for r in packed))) < sum(map(len, (e.input_ids for e in singles)))
    # The LoRA factors start at zero (B = 0): move them so their gradients are not trivially equal.
    with torch.no_grad():
        for name, p in tiny.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)

    def loss_and_grads(batch):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, count = trainer.batch_loss(batch)
        loss.backward()
        return loss.item(), count, [p.grad.clone() for p in trainer.params]

    loss_one, count_one, grads_one = loss_and_grads(singles)
    loss_packed, count_packed, grads_packed = loss_and_grads(packed)
    assert count_packed == count_one
    assert loss_packed == pytest.approx(loss_one, rel=1e-5)
    for g_one, g_packed in zip(grads_one, grads_packed, strict=True):
        torch.testing.assert_close(g_packed, g_one, rtol=1e-4, atol=1e-6)
    # Rows too short to hold two questions: each question stays an ordinary example.
    unshared = pack_shared_prefix(singles[:3], tiny.model, max_len=tiny.model.prompt_length(singles[0].input_ids))
    assert [(e.input_ids, e.labels, e.branches) for e in unshared] == [(e.input_ids, e.labels, ()) for e in singles[:3]]


def test_packing_refuses_examples_about_different_images(tiny, synth_data):
    conversations = load_conversations(synth_data / CONVERSATIONS_FILE)[:2]
    template = ChatTemplate(tiny.chat_template)
    examples = [tokenize_conversation(single_turns([c])[0], tiny.tokenizer, template) for c in conversations]
    with pytest.raises(EdgeMLLMError, match="one image"):
        pack_shared_prefix(examples, tiny.model, max_len=4096)


def test_conversation_without_answer_tokens_is_refused(tokenizer):
    with pytest.raises(EdgeMLLMError, match="no assistant tokens"):
        tokenize_conversation(conversation("hi"), Tokenizer(tokenizer), ChatTemplate("vicuna_v1"))


def test_lora_starts_as_the_base_and_merges_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16))
    net[0].q_proj = torch.nn.Linear(16, 8)
    plain = copy.deepcopy(net)
    x = torch.randn(3, 16)
    assert apply_lora(net, rank=4, alpha=8, targets=("q_proj",)) == 1
    assert isinstance(net[0].q_proj, LoRALinear)
    torch.testing.assert_close(net[0].q_proj(x), plain[0].q_proj(x))
    torch.nn.init.normal_(net[0].q_proj.lora_B)
    expected = net[0].q_proj(x)
    assert not torch.allclose(expected, plain[0].q_proj(x))
    factors = lora_factors(net)
    add_lora_factors(plain, factors)  # the stored low-rank form applied to a fresh copy ...
    merge_lora(net)  # ... equals merging in place
    assert isinstance(net[0].q_proj, torch.nn.Linear)
    torch.testing.assert_close(net[0].q_proj(x), expected)
    torch.testing.assert_close(plain[0].q_proj(x), expected)


def test_quantization_aware_lora_trains_on_the_grid_and_merges_onto_it(tiny, synth_data):
    torch.manual_seed(0)
    scheme = "rtn-w4-g32-min"  # the grid of the Q4_1 SmolLM2 ships as
    original = copy.deepcopy(tiny.model)
    trainer = Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template),
                      TrainConfig(stage="instruct", epochs=1, batch_size=2, lr=1e-2, lora_rank=4, warmup_ratio=0,
                                  qat=scheme))
    lora = tiny.model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(lora, LoRALinear) and lora.grid is not None and lora.grid.float_min
    batch = [tokenize_conversation(c, tiny.tokenizer, trainer.template)
             for c in load_conversations(synth_data / CONVERSATIONS_FILE)[:2]]
    assert_steps_lower_the_loss(trainer, batch)
    # the forward uses the merged weight rounded to the grid
    x = torch.randn(3, lora.base.in_features)
    merged = lora.base.weight + lora.delta()
    grid = quantize_rtn(merged.detach(), 4, 32, float_min=True).dequantize()
    torch.testing.assert_close(lora(x), torch.nn.functional.linear(x, grid, lora.base.bias))

    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    lm = tiny.model.language_model
    with torch.no_grad():
        trained_logits = lm(lm.embed(ids))[0]
    merge_lora(tiny.model)
    with torch.no_grad():
        torch.testing.assert_close(lm(lm.embed(ids))[0], trained_logits)  # merged onto the grid: same model
    weights = {n: p.detach().clone() for n, p in tiny.model.named_parameters()
               if n.startswith("language_model.model.layers.") and n.endswith("proj.weight")}
    quantize_model(tiny.model, QuantScheme.parse(scheme), progress=False)  # what an export with the scheme does
    params = dict(tiny.model.named_parameters())
    bad = {n: float((params[n] - w).abs().max()) for n, w in weights.items() if not torch.equal(params[n], w)}
    assert not bad, bad  # its codes give back the trained weights
    start = dict(original.named_parameters())
    moved = [n for n, w in weights.items()
             if not torch.equal(w, quantize_rtn(start[n].detach(), 4, 32, float_min=True).dequantize())]
    assert moved  # the updates crossed grid points


def test_quantization_aware_lora_gradients_are_the_straight_through_ones():
    # The forward's low-rank branch on a detached input must give the gradients of the plain
    # straight-through form, x·(W + ΔW + stopgrad(snap(W + ΔW) − W − ΔW))ᵀ, to A, B and x alike.
    torch.manual_seed(0)
    grid = TensorPlan(4, 32, False, "rtn", float_min=True)
    lora = LoRALinear(torch.nn.Linear(64, 48), rank=4, alpha=8, grid=grid)
    torch.nn.init.normal_(lora.lora_B, std=0.05)
    x = torch.randn(5, 64, requires_grad=True)
    upstream = torch.randn(5, 48)
    (lora(x) * upstream).sum().backward()
    fast = (x.grad.clone(), lora.lora_A.grad.clone(), lora.lora_B.grad.clone())
    x.grad = lora.lora_A.grad = lora.lora_B.grad = None
    weight = lora.base.weight + lora.delta()
    weight = weight + (snap(weight, grid) - weight).detach()
    (torch.nn.functional.linear(x, weight, lora.base.bias) * upstream).sum().backward()
    for got, want in zip(fast, (x.grad, lora.lora_A.grad, lora.lora_B.grad), strict=True):
        torch.testing.assert_close(got, want)


def test_quantization_aware_lora_picks_grid_points_in_fp32_under_bf16_autocast():
    # Under mixed precision the low-rank update B·A would be a bfloat16 matmul; the grid point each
    # merged weight lands on must still be the one the fp32 merge after training picks.
    torch.manual_seed(0)
    grid = TensorPlan(4, 32, False, "rtn", float_min=True)
    lora = LoRALinear(torch.nn.Linear(512, 512), rank=8, alpha=16, grid=grid)
    torch.nn.init.normal_(lora.lora_B, std=0.05)
    x = torch.randn(3, 512)
    with torch.no_grad():
        fp32_grid = snap(lora.base.weight + lora.delta(), grid)
        with autocast("bf16", torch.device("cpu")):
            assert lora.delta().dtype == torch.bfloat16  # what the fix guards against
            got = lora(x)
            want = torch.nn.functional.linear(x, fp32_grid, lora.base.bias)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bf16_training_runs_the_steps_in_bfloat16_and_keeps_fp32_weights(tiny, synth_data):
    torch.manual_seed(0)
    trainer = Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template),
                      TrainConfig(stage="instruct", epochs=5, batch_size=2, lr=3e-3, lora_rank=4, warmup_ratio=0,
                                  precision="bf16"))
    conversations = load_conversations(synth_data / CONVERSATIONS_FILE)[:2]
    batch = trainer.examples(conversations)
    with torch.no_grad():
        before = float(trainer.batch_loss(batch)[0])
    dtypes = []
    hook = tiny.model.language_model.lm_head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    stats = trainer.train(conversations, progress=False)
    hook.remove()
    with torch.no_grad():
        after = float(trainer.batch_loss(batch)[0])
    assert stats["precision"] == "bf16" and stats["steps"] == 5
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the steps' matmuls ran in bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.params)  # weights (and so Adam's state) in fp32
    assert after < before * 0.9, (before, after)


def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    for avx512_bf16, amx, want in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto", cpu) == want
        assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(EdgeMLLMError, match="unknown precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(EdgeMLLMError, match="unknown precision"):  # before the recipe's first step
        RecipeConfig(precision="fp16")


def test_activation_aware_lora_rounds_its_inputs_as_xnnpack_does():
    # ExecuTorch's 8da4w linears quantize their input per token on XNNPACK: int8, asymmetric, the
    # range widened to include 0, 255 steps, an integer zero point. Written out here independently of
    # torchao's fake quantizer, which the training uses.
    torch.manual_seed(0)
    grid = TensorPlan(4, 32, False, "rtn", float_min=True)
    lora = LoRALinear(torch.nn.Linear(64, 48), rank=4, alpha=8, grid=grid, activations=per_token_int8())
    torch.nn.init.normal_(lora.lora_B, std=0.05)
    x = torch.randn(5, 64) * torch.linspace(0.1, 8.0, 64) + 0.5  # outlier channels, rows not centred on 0
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 255
    zero = torch.round(-128 - lo / scale)
    rounded = (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale
    weight = snap(lora.base.weight + lora.delta(), grid)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), torch.nn.functional.linear(rounded, weight, lora.base.bias))
        assert not torch.allclose(lora(x), torch.nn.functional.linear(x, weight, lora.base.bias), atol=1e-3)
    x.requires_grad_(True)
    (lora(x) ** 2).sum().backward()  # straight through the rounding, to the factors and the input
    assert lora.lora_A.grad.abs().sum() > 0 and lora.lora_B.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_activation_rounding_goes_only_where_a_grid_is(tiny):
    lm = tiny.model.language_model
    grids = {"model.layers.0.self_attn.q_proj": TensorPlan(4, 32, False, "rtn", float_min=True)}
    apply_lora(lm, rank=2, alpha=4, grid_for=grids.get, quantize_activations=True)
    wrapped = {n: m for n, m in lm.named_modules() if isinstance(m, LoRALinear)}
    assert {n for n, m in wrapped.items() if m.activations is not None} == set(grids)
    assert all(m.activations is None for m in wrapped.values() if m.grid is None)


def test_quantization_aware_factors_load_onto_the_grid_they_trained_on(mobilevlm_v2, tmp_path):
    # The default's weights file stores LoRA factors in fp16 and names the grid in its metadata;
    # loading must rebuild exactly the merged, snapped decoder that training ended with.
    torch.manual_seed(0)
    scheme = "rtn-w4-g32-min"
    tiny = load_model(mobilevlm_v2.path)
    Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template),
            TrainConfig(stage="instruct", lora_rank=4, qat=scheme))
    for module in tiny.model.modules():
        if isinstance(module, LoRALinear):  # fp16-exact factors, updates that cross grid points
            module.lora_A.data = module.lora_A.data.half().float()
            module.lora_B.data = (torch.randn_like(module.lora_B) * 0.02).half().float()
    factors = trained_tensors(tiny.model)
    with_grid, without_grid = tmp_path / "qat.safetensors", tmp_path / "plain.safetensors"
    save_file(factors, str(with_grid), metadata={"format": "pt", "qat": scheme})
    save_file(factors, str(without_grid), metadata={"format": "pt"})
    merge_lora(tiny.model)
    trained = dict(tiny.model.language_model.named_parameters())

    loaded = apply_trained(load_model(mobilevlm_v2.path), with_grid).model
    assert scheme in loaded.config.notes["vision_tower"]
    for name, param in loaded.language_model.named_parameters():
        assert torch.equal(param, trained[name]), name
    unsnapped = dict(apply_trained(load_model(mobilevlm_v2.path), without_grid).model.language_model
                     .named_parameters())
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(unsnapped[name], trained[name])


def test_stored_factors_load_back_into_lora_to_go_on_training(mobilevlm_v2):
    # train-default --continue-from: a fresh model's LoRA set to stored factors is the model that stored
    # them (rank and targets checked), so training goes on from there.
    torch.manual_seed(0)
    config = TrainConfig(stage="instruct", lora_rank=4, qat="rtn-w4-g32-min")
    source, target = load_model(mobilevlm_v2.path), load_model(mobilevlm_v2.path)
    for loaded in (source, target):
        Trainer(loaded.model, loaded.tokenizer, ChatTemplate(loaded.chat_template), config)
    for module in source.model.modules():
        if isinstance(module, LoRALinear):
            module.lora_B.data = torch.randn_like(module.lora_B) * 0.02
    factors = lora_factors(source.model.language_model)
    load_lora_factors(target.model.language_model, factors)
    embeds = torch.randn(1, 4, source.model.config.text.hidden_size)
    torch.testing.assert_close(target.model.language_model(embeds), source.model.language_model(embeds))
    plain = load_model(mobilevlm_v2.path).model.language_model  # the base: the factors do change it
    assert not torch.allclose(target.model.language_model(embeds), plain(embeds))
    lora = [p for n, p in target.model.language_model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)  # loaded into the LoRA that stage 2 trains
    other = load_model(mobilevlm_v2.path)
    Trainer(other.model, other.tokenizer, ChatTemplate(other.chat_template), dataclasses.replace(config, lora_rank=2))
    with pytest.raises(ValueError, match="rank 4, not 2"):
        load_lora_factors(other.model.language_model, factors)
    with pytest.raises(ValueError, match="other linears"):
        load_lora_factors(target.model.language_model, {k: v for k, v in factors.items() if "layers.0." not in k})


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"lora_rank": 0}, "LoRA rank"), ({"freeze_llm": True}, "LoRA rank"), ({"stage": "pretrain"}, "instruct"),
     ({"qat": "gptq-w4-g32"}, "round-to-nearest"), ({"qat": "rtn-w4-g32-sq"}, "round-to-nearest"),
     ({"qat": None, "qat_activations": True}, "give the grid too")],
)
def test_quantization_aware_training_settings_are_checked(settings, message):
    with pytest.raises(EdgeMLLMError, match=message):
        TrainConfig(**{"stage": "instruct", "qat": "rtn-w4-g32-min", **settings})


def test_pretrain_stage_trains_only_the_projector(tiny, synth_data):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    trainer = Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template),
                      TrainConfig(stage="pretrain", epochs=1, batch_size=3, lr=1e-2))
    trainer.train(load_conversations(synth_data / CAPTIONS_FILE), progress=False)
    changed = {k for k, v in tiny.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("mm_projector.") for k in changed)


def test_instruct_steps_lower_the_loss_and_train_lora_only(tiny, synth_data):
    torch.manual_seed(0)
    text_only = conversation("What is the capital of France?", "Paris.")
    conversations = load_conversations(synth_data / CONVERSATIONS_FILE)[:2] + [text_only]  # mixed, as LLaVA
    trainer = Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template),
                      TrainConfig(stage="instruct", epochs=1, batch_size=2, lr=3e-3, lora_rank=4, warmup_ratio=0))
    batch = [tokenize_conversation(c, tiny.tokenizer, trainer.template) for c in conversations]
    trained = {n for n, p in tiny.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("mm_projector.") or "lora_" in n for n in trained)
    assert_steps_lower_the_loss(trainer, batch)


def test_epoch_batches_keep_text_rows_apart_from_image_rows():
    examples = [Example([1], [1], Path(f"{i}.png") if i % 3 else None) for i in range(20)]  # 13 image, 7 text
    epochs = [epoch_batches(examples, 4, seed=1, epoch=e) for e in range(3)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(20))  # every row once an epoch
        assert len(batches) == 4 + 2  # ceil(13 / 4) image batches + ceil(7 / 4) text ones
        assert all(len({examples[i].image is None for i in b}) == 1 for b in batches)
    assert epochs[0] == epoch_batches(examples, 4, seed=1, epoch=0)  # a resumed run draws the same
    assert epochs[0] != epochs[1] and epochs[0] != epoch_batches(examples, 4, seed=2, epoch=0)


def test_frozen_llm_instruct_trains_connector_and_tower_only(tiny, synth_data):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    trainer = Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template),
                      TrainConfig(stage="instruct", epochs=1, batch_size=3, lr=1e-2, freeze_llm=True,
                                  train_vision=True))
    trainer.train(load_conversations(synth_data / CONVERSATIONS_FILE), progress=False)
    after = tiny.model.state_dict()
    assert set(after) == set(before)  # no LoRA wrappers: the LLM is the one it was
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert any(k.startswith("vision_tower.") for k in changed) and any(k.startswith("mm_projector.") for k in changed)
    assert not any(k.startswith("language_model.") for k in changed)


def test_instruct_with_frozen_connector_trains_lora_only(tiny, synth_data):
    # What keeps grounded image tokens as they are while the LLM learns to read them.
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    trainer = Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template),
                      TrainConfig(stage="instruct", epochs=1, batch_size=3, lr=1e-2, lora_rank=2,
                                  train_projector=False))
    trainer.train(load_conversations(synth_data / CONVERSATIONS_FILE), progress=False)
    after = tiny.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("language_model."))
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if "lora_B" in k)
    with pytest.raises(EdgeMLLMError, match="nothing to train"):
        Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template),
                TrainConfig(stage="pretrain", train_projector=False))


def test_image_reliance_tells_a_blind_model_from_a_seeing_one(tiny, synth_data):
    # The check that found the 2026-12-04 default blind: with swapped images a model that reads them
    # scores a different loss; one whose image tokens carry nothing (projector output constant)
    # scores exactly the same.
    # Single turns: consecutive examples share an image, and the check must still swap real images.
    conversations = single_turns(load_conversations(synth_data / CONVERSATIONS_FILE))
    trainer = Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template),
                      TrainConfig(stage="instruct", batch_size=4, freeze_llm=True))
    seeing = trainer.image_reliance(conversations)
    assert abs(seeing["loss"] - seeing["loss_swapped_images"]) > 1e-4, seeing
    with torch.no_grad():
        tiny.model.mm_projector.mlp.mlp[-1].weight.zero_()  # every image token is now the bias
    blind = trainer.image_reliance(conversations)
    assert blind["loss"] == pytest.approx(blind["loss_swapped_images"], abs=1e-6), blind
    assert blind["loss"] != pytest.approx(seeing["loss"], abs=1e-4)
    with pytest.raises(EdgeMLLMError, match="two different images"):
        trainer.image_reliance([c for c in conversations if c.image == conversations[0].image])


def test_resume_restores_optimizer_and_step(mobilevlm_v2, synth_data, tmp_path, monkeypatch):
    conversations = load_conversations(synth_data / CONVERSATIONS_FILE)
    config = TrainConfig(stage="instruct", epochs=2, batch_size=3, lr=1e-3, lora_rank=2, checkpoint_every=2, seed=5)

    def trainer():
        loaded = load_model(mobilevlm_v2.path)
        return Trainer(loaded.model, loaded.tokenizer, ChatTemplate(loaded.chat_template), config)

    straight = trainer()
    straight.train(conversations, progress=False)  # 4 steps in one go

    # The same run, killed during step 3 (after the step-2 checkpoint) ...
    interrupted = trainer()
    real_loss = Trainer.batch_loss

    def dies_at_step_three(self, batch):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_loss(self, batch)

    monkeypatch.setattr(Trainer, "batch_loss", dies_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(conversations, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(Trainer, "batch_loss", real_loss)

    # ... and resumed in a fresh model: optimizer moments and step come back, the result is the same.
    resumed = trainer()
    resumed.load_checkpoint(tmp_path)
    assert resumed.step == 2
    saved = interrupted.optimizer.state_dict()["state"]
    for key, state in resumed.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(state["exp_avg"], saved[key]["exp_avg"])
        torch.testing.assert_close(state["exp_avg_sq"], saved[key]["exp_avg_sq"])
    resumed.train(conversations, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.step == 4
    final = dict(resumed.model.named_parameters())
    for name, param in straight.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(final[name], param, atol=1e-6, rtol=1e-5)


def test_resume_from_another_setting_is_refused(mobilevlm_v2, synth_data, tmp_path):
    loaded = load_model(mobilevlm_v2.path)
    template = ChatTemplate(loaded.chat_template)
    Trainer(loaded.model, loaded.tokenizer, template, TrainConfig(stage="pretrain", epochs=0.2)).train(
        load_conversations(synth_data / CAPTIONS_FILE), checkpoint_dir=tmp_path, progress=False)
    other = load_model(mobilevlm_v2.path)
    trainer = Trainer(other.model, other.tokenizer, template, TrainConfig(stage="instruct", lora_rank=2))
    with pytest.raises(OptionError, match="stage='pretrain' \\(now 'instruct'\\)"):
        trainer.load_checkpoint(tmp_path)
    # the same stage with another seed would not be the run it claims to continue; more epochs are fine
    other = load_model(mobilevlm_v2.path)
    trainer = Trainer(other.model, other.tokenizer, template, TrainConfig(stage="pretrain", epochs=0.2, seed=1))
    with pytest.raises(OptionError, match="seed=0 \\(now 1\\)"):
        trainer.load_checkpoint(tmp_path)
    other = load_model(mobilevlm_v2.path)
    Trainer(other.model, other.tokenizer, template, TrainConfig(stage="pretrain", epochs=0.5)).load_checkpoint(tmp_path)


def test_frozen_llm_stages_skip_text_only_conversations(mobilevlm_v2, synth_data):
    loaded = load_model(mobilevlm_v2.path)
    template = ChatTemplate(loaded.chat_template)
    text_only = [conversation("Name a colour.", "Red."), conversation("And another?", "Blue.")]
    captions = load_conversations(synth_data / CAPTIONS_FILE)  # 6, with images
    trainer = Trainer(loaded.model, loaded.tokenizer, template, TrainConfig(stage="pretrain", batch_size=2))
    # text rows are batched apart: an all-text batch has no gradient for the connector (it used to crash)
    assert trainer.train(captions + text_only, progress=False)["steps"] == 3
    with pytest.raises(EdgeMLLMError, match="no training data with images"):
        trainer.train(text_only, progress=False)


def test_rows_cut_before_their_answer_are_refused(mobilevlm_v2, synth_data):
    loaded = load_model(mobilevlm_v2.path)
    trainer = Trainer(loaded.model, loaded.tokenizer, ChatTemplate(loaded.chat_template),
                      TrainConfig(stage="pretrain", max_len=loaded.model.num_image_tokens))  # the image fills it
    with pytest.raises(EdgeMLLMError, match="every answer starts past"):  # not a run of NaN losses
        trainer.train(load_conversations(synth_data / CAPTIONS_FILE), progress=False)


def test_training_the_llm_drops_the_weight_grid_claim(mobilevlm_v2, synth_data):
    conversations = load_conversations(synth_data / CONVERSATIONS_FILE)
    for config, grid in ((TrainConfig(stage="pretrain", epochs=0.2), "rtn-w4-g32-min"),  # LLM untouched
                         (TrainConfig(stage="instruct", epochs=0.2, lora_rank=2), None),
                         (TrainConfig(stage="instruct", epochs=0.2, lora_rank=2, qat="rtn-w4-g32"), "rtn-w4-g32")):
        loaded = load_model(mobilevlm_v2.path)
        loaded.model.config.weight_grid = "rtn-w4-g32-min"
        Trainer(loaded.model, loaded.tokenizer, ChatTemplate(loaded.chat_template), config).train(
            conversations, progress=False)
        assert loaded.model.config.weight_grid == grid, config


def test_vision_pretraining_learns(tiny):
    torch.manual_seed(0)
    vision = tiny.model.config.vision
    processor = ImageProcessor(vision.image_size, vision.image_mean, vision.image_std)
    before = {k: v.clone() for k, v in tiny.model.vision_tower.state_dict().items()}
    first = pretrain_vision(tiny.model.vision_tower, processor, steps=1, batch_size=4, progress=False)
    later = pretrain_vision(tiny.model.vision_tower, processor, steps=25, batch_size=4, lr=3e-3, progress=False)
    assert later["loss"] < first["loss"]
    assert {"color", "shape", "size", "row", "col", "presence"} <= set(later)
    assert any(not torch.equal(v, before[k]) for k, v in tiny.model.vision_tower.state_dict().items())


def test_shape_pooling_covers_the_drawn_object():
    # The shape head reads the mean feature over the patches an object covers: those patches must be
    # where render() drew it, through LLaVA's pad-to-square, for wide and tall images alike.
    grid, size = 24, 336
    processor = ImageProcessor(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "pad")
    for index in range(6):
        scene = sample_scene(scene_rng("train", 0, index))
        empty = dataclasses.replace(scene, objects=(), jitter=())
        drawn = (processor(render(scene)) - processor(render(empty))).abs().amax(0) > 0.1  # [336, 336]
        covered = drawn.view(grid, size // grid, grid, size // grid).float().mean((1, 3)).flatten()  # per patch
        features = torch.eye(grid * grid)  # pooling one-hot features gives back each disc's mask
        masks = disc_pool(features, object_discs(scene), grid) > 0
        union = masks.any(0)
        assert bool(union[covered > 0.5].all()), index  # every mostly-object patch is pooled ...
        assert float(covered[union].mean()) > 0.3, index  # ... and the pooled patches are mostly object


def test_grounding_layout_spells_each_object_in_words_where_it_lies():
    # The default model's 12x12 token grid: every object's tokens are its own words (a large one holds
    # colour, shape and size around its centre, colour and shape side by side in reading order), the
    # rest is background.
    for index in range(20):
        scene = sample_scene(scene_rng("test", 0, index))
        words = [VOCABULARY[w] for w in token_words(scene, 12).tolist()]
        centres = [(int((x + 1) / 2 * 12), int((y + 1) / 2 * 12)) for x, y, _ in object_discs(scene)]
        for obj, (col, row) in zip(scene.objects, centres, strict=True):
            own = {obj.color, obj.shape, obj.size, ROWS[obj.row], COLS[obj.col]}
            near = {words[r * 12 + c] for r in range(max(row - 1, 0), min(row + 2, 12))
                    for c in range(max(col - 1, 0), min(col + 2, 12))}
            assert words[row * 12 + col] in own, (index, obj)
            if obj.size == "large":
                assert {obj.color, obj.shape, obj.size} <= near, (index, obj, near)
                pairs = {(words[k], words[k + 1]) for k in range(143) if k % 12 < 11}
                assert (obj.color, obj.shape) in pairs or (obj.shape, obj.color) in pairs, (index, obj)
        assert words.count(".") > 144 // 2  # objects cover a minority of the grid


def test_grounding_makes_image_tokens_their_words(tiny):
    # Tower + projector learn to make each image token the embedding of its word, with no LLM pass;
    # the LLM itself is not touched. (The tiny model's 2x2 token grid and byte-piece tokenizer make
    # closeness to the target embeddings what 40 steps can show.)
    torch.manual_seed(0)
    vision = tiny.model.config.vision
    processor = ImageProcessor(vision.image_size, vision.image_mean, vision.image_std)
    llm_before = {k: v.clone() for k, v in tiny.model.language_model.state_dict().items()}
    first = ground_image_tokens(tiny.model, tiny.tokenizer, processor, steps=1, batch_size=8, progress=False)
    later = ground_image_tokens(tiny.model, tiny.tokenizer, processor, steps=40, batch_size=8, lr=3e-3,
                                tower_lr=3e-3, progress=False)
    assert later["loss"] < first["loss"] * 0.8, (first, later)
    # every step renders new scenes, so each step's cosine is measured on scenes not trained on yet
    assert later["cosine"] > first["cosine"] + 0.2, (first, later)
    fresh = read_out(tiny.model, tiny.tokenizer, processor, scenes=24)
    assert set(fresh) == {"background", "color", "shape", "size", "row", "col"}
    json.dumps(fresh, allow_nan=False)  # training.json stays JSON: no NaN for an attribute never spelt
    assert all(v is None or 0.0 <= v <= 1.0 for v in fresh.values()), fresh
    for name, tensor in tiny.model.language_model.state_dict().items():
        assert torch.equal(tensor, llm_before[name]), name


def test_projector_grounding_trains_the_projector_alone_on_cached_tower_features(tiny):
    # The projector learns its tokens' words from the tower's features of a fixed set of scenes,
    # computed once; tower and LLM are not touched.
    torch.manual_seed(0)
    vision = tiny.model.config.vision
    processor = ImageProcessor(vision.image_size, vision.image_mean, vision.image_std)
    frozen = {k: v.clone() for k, v in tiny.model.state_dict().items() if not k.startswith("mm_projector.")}
    projector_before = {k: v.clone() for k, v in tiny.model.mm_projector.state_dict().items()}
    first = ground_projector(tiny.model, tiny.tokenizer, processor, steps=1, scenes=16, progress=False)
    later = ground_projector(tiny.model, tiny.tokenizer, processor, steps=60, scenes=16, lr=3e-3, progress=False)
    assert later["loss"] < first["loss"] * 0.8, (first, later)
    assert later["cosine"] > first["cosine"] + 0.2, (first, later)
    for name, tensor in tiny.model.state_dict().items():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), name
    assert any(not torch.equal(v, projector_before[k]) for k, v in tiny.model.mm_projector.state_dict().items())


def test_grounding_accuracy_is_none_for_an_attribute_no_token_names():
    table = torch.eye(len(VOCABULARY))
    words = torch.tensor([0, 0, 1])  # background twice and the first colour word: no shape, size or place
    tokens = table[torch.tensor([0, 2, 1])]  # the second background token lies nearest another word
    accuracy = word_accuracy(tokens, words, table)
    assert accuracy["background"] == 0.5 and accuracy["color"] == 1.0
    assert accuracy["shape"] is None and accuracy["row"] is None
    history = [{"shape": None, "loss": 2.0}, {"shape": 0.5, "loss": 1.0}]  # 20 steps: the last 2 averaged
    assert final_metrics(history * 10, time.perf_counter()) | {"seconds": 0} == {"shape": 0.5, "loss": 1.5,
                                                                                 "seconds": 0}
    assert final_metrics(history[:1], time.perf_counter())["shape"] is None


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_image_norm_penalty_brings_oversized_image_tokens_back(tiny, synth_data, weight):
    # A projector whose tokens are 30x a word embedding's norm (what free training produced on the
    # default model): with the penalty, alignment steps shrink them toward a word's scale; without, not.
    torch.manual_seed(0)
    with torch.no_grad():
        tiny.model.mm_projector.mlp.mlp[-1].weight.mul_(30.0)
        tiny.model.mm_projector.mlp.mlp[-1].bias.mul_(30.0)
    trainer = Trainer(tiny.model, tiny.tokenizer, ChatTemplate(tiny.chat_template),
                      TrainConfig(stage="pretrain", epochs=1, batch_size=2, lr=1e-2, warmup_ratio=0,
                                  image_norm_weight=weight))
    batch = [tokenize_conversation(c, tiny.tokenizer, trainer.template)
             for c in load_conversations(synth_data / CAPTIONS_FILE)[:2]]

    def norm_ratio() -> float:
        with torch.no_grad():
            embeds = [tiny.model.mm_projector(trainer.image_features(e.image)[None])[0] for e in batch]
        return float(torch.cat(embeds).norm(dim=-1).mean()) / trainer.word_norm

    before = norm_ratio()
    for _ in range(20):
        loss = trainer.batch_loss(batch)[0]
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
    after = norm_ratio()
    assert before > 5
    if weight:
        assert after < before / 2, (before, after)
    else:
        assert after > before * 0.8, (before, after)


def test_bad_stage_is_refused():
    with pytest.raises(EdgeMLLMError, match="unknown stage"):
        TrainConfig(stage="finetune")


def test_cli_data_synth_and_train(mobilevlm_v2, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edge_mllm.cli", *args], capture_output=True, text=True,
                              timeout=300)

    proc = cli("data", "synth", "--split", "train", "--seed", "3", "-n", "4", "-o", str(tmp_path / "data"), "--json")
    assert proc.returncode == 0, proc.stderr
    written = json.loads(proc.stdout)  # --json: one object on stdout, no progress bar on stderr
    assert written["scenes"] == 4 and written["records"][CAPTIONS_FILE] == 4 and proc.stderr == ""
    questions = json.loads((tmp_path / "data" / QUESTIONS_FILE).read_text())
    assert written["records"][QUESTIONS_FILE] == len(questions) == sum(written["questions_by_type"].values())
    out = tmp_path / "aligned"
    (tmp_path / "aligned.train").write_text("a user's file where the training state would go")
    proc = cli("train", str(mobilevlm_v2.path), "--stage", "pretrain", "--data", str(tmp_path / "data"), "-o", str(out))
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and not out.exists()  # before any work
    (tmp_path / "aligned.train").unlink()
    # a trailing slash: the state still goes beside the model (inside, it made the save refuse the folder)
    proc = cli("train", str(mobilevlm_v2.path), "--stage", "pretrain", "--data", str(tmp_path / "data"),
               "-o", f"{out}/", "--lr", "0.01", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 1
    # resuming a finished run trains nothing: its loss is null, as JSON has no NaN
    proc = cli("train", str(mobilevlm_v2.path), "--stage", "pretrain", "--data", str(tmp_path / "data"),
               "-o", str(out), "--lr", "0.01", "--resume", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "NaN" not in proc.stdout and json.loads(proc.stdout)["final_loss"] is None
    trained, original = load_model(out), load_model(mobilevlm_v2.path)
    assert trained.model.config == original.model.config
    changed = [k for k, v in trained.model.state_dict().items() if not torch.equal(v, original.model.state_dict()[k])]
    assert changed and all(k.startswith("mm_projector.") for k in changed)
    assert (tmp_path / "aligned.train" / "trainer_state.pt").is_file()
    # Bad data: a one-line error, exit 1, no output folder.
    (tmp_path / "bad.json").write_text("[]")
    proc = cli("train", str(mobilevlm_v2.path), "--stage", "instruct", "--data", str(tmp_path / "bad.json"),
               "-o", str(tmp_path / "never"))
    assert proc.returncode == 1 and "no training data" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()
    # A frozen LLM takes no LoRA: asking for both is a usage error, not a silently ignored rank.
    proc = cli("train", str(mobilevlm_v2.path), "--stage", "instruct", "--data", str(tmp_path / "data"),
               "--freeze-llm", "--lora-rank", "4", "-o", str(tmp_path / "never"))
    assert proc.returncode == 2 and "--lora-rank" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()
    proc = cli("train", str(mobilevlm_v2.path), "--stage", "instruct", "--data", str(tmp_path / "data"),
               "--qat", "gptq-w4-g32", "-o", str(tmp_path / "never"))
    assert proc.returncode == 2 and "round-to-nearest" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("train", str(mobilevlm_v2.path), "--stage", "instruct", "--data", str(tmp_path / "data"),
               "--qat-activations", "-o", str(tmp_path / "never"))
    assert proc.returncode == 2 and "--qat SCHEME" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("train", str(mobilevlm_v2.path), "--stage", "pretrain", "--data", str(tmp_path / "data"),
               "--freeze-projector", "-o", str(tmp_path / "never"))
    assert proc.returncode == 2 and "nothing to train" in proc.stderr and "Traceback" not in proc.stderr
    # One question per example: the tiny model's 256 positions split each conversation into several rows.
    proc = cli("train", str(mobilevlm_v2.path), "--stage", "instruct", "--data", str(tmp_path / "data"),
               "--single-turns", "--batch-size", "1", "--lora-rank", "4", "--precision", "bf16", "-o",
               str(tmp_path / "single"), "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["steps"] > len(load_conversations(tmp_path / "data" / CONVERSATIONS_FILE))
    assert stats["precision"] == "bf16"
    # Quantization-aware LoRA (here with its inputs rounded as ExecuTorch's 8da4w does): the saved model is
    # on the grid, so quantizing it with the scheme changes nothing.
    out = tmp_path / "qat"
    proc = cli("train", str(mobilevlm_v2.path), "--stage", "instruct", "--data", str(tmp_path / "data"),
               "--qat", "rtn-w4-g32-min", "--qat-activations", "--lora-rank", "4", "--lr", "0.01", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    trained = load_model(out)
    linears = {n: p.detach().clone() for n, p in trained.model.named_parameters()
               if n.startswith("language_model.model.layers.") and n.endswith("proj.weight")}
    quantize_model(trained.model, QuantScheme.parse("rtn-w4-g32-min"), progress=False)
    assert all(torch.equal(dict(trained.model.named_parameters())[n], w) for n, w in linears.items())
