"""Our PyTorch modules against transformers on the same weights: CLIP features, Llama logits, KV-cached
generation, sampling and context limits."""

from __future__ import annotations

import json

import pytest
import torch

from edge_mllm.checkpoint import load_model
from edge_mllm.checkpoint.hf import load_clip_vision
from edge_mllm.errors import ContextLengthError
from edge_mllm.generate import GenerationConfig, generate, sample
from edge_mllm.pipeline import Pipeline

ATOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def prompt_ids(n: int = 12, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=gen)


# ----------------------------------------------------------------------------------------------
# CLIP vision tower


@pytest.mark.parametrize(
    ("select_layer", "select_feature"),
    [(-2, "patch"), (-2, "cls_patch"), (1, "patch"), (2, "cls_patch"), (-1, "patch"), (0, "patch")],
)
def test_clip_features_match_transformers(clip_folder, hf_builders, select_layer, select_feature):
    folder, hf = clip_folder
    pixels = hf_builders.pixels(2)
    ours = load_clip_vision(folder, select_layer=select_layer, select_feature=select_feature).eval()
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
        expected = hidden[:, 1:] if select_feature == "patch" else hidden
        got = ours(pixels)
    grid = hf_builders.image_size // hf_builders.patch_size
    assert got.shape == (2, grid * grid + (select_feature == "cls_patch"), hf.config.hidden_size)
    assert max_diff(got, expected) <= ATOL
    # The features really depend on the layer: a neighbouring layer's output is far off.
    n = hf.config.num_hidden_layers
    k = select_layer % (n + 1)
    other = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[(k + 1) % (n + 1)].detach()
    other = other[:, 1:] if select_feature == "patch" else other
    assert max_diff(got, other) > 1e-2


@pytest.mark.parametrize(("select_layer", "computed"), [(-2, 2), (-1, 3), (1, 1), (0, 0)])
def test_clip_tower_keeps_only_computed_layers(clip_folder, select_layer, computed):
    folder, hf = clip_folder
    assert hf.config.num_hidden_layers == 3
    tower = load_clip_vision(folder, select_layer=select_layer)
    assert len(tower.encoder.layers) == computed
    # No post_layernorm: HF's hidden_states are taken before it.
    assert not any("post_layernorm" in k for k in tower.state_dict())


@pytest.mark.parametrize("select_layer", [3 + 1, -(3 + 2)])
def test_clip_select_layer_out_of_range(clip_folder, select_layer):
    from edge_mllm.errors import ConfigError

    folder, _ = clip_folder
    with pytest.raises(ConfigError, match="select_layer"):
        load_clip_vision(folder, select_layer=select_layer)


