"""Text replay: SmolLM2's own answers to text-only instructions, learnt alongside the image questions
so that the LoRA which teaches the LLM to read images keeps what it says without one (sequence-level
self-distillation, as continual-learning recipes replay earlier data).

Why: trained on image questions alone (one-word answers), run 10's LoRA changed the default's text
answers ("What is the capital of France?" → "Le Grand Paris"; TRAINING.md). The teacher is the model
before stage 2 — SmolLM2 as it ships — so the targets say exactly what the default said before.

The instructions are generated from templates (nothing may be downloaded). Training and held-out
prompts come from different template families, so the held-out check (``text_agreement``) measures
whether answers to *kinds* of questions never replayed stay the same, the README's demo among them.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable

from edge_mllm.data.llava import make_record
from edge_mllm.pipeline import Pipeline
from edge_mllm.train.examples import UNFINISHED

TEXT_FILE = "text.json"  # the replayed conversations, next to the image conversations

# Each family: a template and what fills it. Families, not single prompts, are split between training
# and the held-out check.
TRAIN_FAMILIES: dict[str, list[str]] = {
    "Give a synonym for {}.": ["happy", "big", "fast", "smart", "cold", "quiet", "angry", "brave", "tired",
                               "bright", "small", "funny"],
    "What is the opposite of {}?": ["hot", "up", "early", "heavy", "full", "open", "young", "strong", "wet",
                                    "loud", "rich", "inside"],
    "Explain what {} is in one sentence.": ["gravity", "a computer", "a volcano", "democracy", "electricity",
                                            "a rainbow", "an atom", "the internet", "a vaccine", "a planet",
                                            "a library", "an island"],
    "Is a {} a {} or a {}?": ["tomato|fruit|vegetable", "whale|fish|mammal", "bat|bird|mammal",
                              "penguin|bird|fish", "potato|fruit|vegetable", "spider|insect|arachnid",
                              "frog|reptile|amphibian", "mushroom|plant|fungus", "shark|fish|mammal",
                              "peanut|nut|legume"],
    "How many {} are in a {}?": ["days|week", "minutes|hour", "months|year", "hours|day", "seconds|minute",
                                 "sides|hexagon", "legs|spider", "players|football team", "centimetres|metre",
                                 "weeks|year"],
    "What does a {} do?": ["doctor", "teacher", "pilot", "chef", "farmer", "firefighter", "librarian",
                           "mechanic", "gardener", "photographer", "plumber", "judge"],
    "What colour is {}?": ["a banana", "grass", "snow", "the sun", "a carrot", "coal", "a strawberry",
                           "a lemon", "milk", "a tomato", "an orange", "chocolate"],
    "What shape is {}?": ["a wheel", "a pizza box", "a dice", "a stop sign", "a football", "a coin",
                          "a slice of pizza", "an egg", "a window", "a pyramid"],
    "Give me one tip for {}.": ["studying", "sleeping better", "saving money", "learning a language",
                                "staying healthy", "writing an essay", "cooking rice", "running faster",
                                "reading more", "keeping plants alive"],
    "Translate '{}' into {}.": ["thank you|French", "good night|Spanish", "hello|German", "cat|French",
                                "water|Spanish", "friend|Italian", "book|German", "yes|Italian"],
    "Why do {}?": ["leaves change colour in autumn", "birds migrate", "we need sleep", "stars twinkle",
                   "cats purr", "bread rise", "ice cubes float", "people yawn"],
    "What is {} used for?": ["a thermometer", "a compass", "a hammer", "a microscope", "soap", "a map",
                             "a ladder", "a calculator", "an umbrella", "glue"],
    "Where do {} live?": ["penguins", "camels", "polar bears", "koalas", "dolphins", "owls", "bees",
                          "kangaroos", "frogs", "eagles"],
    "List three {}.": ["vegetables", "birds", "countries in Europe", "programming languages", "flowers",
                       "board games", "kitchen tools", "famous scientists", "rivers", "farm animals"],
    "Give two examples of {}.": ["renewable energy", "mammals", "insects", "metals", "gases", "desserts",
                                 "winter sports", "string instruments"],
}
# Families never replayed; the first prompts are the README's demo and TRAINING.md's examples.
HELD_OUT_FAMILIES: dict[str, list[str]] = {
    "What is the capital of {}?": ["France", "Japan", "Italy", "Canada", "Egypt", "Spain"],
    "Name three {}.": ["primary colors", "fruits", "planets", "musical instruments", "sports"],
    "What is {} * {}?": ["17|23", "6|7", "12|12", "9|8", "15|4"],
    "Write one sentence about {}.": ["the sea", "mountains", "winter", "the moon", "music"],
    "What is the largest {}?": ["planet in the solar system", "ocean on Earth", "animal on Earth", "desert"],
}


def _prompts(families: dict[str, list[str]]) -> list[str]:
    return [template.format(*fill.split("|")) for template, fills in families.items() for fill in fills]


def train_prompts(seed: int) -> list[str]:
    """Every training instruction (200), in a seeded order; the families' and 46 seeded additions."""
    rng = random.Random(seed)
    pairs = rng.sample(list(itertools.combinations(range(2, 60), 2)), 46)
    prompts = _prompts(TRAIN_FAMILIES) + [f"What is {a} + {b}?" for a, b in pairs]
    rng.shuffle(prompts)
    return prompts


def held_out_prompts() -> list[str]:
    """The instructions ``text_agreement`` checks, from families training never sees."""
    return _prompts(HELD_OUT_FAMILIES)


Answers = Callable[[list[str]], list[tuple[str, bool]]]  # prompts → (answer, whether it ended by itself) each


def teacher_records(answers: Answers, prompts: list[str]) -> list[dict]:
    """LLaVA records (no image) of each prompt with the teacher's answer. An answer cut off by the
    length limit is marked ``UNFINISHED``: its words are learnt, an end of turn after them is not
    (learning one would teach the model to stop mid-sentence; leaving such answers out would leave
    out SmolLM2's long answers)."""
    records = []
    for i, (prompt, (text, finished)) in enumerate(zip(prompts, answers(prompts), strict=True)):
        if text.strip():
            records.append(make_record(f"text-{i}", [(prompt, text)], kind="text_replay",
                                       **({} if finished else {UNFINISHED: True})))
    return records


def answers_of(pipeline: Pipeline, max_new_tokens: int, progress: bool = False) -> Answers:
    """``pipeline``'s greedy answers to text-only prompts (``Pipeline.generate_batch``: the 200 replayed
    prompts take about a minute on the 2-core CPU instead of eight one by one)."""

    def answers(prompts: list[str]) -> list[tuple[str, bool]]:
        results = pipeline.generate_batch(prompts, max_new_tokens=max_new_tokens, progress=progress)
        return [(r.text, r.finish_reason == "stop") for r in results]

    return answers


def text_agreement(prompts: list[str], before: list[str], after: list[str]) -> dict:
    """How many answers to ``prompts`` stayed word for word what they were, how much of each answer's
    beginning stayed (the mean share of ``before``'s characters that ``after`` starts with), and the
    answers that changed."""
    changed = [{"prompt": p, "before": old, "after": new}
               for p, old, new in zip(prompts, before, after, strict=True) if old != new]
    kept = [len(os.path.commonprefix([old, new])) / max(len(old), 1) for old, new in zip(before, after, strict=True)]
    return {"prompts": len(prompts), "unchanged": 1 - len(changed) / len(prompts),
            "prefix_kept": sum(kept) / len(kept), "changed": changed}
