"""Chat templates: how a conversation becomes prompt text.

Built-in templates (Nemovision, VILA's vicuna_v1 and llama_3, ChatML) are written in the same
Jinja dialect as Hugging Face's `chat_template`, so a checkpoint's own template and ours go
through one renderer. Images are marked in message text with `<image>`; the pipeline splits
the rendered prompt there and splices in the image embeddings.

For multi-turn chat the KV cache already holds everything up to the end of the last answer,
so `ChatTemplate.continuation` renders only what comes after it (end of the answer, the new
user or tool turn, the assistant prefix).

Tools and RAG documents reach the template as Hugging Face's `apply_chat_template` passes them:
`tools` (OpenAI-shaped specs), `documents` (`[{"text": ...}]`), assistant messages with
`tool_calls` (arguments as dicts) and `role: "tool"` messages. `tojson` behaves as in
transformers (no HTML escaping, keys in their order), so a checkpoint's template renders tools
exactly as it does there. `tool_format` says which tool-call syntax the model writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import EdgeVLMError

IMAGE_MARK = "<image>"
ANSWER_SENTINEL = "\uE000ANSWER\uE001"  # stands for an answer in a render, to find the text around it



@dataclass(frozen=True)
class BuiltinTemplate:
    """One built-in template: its Jinja source and the text that ends an answer in it (stop strings).
    Which tool-call syntax it writes is read from the source (`ChatTemplate.tool_format`), as for a
    checkpoint's own template, so it is not a second fact here."""

    source: str
    stops: tuple[str, ...]


