"""Model pieces on their own: connectors, prompt assembly, templates, and torch.export of the
KV-cached decoder with static shapes."""

from __future__ import annotations

import pytest
import torch

from edge_mllm.chat import ChatTemplate, render_vicuna_v1, user_message
from edge_mllm.config import MLLMConfig, ProjectorConfig, TextConfig, VisionConfig
from edge_mllm.errors import ConfigError
from edge_mllm.model.connectors import LDPProjector, build_projector
from edge_mllm.model.llama import LlamaForCausalLM
from edge_mllm.model.mllm import IMAGE_TOKEN_INDEX, MultimodalLM

VISION = VisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4)
TEXT = TextConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize(
    ("kind", "tokens"), [("mlp2x_gelu", 16), ("ldp", 4), ("ldpv2", 4), ("query", 7)]
)
def test_connector_output_shapes(kind, tokens):
    torch.manual_seed(0)
    model = MultimodalLM(MLLMConfig(text=TEXT, vision=VISION, projector=ProjectorConfig(kind, num_queries=7)))
    out = model.encode_images(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, tokens, TEXT.hidden_size)
    assert model.num_image_tokens == tokens
    assert torch.isfinite(out).all()


def test_ldp_residual_only_in_stride_one_block():
    ldp = LDPProjector(8, 16)
    first, second = ldp.model.mb_block[1], ldp.model.mb_block[2]
    assert first.use_res_connect and not second.use_res_connect
    assert first.block[1].fc1.out_channels == 8  # squeeze width: make_divisible(16 // 4, 8)
    # MobileVLM's tensor names (checkpoints load by them).
    names = set(ldp.state_dict())
    assert {"model.mlp.1.weight", "model.mlp.3.bias", "model.mb_block.2.block.0.0.weight",
            "model.mb_block.1.block.1.fc2.bias", "model.mb_block.2.block.2.1.weight"} <= names


def test_ldp_rejects_odd_grid():
    odd = VisionConfig(image_size=42, patch_size=14, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ConfigError, match="even patch grid"):
        MLLMConfig(text=TEXT, vision=odd, projector=ProjectorConfig("ldpv2"))
    build_projector(ProjectorConfig("mlp2x_gelu"), odd, 64)  # fine for a per-token MLP


@pytest.mark.parametrize("bad", [22.5, "2048", None, True, 0, -2048, float("nan")])
def test_config_sizes_must_be_positive_integers(bad):
    """JSON configs can hold any of these; each is refused by name, not met later as arithmetic."""
    with pytest.raises(ConfigError, match=rf"LLM hidden_size must be a positive integer, not {bad!r}"):
        TextConfig(hidden_size=bad, num_attention_heads=4)
    with pytest.raises(ConfigError, match=r"vision patch_size must be a positive integer"):
        VisionConfig(patch_size=bad)
    with pytest.raises(ConfigError, match=r"LLM head_dim must be a positive integer"):
        TextConfig(head_dim=bad if bad is not None else -1)


def test_query_connector_attends_to_position():
    """Learned queries must see where features are, not only what they are (2-D sin-cos positions)."""
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig("query", num_queries=5, num_heads=4), VISION, 64)
    feats = torch.randn(1, VISION.num_patches, VISION.hidden_size)
    shuffled = feats[:, torch.randperm(VISION.num_patches)]
    assert not torch.allclose(proj(feats), proj(shuffled), atol=1e-5)


def test_embed_prompt_splices_images_in_order():
    torch.manual_seed(0)
    model = MultimodalLM(MLLMConfig(text=TEXT, vision=VISION, projector=ProjectorConfig("ldpv2")))
    images = torch.randn(2, model.num_image_tokens, TEXT.hidden_size)
    ids = [5, IMAGE_TOKEN_INDEX, 6, 7, IMAGE_TOKEN_INDEX, 8]
    embeds = model.embed_prompt(ids, images)[0]
    n = model.num_image_tokens
    assert embeds.shape[0] == model.prompt_length(ids) == 4 + 2 * n
    table = model.language_model.model.embed_tokens.weight
    assert torch.equal(embeds[0], table[5])
    assert torch.equal(embeds[1 : 1 + n], images[0])
    assert torch.equal(embeds[1 + n : 3 + n], table[[6, 7]])
    assert torch.equal(embeds[3 + n : 3 + 2 * n], images[1])
    assert torch.equal(embeds[-1], table[8])
    with pytest.raises(ValueError, match="placeholder"):
        model.embed_prompt(ids, images[:1])


def test_vicuna_v1_matches_mobilevlm_conversation_format():
    # MobileVLM conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>") with one user turn.
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? ASSISTANT:"
    )
    assert render_vicuna_v1([user_message("What is this?", 1)]) == expected
    two_turns = render_vicuna_v1([
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "q"},
    ])
    assert two_turns.endswith("USER: hi ASSISTANT: hello</s>USER: q ASSISTANT:")
    with pytest.raises(Exception, match="unknown chat template"):
        ChatTemplate("alpaca")


def test_decoder_with_static_kv_cache_exports():
    """The cached decode step runs under torch.export with static shapes and matches eager."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(TEXT).eval()
    lm.setup_cache(1, 16)
    prompt = lm.embed(torch.tensor([[1, 2, 3, 4]]))
    with torch.no_grad():
        lm(prompt, torch.arange(4))
        step = lm.embed(torch.tensor([[9]]))
        pos = torch.tensor([4])
        program = torch.export.export(lm, (step, pos), strict=False)
        # The exported program owns a copy of the cache state: replay the prompt through it first.
        exported = program.module()
        lm.setup_cache(1, 16)
        lm(prompt, torch.arange(4))
        expected = lm(step, pos)
        exported(prompt[:, :1], torch.tensor([0]))  # shapes are static: feed the prompt one token at a time
        for i in range(1, 4):
            exported(prompt[:, i : i + 1], torch.tensor([i]))
        got = exported(step, pos)
    assert torch.allclose(got, expected, atol=1e-5)
    assert any("index_copy" in str(node.target) for node in program.graph.nodes)
