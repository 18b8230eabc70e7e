"""Function calling and RAG context: templates, parsing, and the session round trip.

Nemovision's expected strings are written by hand from its model card's prompt format
(NGC catalog, "Nemovision-4B-Instruct", Prompt Format -> "Multi-Turn or Few-shot"; the same
block is the "Tool use" format of the Nemotron-Mini-4B-Instruct card on Hugging Face, its LLM):

    <extra_id_0>System
    {system prompt}

    <tool> ... </tool>
    <context> ... </context>

    <extra_id_1>User
    {prompt}
    <extra_id_1>Assistant
    <toolcall> ... </toolcall>
    <extra_id_1>Tool
    {tool response}
    <extra_id_1>Assistant\\n

What stands for "..." is not spelled out there: a tool is its OpenAI spec as JSON (what NVIDIA's
Jinja template for this family writes with `tool|tojson`), a call `{"name": ..., "arguments": {...}}`
(what the model writes). Qwen2-style templates are checked through a tiny template of our own
written in the layout of Qwen2.5's published one (tools in the system turn, `<tool_call>` blocks,
results in `<tool_response>` blocks of one user turn).
"""

from __future__ import annotations

import json

import pytest

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.text.templates import ChatTemplate
from edge_vlm.errors import EdgeVLMError
from edge_vlm.session import Message
from edge_vlm.text.tools import parse_tool_calls, result_text, tool_call, tool_spec, tool_specs
from tests.apps.test_server_support import Scripted

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", '
                '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}')
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TIME_JSON = '{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}'
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


# ---- Nemovision, character for character from the card -------------------------------------

