"""The embedded SmolLM2 GGUF run by our PyTorch model and by llama.cpp (llama-cpp-python, unmodified):
same tokenization, and the same greedy continuation."""

from __future__ import annotations

import pytest
import torch

from edge_mllm.checkpoint.gguf import load_gguf, unpermute_qk
from edge_mllm.default import smollm2_gguf_path
from edge_mllm.generate import GenerationConfig, generate

llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    "Hello world, how are you? 12345  spaces\n\nnew line",
    "Ünïcödé — emoji 🤖 and tabs\tand CamelCaseWords, don't we'll they're",
    "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces and trailing   ",
]
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in two sentences.",
    "List the planets of the solar system.",
]
N_TOKENS = 32


@pytest.fixture(scope="module")
def ours():
    return load_gguf(smollm2_gguf_path(), progress=False)


@pytest.fixture(scope="module")
def theirs():
    return llama_cpp.Llama(model_path=str(smollm2_gguf_path()), n_ctx=512, n_threads=2, seed=0, verbose=False)


def test_unpermute_inverts_llamacpp_permutation():
    # convert_hf_to_gguf's permute, written out, must be undone exactly.
    w = torch.randn(3 * 8, 5)
    n_head = 3
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_qk(permuted, n_head), w)
    assert not torch.equal(permuted, w)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_tokenization_matches_llamacpp(ours, theirs, text):
    expected = theirs.tokenize(text.encode(), add_bos=False, special=True)
    assert ours.tokenizer.encode(text) == expected
    assert ours.tokenizer.decode(expected, skip_special_tokens=False) == text


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_llamacpp(ours, theirs, prompt):
    from edge_mllm.chat import ChatTemplate, user_message

    text = ChatTemplate("tokenizer").render([user_message(prompt, 0)], ours.tokenizer)
    ids = ours.tokenizer.encode(text)
    assert ids == theirs.tokenize(text.encode(), add_bos=False, special=True)

    reference = []
    theirs.reset()
    for tok in theirs.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if len(reference) == N_TOKENS:
            break
        reference.append(tok)

    # Teacher-forced: on llama.cpp's own greedy continuation, our argmax must pick its token at
    # (almost) every step. llama.cpp multiplies Q4_1 weights with Q8-quantized activations while we
    # use the dequantized fp32 weights, so exact near-ties (logit gaps ~0.1) may flip.
    lm = ours.model.language_model
    with torch.no_grad():
        logits = lm(lm.embed(torch.tensor([ids + reference])))[0, len(ids) - 1 : -1]
    agree = int((logits.argmax(-1) == torch.tensor(reference)).sum())
    assert agree >= 28, f"agreed on {agree}/{N_TOKENS} tokens with llama.cpp"

    # Free-running, through the KV-cached generator: the same text until a near-tie flips it.
    mine = generate(lm, lm.embed(torch.tensor([ids])), GenerationConfig(max_new_tokens=N_TOKENS)).token_ids
    prefix = next((i for i, (a, b) in enumerate(zip(mine, reference, strict=True)) if a != b), N_TOKENS)
    assert prefix >= 8, f"diverged after {prefix} tokens: ours={mine} llama.cpp={reference}"
