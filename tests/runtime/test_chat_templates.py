"""Chat templates render the documented formats, and continuing a chat renders exactly the
text that a full re-render would add after the answer (so KV-cache reuse feeds the same prompt)."""

from __future__ import annotations

import pytest

from edge_vlm.text.templates import BUILTIN_TEMPLATES, ChatTemplate, default_template_name
from edge_vlm.text.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<image>\nWhat is this?"},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What colour?"},
]


def test_nemovision_format():
    """As the Nemovision-4B-Instruct card writes it: a blank line after the system prompt."""
    t = ChatTemplate.builtin("nemovision")
    assert t.render(CONVERSATION[:2]) == (
        "<extra_id_0>System\nBe brief.\n\n<extra_id_1>User\n<image>\nWhat is this?\n<extra_id_1>Assistant\n")


def test_vicuna_v1_format_matches_vila():
    t = ChatTemplate.builtin("vicuna_v1", bos_token="<s>")
    assert t.render(CONVERSATION[1:]) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
        "USER: What colour? ASSISTANT:")


def test_llama_3_format():
    t = ChatTemplate.builtin("llama_3")
    assert t.render(CONVERSATION[:2]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


SMOL_STYLE = (  # a checkpoint's own template in HF style (ChatML with a default system prompt)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", [ChatTemplate.builtin(n, "<s>", "</s>") for n in BUILTIN_TEMPLATES]
                         + [ChatTemplate(SMOL_STYLE)], ids=list(BUILTIN_TEMPLATES) + ["checkpoint"])
@pytest.mark.parametrize("with_system", [True, False])
def test_continuation_equals_full_render(template, with_system):
    conv = CONVERSATION if with_system else CONVERSATION[1:]
    first = template.render(conv[:-2])
    rest = template.continuation(conv[:-1], conv[-1])
    full = template.render(conv)
    # vicuna_v1 puts a space between "ASSISTANT:" and the answer: the model generates it as part
    # of its first token, so only whitespace may stand between the prompt and the answer.
    assert full.startswith(first) and full.endswith(rest)
    assert full[len(first):len(full) - len(rest)].strip() == conv[-2]["content"]


def test_checkpoint_template_is_used_and_builtin_chosen_otherwise(tmp_path):
    from tests.factories import train_tokenizer

    train_tokenizer(tmp_path / "a", chat_template=SMOL_STYLE)
    tok = Tokenizer(tmp_path / "a")
    assert tok.chat_template == SMOL_STYLE
    assert default_template_name("nemotron", tok) == "nemovision"
    assert default_template_name("llama", tok) == "llama_3"  # the tokenizer knows <|eot_id|>


def test_template_that_drops_history_is_refused():
    t = ChatTemplate("{{ messages[-1]['content'] }}")
    with pytest.raises(ValueError, match="drops earlier answers"):
        t.continuation(CONVERSATION[1:3], CONVERSATION[3])
