"""Text in and out of the language model: the tokenizer (user text never becomes control tokens),
chat templates (the checkpoint's own or a built-in, and the tool-call syntaxes), tool calls,
constrained decoding (a token mask from a JSON schema or a list of choices) and the sampler.
Works on tokens and logits only, never on a model.

May import `edge_vlm.errors` and `edge_vlm.contracts`; nothing above (tests/runtime/test_layout.py).
"""
