"""Chat templates: how a conversation becomes prompt text.

Built-in templates (Nemovision, VILA's vicuna_v1 and llama_3, ChatML) are written in the same
Jinja dialect as Hugging Face's `chat_template`, so a checkpoint's own template and ours go
through one renderer. Images are marked in message text with `<image>`; the pipeline splits
the rendered prompt there and splices in the image embeddings.

For multi-turn chat the KV cache already holds everything up to the end of the last answer,
so `ChatTemplate.continuation` renders only what comes after it (end of the answer, the new
user turn, the assistant prefix).
"""

from __future__ import annotations

from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

IMAGE_MARK = "<image>"
_ANSWER_SENTINEL = "\uE000ANSWER\uE001"

BUILTIN_TEMPLATES = {
    # NeVA / Nemovision (Nemotron-Mini) format.
    "nemovision": (
        "{% for m in messages %}"
        "{% if m.role == 'system' %}<extra_id_0>System\n{{ m.content }}\n"
        "{% elif m.role == 'user' %}{% if loop.first %}<extra_id_0>System\n\n{% endif %}<extra_id_1>User\n{{ m.content }}\n"
        "{% else %}<extra_id_1>Assistant\n{{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<extra_id_1>Assistant\n{% endif %}"
    ),
    # VILA's conv_vicuna_v1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    "vicuna_v1": (
        "{{ bos_token }}{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}"
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.{% endif %} "
        "{% for m in messages if m.role != 'system' %}"
        "{% if m.role == 'user' %}USER: {{ m.content }} {% else %}ASSISTANT: {{ m.content }}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    # VILA's llama_3 conversation mode.
    "llama_3": (
        "<|begin_of_text|>{% if messages[0].role != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language.<|eot_id|>{% endif %}"
        "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "chatml": (
        "{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # InternVL 2.5 / 3 (`internvl2_5` conversation): ChatML with InternVL's own default system message.
    "internvl2_5": (
        "{% if messages[0].role != 'system' %}<|im_start|>system\n"
        "\u4f60\u662f\u4e66\u751f\u00b7\u4e07\u8c61\uff0c\u82f1\u6587\u540d\u662fInternVL\uff0c"
        "\u662f\u7531\u4e0a\u6d77\u4eba\u5de5\u667a\u80fd\u5b9e\u9a8c\u5ba4\u3001\u6e05\u534e\u5927\u5b66"
        "\u53ca\u591a\u5bb6\u5408\u4f5c\u5355\u4f4d\u8054\u5408\u5f00\u53d1\u7684\u591a\u6a21\u6001"
        "\u5927\u8bed\u8a00\u6a21\u578b\u3002<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}

# Text that ends an answer in each built-in template (a stop string for generation).
BUILTIN_STOPS = {
    "nemovision": ["<extra_id_1>"],
    "vicuna_v1": ["</s>", "USER:"],
    "llama_3": ["<|eot_id|>"],
    "chatml": ["<|im_end|>"],
    "internvl2_5": ["<|im_end|>"],
}

# How one tiled image is written in the prompt: IMAGE_MARK stands for one tile's embeddings
# (256 rows, where the reference repeats its context token 256 times).
IMAGE_FORMATS = ("internvl", "nvlm")


def image_text(style: str, tiles: int) -> str:
    """The prompt text of one image of `tiles` tiles (thumbnail included), one IMAGE_MARK per tile.

    - internvl: `<img>`, the tiles, `</img>`;
    - nvlm (NVLM-D's 1-D tile tags): `<Image>`, then `<tile_1>` ... `<tile_{k}>` before the k grid
      tiles and `<tile_global_thumbnail>` before the last one, then `</Image>`.
    """
    if style == "internvl":
        return "<img>" + IMAGE_MARK * tiles + "</img>"
    if style == "nvlm":
        tags = [f"<tile_{i}>" for i in range(1, tiles)] + ["<tile_global_thumbnail>"]
        return "<Image>" + "".join(tag + IMAGE_MARK for tag in tags) + "</Image>"
    raise ValueError(f"unknown image format {style!r}; known: {', '.join(IMAGE_FORMATS)}")


def _raise(msg):
    raise jinja2.exceptions.TemplateError(msg)


class ChatTemplate:
    def __init__(self, source: str, name: str = "checkpoint", bos_token: str | None = None,
                 eos_token: str | None = None, stop_strings: list[str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.name = name
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self.stop_strings = list(stop_strings or [])

    @classmethod
    def builtin(cls, name: str, bos_token=None, eos_token=None) -> "ChatTemplate":
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(f"unknown chat template {name!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}")
        return cls(BUILTIN_TEMPLATES[name], name, bos_token, eos_token, BUILTIN_STOPS[name])

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)

    def continuation(self, history: list[dict], user: dict) -> str:
        """Text that follows the last assistant answer in `history` when `user` speaks next.

        Renders the conversation with a sentinel in place of the last answer and keeps what
        follows it; the answer's own tokens are already in the KV cache.
        """
        assert history and history[-1]["role"] == "assistant"
        marked = history[:-1] + [{"role": "assistant", "content": _ANSWER_SENTINEL}, user]
        text = self.render(marked, add_generation_prompt=True)
        at = text.rfind(_ANSWER_SENTINEL)
        if at < 0:
            raise ValueError(f"chat template {self.name!r} drops earlier answers; cannot continue a chat")
        return text[at + len(_ANSWER_SENTINEL):]


def default_template_name(llm_arch: str, tokenizer) -> str:
    """Pick a built-in template when the checkpoint carries none."""
    if llm_arch == "nemotron":
        return "nemovision"
    if tokenizer.token_to_id("<|eot_id|>") is not None:
        return "llama_3"
    if tokenizer.token_to_id("<|im_start|>") is not None:
        return "chatml"
    return "vicuna_v1"
