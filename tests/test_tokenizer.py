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
