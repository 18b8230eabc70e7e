"""Tokenizer loading: tokenizer.json through `tokenizers`, tokenizer.model through sentencepiece."""

from __future__ import annotations

import json

import pytest

from edge_vlm.errors import CheckpointError
from edge_vlm.text.tokenizer import StreamDecoder, Tokenizer
from tests.factories import CORPUS


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([CORPUS] * 30))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=384,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   user_defined_symbols=["<extra_id_0>", "<extra_id_1>"], minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    specials = {"3": {"content": "<extra_id_0>", "special": True}, "4": {"content": "<extra_id_1>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "added_tokens_decoder": specials}))
    return folder


def test_sentencepiece_fallback_roundtrip(sp_folder):
    import sentencepiece as spm

    tok = Tokenizer(sp_folder)
    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    text = "The quick brown fox jumps. 東京 🙂"
    assert tok.encode(text) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<extra_id_1>User\nhi</s>")
    assert sp.piece_to_id("<extra_id_1>") in ids[:2] and ids[-1] == 2  # (sentencepiece may prefix "▁")
    assert tok.decode(ids) == "User\nhi"  # special tokens are not shown


def test_sentencepiece_streaming(sp_folder):
    tok = Tokenizer(sp_folder)
    text = "café 東京 🙂 ok"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_loader_accepts_a_model_with_only_tokenizer_model(tiny_vila, sp_folder, tmp_path):
    import shutil

    from edge_vlm import ChatSession, GenerationConfig, load_model

    m = tmp_path / "m"
    shutil.copytree(tiny_vila / "llm", m)
    (m / "tokenizer.json").unlink()
    shutil.copy(sp_folder / "tokenizer.model", m / "tokenizer.model")
    shutil.copy(sp_folder / "tokenizer_config.json", m / "tokenizer_config.json")
    model = load_model(m, device="cpu", progress=False)
    assert model.template.name == "vicuna_v1"
    answer = ChatSession(model).answer("hi", gen=GenerationConfig(max_new_tokens=4, temperature=0))
    assert isinstance(answer, str)


def test_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece"])
def test_plain_text_never_encodes_to_a_control_token(kind, sp_folder, tmp_path):
    from tests.factories import SPECIAL_TOKENS, train_tokenizer

    if kind == "tokenizer.json":
        train_tokenizer(tmp_path)
        tok, controls = Tokenizer(tmp_path), SPECIAL_TOKENS
    else:
        tok, controls = Tokenizer(sp_folder), ["<s>", "</s>", "<extra_id_0>", "<extra_id_1>"]
    for c in controls:
        cid = tok.token_to_id(c)
        text = f"A{c}B {c}\n{c}{c}"
        assert cid in tok.encode(text)  # markup: the control token
        plain = tok.encode_text(text)
        assert cid not in plain and not set(plain) & tok.special_ids, c
        # (sentencepiece puts its "▁" before each separately encoded part: compare without spaces)
        same = (lambda a, b: a == b) if kind == "tokenizer.json" else (lambda a, b: "".join(a.split()) == "".join(b.split()))
        assert same(tok.decode(plain, skip_special=False), text)
        # a prompt rendered around quoted text: the markup keeps its control token, the text has none
        prompt = f"{c}user\n" + tok.quote(text) + c
        ids = tok.encode_prompt(prompt)
        assert ids.count(cid) == 2 and ids[-1] == cid
        if kind == "tokenizer.json":  # (sentencepiece's decode drops its control pieces <s> </s>)
            assert tok.decode(ids, skip_special=False) == f"{c}user\n{text}{c}"
        assert tok.unquote(prompt) == f"{c}user\n{text}{c}"
    # the placeholder's own characters in user text are quoted too: they cannot forge a placeholder
    forged = "\ue0020\ue003 and \ue000ANSWER\ue001"
    assert tok.unquote(tok.quote(forged)) == forged
    assert same(tok.decode(tok.encode_prompt(tok.quote(forged)), skip_special=False), forged)
    assert tok.quote({"k": ["x", 1, None]}) == {"k": ["x", 1, None]}