# name -> the template; the stop strings are the text that ends an answer in it
BUILTIN_TEMPLATES = {
    # NeVA / Nemovision (Nemotron-Mini) format. With tools or documents the system turn gains the
    # card's block: a blank line, one `<tool> {spec} </tool>` / `<context> {text} </context>` line
    # each, a blank line; calls are `<toolcall> {"name", "arguments"} </toolcall>`, results a Tool turn.
    "nemovision": BuiltinTemplate(stops=("<extra_id_1>",), source=(
        "{% set ns = namespace(block='') %}"
        "{% for t in tools or [] %}{% set ns.block = ns.block + ('\\n' if ns.block else '') + '<tool> '"
        " + (t | tojson) + ' </tool>' %}{% endfor %}"
        "{% for d in documents or [] %}{% set ns.block = ns.block + ('\\n' if ns.block else '') + '<context> '"
        " + (d.text if d is mapping else d) + ' </context>' %}{% endfor %}"
        "{% for m in messages %}"
        "{% if m.role == 'system' %}<extra_id_0>System\n{{ m.content }}\n"
        "{% if ns.block %}{{ '\\n' + ns.block + '\\n\\n' }}{% else %}{{ '\\n' }}{% endif %}"
        "{% else %}{% if loop.first and m.role != 'assistant' %}<extra_id_0>System\n"
        "{{ ns.block + '\\n\\n' if ns.block else '\\n' }}{% endif %}"
        "{% if m.role == 'user' %}<extra_id_1>User\n{{ m.content }}\n"
        "{% elif m.role == 'tool' %}<extra_id_1>Tool\n{{ m.content }}\n"
        "{% else %}<extra_id_1>Assistant\n{{ m.content if m.content is not none else '' }}"
        "{% for c in m.tool_calls or [] %}{% set f = c.function if c.function is defined else c %}"
        "{{ '\\n' if m.content or not loop.first else '' }}<toolcall> "
        "{{ {'name': f.name, 'arguments': f.arguments} | tojson }} </toolcall>{% endfor %}{{ '\\n' }}"
        "{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<extra_id_1>Assistant\n{% endif %}"
    )),
    # VILA's conv_vicuna_v1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    "vicuna_v1": BuiltinTemplate(stops=("</s>", "USER:"), source=(
        "{{ bos_token }}{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}"
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.{% endif %} "
        "{% for m in messages if m.role != 'system' %}"
        "{% if m.role == 'user' %}USER: {{ m.content }} {% else %}ASSISTANT: {{ m.content }}</s>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )),
    # VILA's llama_3 conversation mode.
    "llama_3": BuiltinTemplate(stops=("<|eot_id|>",), source=(
        "<|begin_of_text|>{% if messages[0].role != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language.<|eot_id|>{% endif %}"
        "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )),
    "chatml": BuiltinTemplate(stops=("<|im_end|>",), source=(
        "{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )),
    # InternVL 2.5 / 3 (`internvl2_5` conversation): ChatML with InternVL's own default system message.
    "internvl2_5": BuiltinTemplate(stops=("<|im_end|>",), source=(
        "{% if messages[0].role != 'system' %}<|im_start|>system\n"
        "\u4f60\u662f\u4e66\u751f\u00b7\u4e07\u8c61\uff0c\u82f1\u6587\u540d\u662fInternVL\uff0c"
        "\u662f\u7531\u4e0a\u6d77\u4eba\u5de5\u667a\u80fd\u5b9e\u9a8c\u5ba4\u3001\u6e05\u534e\u5927\u5b66"
        "\u53ca\u591a\u5bb6\u5408\u4f5c\u5355\u4f4d\u8054\u5408\u5f00\u53d1\u7684\u591a\u6a21\u6001"
        "\u5927\u8bed\u8a00\u6a21\u578b\u3002<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )),
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


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' `tojson`: plain json.dumps (Jinja's own escapes <, >, & and sorts keys)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@dataclass(frozen=True)
class ToolCallSyntax:
    """How a model family writes a tool call: the tags around a call's JSON `{"name": ...,
    "arguments": {...}}` (what the parser in tools.py looks for, and what recognises the syntax in a
    template's source), and the exact text its templates put before, after and between calls
    (json.dumps spacing): a constrained call (`constrained.Constraint.tool_calls`) is written so."""

    opening: str
    closing: str
    before: str
    after: str
    between: str


TOOL_CALL_SYNTAX = {
    "nemovision": ToolCallSyntax("<toolcall>", "</toolcall>", "<toolcall> ", " </toolcall>", "\n"),
    "hermes": ToolCallSyntax("<tool_call>", "</tool_call>", "<tool_call>\n", "\n</tool_call>", "\n"),
}


class ChatTemplate:
    def __init__(self, source: str, name: str = "checkpoint", bos_token: str | None = None,
                 eos_token: str | None = None, stop_strings: list[str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self.template = env.from_string(source)
        self.source = source
        self.name = name
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self.stop_strings = list(stop_strings or [])
        self._variables = jinja2.meta.find_undeclared_variables(env.parse(source))

    @classmethod
    def builtin(cls, name: str, bos_token=None, eos_token=None) -> "ChatTemplate":
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(f"unknown chat template {name!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}")
        builtin = BUILTIN_TEMPLATES[name]
        return cls(builtin.source, name, bos_token, eos_token, list(builtin.stops))

    @property
    def takes_tools(self) -> bool:
        """Whether the template renders a `tools` list (and so tool calls and results)."""
        return "tools" in self._variables

    @property
    def takes_documents(self) -> bool:
        """Whether the template renders RAG `documents` (Nemovision's `<context>` block)."""
        return "documents" in self._variables

    @property
    def tool_format(self) -> str | None:
        """The tool-call syntax the model answers in (a key of TOOL_CALL_SYNTAX), None if unknown."""
        if not self.takes_tools:
            return None
        for fmt, syntax in TOOL_CALL_SYNTAX.items():
            if syntax.opening in self.source:
                return fmt
        return None

    def check_tools(self, tools, documents) -> None:
        """EdgeVLMError unless this template can render these tools and documents and its model's
        tool calls can be parsed."""
        if tools and self.tool_format is None:
            why = ("its tool-call syntax is not one edge-vlm parses (known: "
                   + ", ".join(t.opening for t in TOOL_CALL_SYNTAX.values()) + ")") if self.takes_tools \
                else "it has no tool format"
            raise EdgeVLMError(f"this model's chat template ({self.name}) cannot take tools: {why}")
        if documents and not self.takes_documents:
            raise EdgeVLMError(f"this model's chat template ({self.name}) has no place for context documents "
                               "(Nemovision's <context> block)")

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools=None, documents=None) -> str:
        extra = {}
        if tools:
            extra["tools"] = list(tools)
        if documents:
            extra["documents"] = list(documents)
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token, **extra)

    def continuation(self, history: list[dict], user, tools=None, documents=None) -> str:
        """Text that follows the last assistant answer in `history` when `user` (one message, or a
        list: tool results, then perhaps a user message) speaks next.

        Renders the conversation with a sentinel in place of the last answer and keeps what
        follows it; the answer's own tokens are already in the KV cache.
        """
        assert history and history[-1]["role"] == "assistant"
        new = [user] if isinstance(user, dict) else list(user)
        marked = history[:-1] + [{"role": "assistant", "content": ANSWER_SENTINEL}] + new
        text = self.render(marked, add_generation_prompt=True, tools=tools, documents=documents)
        at = text.rfind(ANSWER_SENTINEL)
        if at < 0:
            raise ValueError(f"chat template {self.name!r} drops earlier answers; cannot continue a chat")
        return text[at + len(ANSWER_SENTINEL):]


def default_template_name(llm_arch: str, tokenizer) -> str:
    """Pick a built-in template when the checkpoint carries none."""
    if llm_arch == "nemotron":
        return "nemovision"
    if tokenizer.token_to_id("<|eot_id|>") is not None:
        return "llama_3"
    if tokenizer.token_to_id("<|im_start|>") is not None:
        return "chatml"
    return "vicuna_v1"
