"""Generation shortcuts that must not change an answer: the prompt cache (the next question about the
same image prefills only the question) and batched text generation (prompts of one length decoded
together)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from edge_mllm.checkpoint import load_model
from edge_mllm.generate import PromptCache
from edge_mllm.pipeline import Pipeline

QUESTIONS = ["What colour is the square?", "How many circles are there?", "Is there a red triangle?"]


def test_prompt_cache_reuses_the_image_prompt_and_answers_as_without_it(mobilevlm_v2, test_image, monkeypatch):
    monkeypatch.setattr(PromptCache, "CAPACITY_STEP", 8)  # this model's context is 256: a cache it can outgrow
    loaded = load_model(mobilevlm_v2.path)
    cached, plain = Pipeline(loaded), Pipeline(loaded, cache_prompt=False)
    other = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 30, 3), dtype=np.uint8))
    image_tokens = loaded.model.num_image_tokens
    longer = QUESTIONS[0] + " And the circles?" * 4
    asks = [(q, test_image) for q in QUESTIONS] + [(QUESTIONS[0], other), (longer, other)]
    reused = []
    for question, image in asks:
        got = cached.generate(question, [image], max_new_tokens=8, stop_token_ids=())
        want = plain.generate(question, [image], max_new_tokens=8, stop_token_ids=())
        assert got.token_ids == want.token_ids, question
        assert want.timings["cached_prompt_tokens"] == 0
        reused.append(got.timings["cached_prompt_tokens"])
    assert reused[0] == 0
    # The same image: its tokens and everything before them; another image: only what precedes it;
    # a prompt past the cache's capacity: a new cache.
    assert all(n > image_tokens for n in reused[1:3])
    assert 0 < reused[3] < reused[1] - image_tokens
    assert reused[4] == 0
    # The model runs without a cache between generations (training and export see a plain module).
    lm = loaded.model.language_model
    assert lm.max_cache_len == 0 and all(layer.self_attn.kv_cache is None for layer in lm.model.layers)
    # A repeated prompt is served from the cache but for its last position.
    again = cached.generate(asks[-1][0], [other], max_new_tokens=8, stop_token_ids=())
    assert again.token_ids == want.token_ids and again.timings["cached_prompt_tokens"] == want.prompt_tokens - 1


def test_a_failed_prefill_leaves_no_cache_behind(mobilevlm_v2, test_image, monkeypatch):
    loaded = load_model(mobilevlm_v2.path)
    pipe = Pipeline(loaded)
    pipe.generate(QUESTIONS[0], [test_image], max_new_tokens=4)
    lm = loaded.model.language_model
    monkeypatch.setattr(lm, "hidden_states", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("interrupted")))
    try:
        pipe.generate(QUESTIONS[1], [test_image], max_new_tokens=4)
    except RuntimeError:
        pass
    monkeypatch.undo()
    assert pipe.prompt_cache.prompt is None
    assert pipe.generate(QUESTIONS[1], [test_image], max_new_tokens=4).timings["cached_prompt_tokens"] == 0


def test_generate_batch_answers_each_prompt_as_generate_does(mobilevlm_v2):
    pipe = Pipeline(load_model(mobilevlm_v2.path), cache_prompt=False)
    prompts = ["hi", "What is 2 + 3?", "Name a fruit.", "hello", "What is 4 + 5?", "Why is the sky blue today?"]
    lengths = {len(pipe.tokenizer.encode_with_images(pipe.render_prompt(p, 0))) for p in prompts}
    assert 1 < len(lengths) < len(prompts)  # some prompts share a batch, some do not
    free = [pipe.generate(p, max_new_tokens=10, stop_token_ids=()) for p in prompts]
    # Stop on a token the first prompt produces mid-answer: its row stops there while the others go on.
    stop = free[0].token_ids[3]
    want = [pipe.generate(p, max_new_tokens=10, stop_token_ids=(stop,)) for p in prompts]
    got = pipe.generate_batch(prompts, max_new_tokens=10, stop_token_ids=(stop,), batch_size=2)
    assert [(g.token_ids, g.finish_reason, g.text, g.prompt_tokens) for g in got] == \
        [(w.token_ids, w.finish_reason, w.text, w.prompt_tokens) for w in want]
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 3
    assert any(g.finish_reason == "length" for g in got)
    lm = pipe.model.language_model
    assert lm.max_cache_len == 0 and all(layer.self_attn.kv_cache is None for layer in lm.model.layers)
    assert torch.is_tensor(lm.lm_head.weight)