def test_clip_features_from_full_clip_model(tmp_path, hf_builders):
    """A CLIPModel folder (vision_config nested, tensors under vision_model.*, text tower too)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=16,
    )
    hf = CLIPModel(config).eval()
    hf.save_pretrained(str(tmp_path / "clip-full"))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "clip-full" / "model.safetensors"))
    assert any(k.startswith("vision_model.") for k in keys) and any(k.startswith("text_model.") for k in keys)
    pixels = hf_builders.pixels(1)
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = load_clip_vision(tmp_path / "clip-full", select_layer=-2)(pixels)
    assert max_diff(got, expected) <= ATOL


def test_clip_legacy_prefixed_vision_model(tmp_path, clip_folder, hf_builders):
    """CLIPVisionModel saved by transformers 4.x: the same tensors under ``vision_model.``."""
    from safetensors.torch import load_file, save_file

    folder, hf = clip_folder
    legacy = tmp_path / "clip-legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    save_file({f"vision_model.{k}": v for k, v in state.items()}, str(legacy / "model.safetensors"))
    pixels = hf_builders.pixels(1)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = load_clip_vision(legacy)(pixels)
    assert max_diff(got, expected) <= ATOL


# ----------------------------------------------------------------------------------------------
# Llama language model


@pytest.fixture
def tied_llama(tmp_path, hf_builders):
    folder = tmp_path / "llama-tied"
    return folder, hf_builders.llama(folder, tie_word_embeddings=True, seed=5)


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_llama_logits_match_transformers(request, which):
    folder, hf = request.getfixturevalue("llama_folder" if which == "untied" else "tied_llama")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["tie_word_embeddings"] is (which == "tied")
    loaded = load_model(folder)
    lm = loaded.model.language_model.eval()
    assert lm.config.rope_theta == 50000.0
    assert lm.config.num_key_value_heads == 2
    if which == "tied":
        assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    ids = prompt_ids(20)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = lm(lm.embed(ids))
    assert got.shape == expected.shape == (1, 20, config["vocab_size"])
    assert max_diff(got, expected) <= ATOL
    assert expected.std() > 0.1  # a meaningful comparison, not two near-zero tensors


def test_llama_rope_theta_matters(llama_folder):
    """Loading with the wrong rope theta would be caught: the logits move well past the tolerance."""
    folder, hf = llama_folder
    lm = load_model(folder).model.language_model.eval()
    from edge_mllm.model.llama import rope_tables

    cos, sin = rope_tables(lm.config.head_dim, lm.config.max_position_embeddings, 10000.0)
    lm.rope_cos.copy_(cos)
    lm.rope_sin.copy_(sin)
    ids = prompt_ids(20)
    with torch.no_grad():
        assert max_diff(lm(lm.embed(ids)), hf(input_ids=ids).logits) > 1e-2


def _no_stop(max_new_tokens: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=(), **kw)


def test_cached_generation_equals_full_recompute(llama_folder):
    folder, _ = llama_folder
    lm = load_model(folder).model.language_model.eval()
    ids = prompt_ids(10, seed=1)
    n_new = 12
    with torch.no_grad():
        out = generate(lm, lm.embed(ids), _no_stop(n_new))
    assert out.finish_reason == "length"
    assert len(out.token_ids) == n_new
    assert lm.max_cache_len == 0  # the cache is dropped after generation
    assert all(layer.self_attn.kv_cache is None for layer in lm.model.layers)

    # Recompute from scratch each step, with no cache set up.
    seq = ids[0].tolist()
    recomputed, full_logits = [], []
    with torch.no_grad():
        for _ in range(n_new):
            logits = lm(lm.embed(torch.tensor([seq])))[0, -1]
            full_logits.append(logits)
            tok = int(logits.argmax())
            recomputed.append(tok)
            seq.append(tok)
    assert out.token_ids == recomputed

    # Step-by-step with the cache: every step's logits equal the recomputed ones.
    lm.setup_cache(1, ids.shape[1] + n_new)
    try:
        with torch.no_grad():
            cached = [lm(lm.embed(ids), torch.arange(ids.shape[1]))[0, -1]]
            for i, tok in enumerate(recomputed[:-1]):
                pos = ids.shape[1] + i
                cached.append(lm(lm.embed(torch.tensor([[tok]])), torch.tensor([pos]))[0, -1])
    finally:
        lm.clear_cache()
    for a, b in zip(cached, full_logits, strict=True):
        assert max_diff(a, b) <= ATOL


def test_cached_forward_requires_positions(llama_folder):
    folder, _ = llama_folder
    lm = load_model(folder).model.language_model
    lm.setup_cache(1, 8)
    with pytest.raises(ValueError, match="input_pos"):
        lm(lm.embed(prompt_ids(3)))


def test_greedy_generation_matches_transformers_generate(llama_folder):
    from transformers import GenerationConfig as HFGenerationConfig

    folder, hf = llama_folder
    lm = load_model(folder).model.language_model.eval()
    ids = prompt_ids(9, seed=2)
    n_new = 15
    with torch.no_grad():
        ours = generate(lm, lm.embed(ids), _no_stop(n_new)).token_ids
        hf_out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=HFGenerationConfig(
                max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=2
            ),
        )
    theirs = hf_out[0, ids.shape[1]:].tolist()
    assert len(theirs) == n_new
    assert ours == theirs
    assert len(set(ours)) > 1  # not a degenerate repeat of one token


def test_generation_stops_on_stop_token(llama_folder):
    folder, _ = llama_folder
    lm = load_model(folder).model.language_model.eval()
    ids = prompt_ids(8, seed=3)
    with torch.no_grad():
        free = generate(lm, lm.embed(ids), _no_stop(6)).token_ids
        stop_at = free[3]
        first = free.index(stop_at)
        stopped = generate(lm, lm.embed(ids), GenerationConfig(max_new_tokens=6, stop_token_ids=(stop_at,)))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free[:first]


def test_on_token_streams_every_generated_id(llama_folder):
    folder, _ = llama_folder
    lm = load_model(folder).model.language_model.eval()
    seen: list[int] = []
    with torch.no_grad():
        out = generate(lm, lm.embed(prompt_ids(5)), _no_stop(7), on_token=seen.append)
    assert seen == out.token_ids


# ----------------------------------------------------------------------------------------------
# sampling


def _sampled(lm, seed, **kw):
    with torch.no_grad():
        return generate(lm, lm.embed(prompt_ids(6, seed=4)), _no_stop(16, seed=seed, **kw)).token_ids


def test_sampling_is_reproducible_per_seed(llama_folder):
    folder, _ = llama_folder
    lm = load_model(folder).model.language_model.eval()
    # A high temperature flattens the distribution so different seeds really diverge.
    a = _sampled(lm, 123, temperature=3.0)
    b = _sampled(lm, 123, temperature=3.0)
    c = _sampled(lm, 124, temperature=3.0)
    assert a == b
    assert a != c
    greedy = _sampled(lm, None)
    assert a != greedy


def test_tiny_top_p_is_greedy(llama_folder):
    folder, _ = llama_folder
    lm = load_model(folder).model.language_model.eval()
    greedy = _sampled(lm, None)
    for seed in (0, 1, 2):
        assert _sampled(lm, seed, temperature=5.0, top_p=1e-6) == greedy


def test_sample_top_p_keeps_nucleus_only():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, 1.0, 0.7, gen) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 < 0.7 ≤ 0.5 + 0.3: exactly the first two
    picks = {sample(logits, 1.0, 1.0, gen) for _ in range(300)}
    assert picks == {0, 1, 2, 3}
    assert sample(logits, 0.0, 1.0, None) == 0


@pytest.mark.parametrize(("kw", "match"), [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_generation_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kw)


# ----------------------------------------------------------------------------------------------
# context length


def test_context_length_error(llama_folder, hf_builders):
    folder, _ = llama_folder
    lm = load_model(folder).model.language_model.eval()
    context = lm.config.max_position_embeddings
    assert context == hf_builders.context
    ids = prompt_ids(context - 4)
    with torch.no_grad():
        ok = generate(lm, lm.embed(ids), _no_stop(4))  # exactly fills the context
        assert len(ok.token_ids) == 4
        with pytest.raises(ContextLengthError, match=str(context)):
            generate(lm, lm.embed(ids), _no_stop(5))
    assert lm.max_cache_len == 0


def test_context_length_error_in_pipeline_counts_images(mobilevlm_v1, test_image):
    loaded = load_model(mobilevlm_v1.path)
    pipe = Pipeline(loaded)
    context = loaded.model.config.text.max_position_embeddings
    text_len = len(pipe.tokenizer.encode_with_images(pipe.render_prompt("describe", 1)))
    prompt_len = text_len - 1 + loaded.model.num_image_tokens
    with pytest.raises(ContextLengthError, match="images included"):
        pipe.generate("describe", images=[test_image], max_new_tokens=context - prompt_len + 1)
    out = pipe.generate("describe", images=[test_image], max_new_tokens=context - prompt_len)
    assert out.prompt_tokens == prompt_len
