"""Chat templates: MobileVLM/LLaVA's Vicuna-v1 conversation style, and the tokenizer's own Jinja
template (e.g. SmolLM2's ChatML read from the GGUF)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_mllm.errors import EdgeMLLMError, OptionError
from edge_mllm.tokenizer import IMAGE_MARKER, Tokenizer

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("vicuna_v1", "tokenizer")


@dataclass(frozen=True)
class ChatTemplate:
    """``name`` is "vicuna_v1" (MobileVLM ``conv_vicuna_v1``) or "tokenizer" (the tokenizer's Jinja)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in TEMPLATES:
            raise EdgeMLLMError(f"unknown chat template {self.name!r}; choose one of {', '.join(TEMPLATES)}")

    def render(self, messages: list[dict[str, str]], tokenizer: Tokenizer, add_generation_prompt: bool = True) -> str:
        """Messages ({"role", "content"}) → text; with ``add_generation_prompt`` it ends where the
        assistant's reply begins. Rendering is prefix-consistent: a conversation's text starts with
        the text of each of its prefixes (training relies on it to find the assistant's tokens)."""
        if self.name == "vicuna_v1":
            return render_vicuna_v1(messages, add_generation_prompt)
        if not tokenizer.chat_template:
            raise EdgeMLLMError("the tokenizer has no chat template; use --raw or the vicuna_v1 template")
        return tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def around_user_turn(self, tokenizer: Tokenizer) -> tuple[str, str]:
        """(prefix, suffix) with ``render([user(content)]) == prefix + content + suffix`` for any content:
        what an app without a Jinja engine (the Android demo) needs to build a one-turn prompt. Raises
        if the template changes the content (trims it, say), where no such pair exists."""
        sentinel = "\ue000"  # a private-use character no template treats specially
        rendered = self.render([{"role": "user", "content": sentinel}], tokenizer)
        if rendered.count(sentinel) != 1:
            raise EdgeMLLMError(f"the {self.name} chat template does not place the user's text once")
        prefix, suffix = rendered.split(sentinel)
        probe = f" {IMAGE_MARKER}\nWhat is this? "
        if self.render([{"role": "user", "content": probe}], tokenizer) != prefix + probe + suffix:
            raise EdgeMLLMError(f"the {self.name} chat template changes the user's text: no fixed prefix/suffix")
        return prefix, suffix


def render_vicuna_v1(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """FastChat/MobileVLM ``SeparatorStyle.TWO``: "SYSTEM USER: q ASSISTANT: a</s>USER: q ASSISTANT:"."""
    system = VICUNA_V1_SYSTEM
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = {"user": "USER", "assistant": "ASSISTANT"}
    text = system + " "
    for i, message in enumerate(messages):
        if message["role"] not in roles:
            raise EdgeMLLMError(f"unknown chat role {message['role']!r}")
        text += f"{roles[message['role']]}: {message['content']}" + (" " if i % 2 == 0 else "</s>")
    return text + "ASSISTANT:" if add_generation_prompt else text


def user_message(prompt: str, num_images: int) -> dict[str, str]:
    """A user turn with the images first, as LLaVA/MobileVLM place them."""
    return {"role": "user", "content": f"{IMAGE_MARKER}\n" * num_images + prompt}


def check_image_markers(prompt: str, num_images: int, raw: bool) -> None:
    """Raise OptionError unless ``prompt`` marks the images as it should: a raw prompt has one
    ``<image>`` per image; a chat prompt has none (the template places the images)."""
    markers = prompt.count(IMAGE_MARKER)
    if not raw and markers:
        raise OptionError(f"the prompt contains {IMAGE_MARKER}: images are placed for you (raw prompts mark them)")
    if raw and markers != num_images:
        raise OptionError(f"the prompt has {markers} {IMAGE_MARKER} marker(s) but {num_images} image(s) were given")