def test_nemovision_tools_context_call_and_result_render_as_the_card_shows():
    t = ChatTemplate.builtin("nemovision")
    msgs = [{"role": "system", "content": "You help travellers."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
    got = t.render(msgs, tools=[WEATHER, TIME], documents=[{"text": "Paris is in France."}, {"text": "It is May."}])
    assert got == (
        "<extra_id_0>System\n"
        "You help travellers.\n"
        "\n"
        "<tool> " + WEATHER_JSON + " </tool>\n"
        "<tool> " + TIME_JSON + " </tool>\n"
        "<context> Paris is in France. </context>\n"
        "<context> It is May. </context>\n"
        "\n"
        "<extra_id_1>User\n"
        "Weather in Paris?\n"
        "<extra_id_1>Assistant\n"
        '<toolcall> {"name": "get_weather", "arguments": {"city": "Paris"}} </toolcall>\n'
        "<extra_id_1>Tool\n"
        '{"temp_c": 21}\n'
        "<extra_id_1>Assistant\n")


def test_nemovision_context_alone_and_several_calls():
    t = ChatTemplate.builtin("nemovision")
    assert t.render([{"role": "user", "content": "When does it open?"}], documents=[{"text": "Opens at 9."}]) == (
        "<extra_id_0>System\n"
        "<context> Opens at 9. </context>\n"
        "\n"
        "<extra_id_1>User\n"
        "When does it open?\n"
        "<extra_id_1>Assistant\n")
    two = [CALL, {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]
    got = t.render([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Looking.", "tool_calls": two},
                    {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "noon"}],
                   tools=[WEATHER, TIME], add_generation_prompt=False)
    assert got.endswith(
        "<extra_id_1>User\nQ\n"
        "<extra_id_1>Assistant\nLooking.\n"
        '<toolcall> {"name": "get_weather", "arguments": {"city": "Paris"}} </toolcall>\n'
        '<toolcall> {"name": "get_time", "arguments": {}} </toolcall>\n'
        "<extra_id_1>Tool\nsunny\n<extra_id_1>Tool\nnoon\n")


def test_continuation_of_tool_results_equals_the_full_render():
    t = ChatTemplate.builtin("nemovision")
    kw = {"tools": [WEATHER], "documents": [{"text": "D"}]}
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
               {"role": "assistant", "content": '<toolcall> {"name": "get_weather", "arguments": {}} </toolcall>'}]
    results = [{"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}]
    full = t.render(history + results, **kw)
    assert full.endswith(history[-1]["content"] + t.continuation(history, results, **kw))
    assert t.continuation(history, results, **kw) == "\n<extra_id_1>Tool\nr1\n<extra_id_1>Tool\nr2\n<extra_id_1>Assistant\n"


# ---- a Qwen2-style checkpoint template -----------------------------------------------------

QWEN_STYLE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' + (messages[0].content if messages[0].role == 'system' else 'You are helpful.') }}"
    "{{- '\\n\\n# Tools\\nCall functions inside <tool_call></tool_call> tags. They are:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tc in message.tool_calls %}{%- if tc.function is defined %}{%- set tc = tc.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tc.name + '\", \"arguments\": ' + (tc.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_qwen2_style_template_renders_tools_calls_and_results():
    t = ChatTemplate(QWEN_STYLE)
    assert t.takes_tools and t.tool_format == "hermes" and not t.takes_documents
    msgs = [{"role": "user", "content": "Weather <in> Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "content": "21 C"}, {"role": "tool", "content": "dry"}]
    assert t.render(msgs, tools=[WEATHER]) == (
        "<|im_start|>system\nYou are helpful.\n\n# Tools\nCall functions inside <tool_call></tool_call> tags. "
        "They are:\n<tools>\n" + WEATHER_JSON + "\n</tools><|im_end|>\n"
        "<|im_start|>user\nWeather <in> Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\ndry\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_models_without_a_tool_format_say_so():
    for name in ("vicuna_v1", "llama_3", "chatml"):
        t = ChatTemplate.builtin(name)
        with pytest.raises(EdgeVLMError, match="cannot take tools: it has no tool format"):
            t.check_tools([WEATHER], [])
        with pytest.raises(EdgeVLMError, match="no place for context"):
            t.check_tools([], [{"text": "d"}])
    odd = ChatTemplate("{% for t in tools %}{{ t | tojson }}{% endfor %}{{ messages[-1].content }}")
    with pytest.raises(EdgeVLMError, match="tool-call syntax is not one edge-vlm parses"):
        odd.check_tools([WEATHER], [])
    ChatTemplate(QWEN_STYLE).check_tools([WEATHER], [])  # fine
    with pytest.raises(EdgeVLMError, match="no place for context"):
        ChatTemplate(QWEN_STYLE).check_tools([WEATHER], [{"text": "d"}])


# ---- parsing and specs -----------------------------------------------------------------------

def test_parse_well_formed_calls_in_each_format():
    left, calls = parse_tool_calls('<toolcall> {"name": "get_weather", "arguments": {"city": "Paris"}} </toolcall>',
                                   "nemovision")
    assert left == "" and len(calls) == 1
    c = calls[0]
    assert c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) > 10
    assert c["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    left, calls = parse_tool_calls('Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
                                   "hermes")
    assert left == "Let me check." and [c["function"] for c in calls] == [{"name": "get_time", "arguments": "{}"}]


def test_parse_several_calls_and_the_spellings_models_use():
    text = ('<toolcall> {"name": "a", "arguments": {"x": 1}} </toolcall>\n'
            '<toolcall> [{"name": "b", "parameters": {"y": "é"}}, {"name": "c", "arguments": "{\\"z\\": [1, 2]}"}] </toolcall>')
    left, calls = parse_tool_calls(text, "nemovision")
    assert left == ""
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("a", {"x": 1}), ("b", {"y": "é"}), ("c", {"z": [1, 2]})]
    assert len({c["id"] for c in calls}) == 3


@pytest.mark.parametrize("text", [
    '<toolcall> {"name": "a", "arguments": {"x": 1} </toolcall>',  # bad JSON
    '<toolcall> {"arguments": {"x": 1}} </toolcall>',  # no name
    '<toolcall> {"name": "a", "arguments": [1]} </toolcall>',  # arguments not an object
    '<toolcall> {"name": "a", "arguments": {"x": 1}}',  # never closed (cut by max_tokens)
    'I would call {"name": "a"} but there is no tag.',
    '<tool_call>{"name": "a", "arguments": {}}</tool_call>',  # another model's syntax
])
def test_malformed_calls_stay_text_with_no_call(text):
    assert parse_tool_calls(text, "nemovision") == (text, [])


def test_a_malformed_block_beside_a_good_one_stays_in_the_text():
    bad = '<toolcall> {"name": } </toolcall>'
    left, calls = parse_tool_calls(f'<toolcall> {{"name": "a", "arguments": {{}}}} </toolcall> {bad}', "nemovision")
    assert left == bad and [c["function"]["name"] for c in calls] == ["a"]


def test_tool_specs_are_checked_and_in_openais_shape():
    assert tool_spec({"name": "f", "description": "d"}) == {
        "type": "function", "function": {"name": "f", "description": "d",
                                         "parameters": {"type": "object", "properties": {}}}}
    assert tool_spec(WEATHER) == WEATHER
    for bad, words in [({"type": "retrieval"}, "must be"), ({"function": {"name": "has space"}}, "tool name"),
                       ({"function": {"name": "f", "parameters": "x"}}, "JSON schema"), ("f", "must be a dict")]:
        with pytest.raises(EdgeVLMError, match=words):
            tool_spec(bad)
    with pytest.raises(EdgeVLMError, match="unique"):
        tool_specs([WEATHER, WEATHER])
    assert result_text({"temp_c": 21, "sky": "clair"}) == '{"temp_c": 21, "sky": "clair"}'
    assert result_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "ab"
    assert tool_call("f", {"a": 1}, "call_x") == {"id": "call_x", "type": "function",
                                                   "function": {"name": "f", "arguments": '{"a": 1}'}}


# ---- the session round trip on the tiny Nemotron LLaVA (nemovision template) -----------------

GREEDY = GenerationConfig(max_new_tokens=200, temperature=0)
SYSTEM = "You help travellers."
ANSWER = '<toolcall> {"name": "get_weather", "arguments": {"city": "Paris"}} </toolcall>'
# The whole prompt of the tool turn, written from the card.
TOOL_TURN_PROMPT = (
    "<extra_id_0>System\nYou help travellers.\n\n<tool> " + WEATHER_JSON + " </tool>\n"
    "<context> Paris is in France. </context>\n\n"
    "<extra_id_1>User\nWeather in Paris?\n<extra_id_1>Assistant\n" + ANSWER + "\n"
    '<extra_id_1>Tool\n{"temp_c": 21}\n<extra_id_1>Assistant\n')


@pytest.fixture(scope="module")
def nemo(tiny_llava):
    return load_model(tiny_llava, device="cpu", progress=False)


def Recorder(session, script: list[int] | None = None) -> Scripted:  # noqa: N802 - reads as the class it makes
    """Records every token the session's engine is fed; with `script`, greedy decoding writes those
    tokens (a random tiny model cannot be made to call a tool by itself)."""
    return Scripted(session.engine, script)


def test_session_round_trip_feeds_the_card_format_and_parses_the_call(nemo):
    tok = nemo.tokenizer
    session = ChatSession(nemo, system=SYSTEM, tools=[WEATHER], context="Paris is in France.")
    rec = Recorder(session, tok.encode(ANSWER) + [tok.token_to_id("</s>")])
    text = session.answer("Weather in Paris?", gen=GREEDY)
    assert text == ANSWER and session.stats.stop_reason != "length"
    calls = session.tool_calls
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    assert session.reply == {"role": "assistant", "content": None, "tool_calls": calls}
    with pytest.raises(EdgeVLMError, match="no tool call 'get_time'"):
        session.tool_result("get_time", "x")
    session.tool_result("get_weather", {"temp_c": 21})
    position = session.position
    rec.script = [tok.token_to_id("</s>")]  # the model answers the result at once (empty answer)
    "".join(session.resume(gen=GREEDY))
    assert rec.fed == tok.encode(TOOL_TURN_PROMPT)  # every token the engine got, as the card writes them
    assert session.tool_calls == [] and session.reply == {"role": "assistant", "content": ""}
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]

    # The same conversation as OpenAI messages (the server's shape): a session already holding it
    # runs only the tool turn; a fresh one prefills the whole and feeds the same tokens.
    conv = [Message("system", SYSTEM), Message("user", "Weather in Paris?"),
            Message("assistant", None, tool_calls=calls),
            Message("tool", '{"temp_c": 21}', tool_call_id=calls[0]["id"])]
    session.rewind(1)
    assert session.position == position
    "".join(session.chat(conv, gen=GREEDY))
    assert session.stats.cached_prompt_tokens == position
    fresh = ChatSession(nemo)
    rec2 = Recorder(fresh)
    "".join(fresh.chat(conv, gen=GenerationConfig(max_new_tokens=3, temperature=0), tools=[WEATHER],
                       context=["Paris is in France."]))
    want = tok.encode(TOOL_TURN_PROMPT)
    assert rec2.fed[:len(want)] == want and len(rec2.fed) == len(want) + 2  # then 2 of the 3 answer tokens
    assert fresh.stats.cached_prompt_tokens == 0
    # tools or context that differ start over; a call id the session never gave does too
    "".join(fresh.chat(conv, gen=GREEDY, tools=[WEATHER, TIME], context=["Paris is in France."]))
    assert fresh.stats.cached_prompt_tokens == 0 and fresh.tools == [WEATHER, TIME]


def test_regenerate_and_rewind_keep_tool_turns(nemo):
    tok = nemo.tokenizer
    session = ChatSession(nemo, tools=[WEATHER])
    rec = Recorder(session, tok.encode(ANSWER) + [tok.token_to_id("</s>")])
    session.answer("Weather in Paris?", gen=GREEDY)
    session.tool_result(session.tool_calls[0]["id"], "21 C")
    answer = "".join(session.resume(gen=GenerationConfig(max_new_tokens=4, temperature=0)))
    position = session.position
    again = "".join(session.regenerate(gen=GenerationConfig(max_new_tokens=4, temperature=0)))
    assert again == answer and session.position == position
    assert session.turns[-1].question is None and session.turns[-1].tool_results[0]["content"] == "21 C"
    with pytest.raises(EdgeVLMError, match="no tool results to answer"):
        session.resume()
    assert rec.fed  # the engine ran


def test_sessions_refuse_what_the_model_cannot_render(tiny_vila, tmp_path):
    vila = load_model(tiny_vila, device="cpu", progress=False)  # vicuna_v1: no tool format
    with pytest.raises(EdgeVLMError, match="cannot take tools"):
        ChatSession(vila, tools=[WEATHER])
    with pytest.raises(EdgeVLMError, match="no place for context"):
        ChatSession(vila, context="doc")
    s = ChatSession(vila)
    for bad, words in [([Message("user", "a"), Message("tool", "r")], "before the user's message"),
                       ([Message("tool", "r")], "tool_call_id"),
                       ([Message("critic", "r"), Message("user", "q")], "unknown message role"),
                       ([Message("user", "q"), Message("assistant", None, tool_calls=[CALL]),
                         Message("tool", "r", tool_call_id="call_1")], "cannot take tools")]:
        with pytest.raises(EdgeVLMError, match=words):
            s.chat(bad)
    with pytest.raises(EdgeVLMError, match="called no tools"):
        s.tool_result("x", "y")


def test_qwen2_style_checkpoint_session_prompt(tmp_path):
    """A text-only Qwen2 checkpoint whose own Jinja template takes tools: the first prompt is that
    template's text, and a `<tool_call>` answer parses."""
    from tests.factories import make_llm

    make_llm(tmp_path / "qwen", "qwen2", chat_template=QWEN_STYLE)
    model = load_model(tmp_path / "qwen", device="cpu", progress=False)
    tok = model.tokenizer
    session = ChatSession(model, tools=[WEATHER])
    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    rec = Recorder(session, tok.encode(answer) + [tok.token_to_id("</s>")])
    assert session.answer("Weather?", gen=GREEDY) == answer
    assert rec.fed[:len(tok.encode("<|im_start|>system"))] == tok.encode("<|im_start|>system")
    assert tok.decode(rec.fed, skip_special=False) == (
        "<|im_start|>system\nYou are helpful.\n\n# Tools\nCall functions inside <tool_call></tool_call> tags. "
        "They are:\n<tools>\n" + WEATHER_JSON + "\n</tools><|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n" + answer)
    assert [c["function"]["name"] for c in session.tool_calls] == ["get_weather"]
    session.tool_result("get_weather", "21 C")
    rec.script = [tok.token_to_id("</s>")]
    "".join(session.resume(gen=GREEDY))
    assert tok.decode(rec.fed, skip_special=False).endswith(
        answer + "<|im_end|>\n<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
