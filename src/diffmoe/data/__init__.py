"""Data: documents in, tokenizer, similarity ordering, packing, token shards on disk, mixtures.

Typical use::

    from diffmoe.data import PrepareConfig, prepare, PackedDataset, load_tokenizer

    prepare("my_docs/", "data/", PrepareConfig(context_len=512))        # or: diffmoe prepare ...
    train = PackedDataset("data/", split="train")   # item: input_ids / labels int64 [512], domain
    tokenizer = load_tokenizer("data/")

See docs/data.md for the inputs, the engine, the ordering algorithm, mixtures and the built-in corpus.
"""

from .builtin import BuiltinCorpusConfig, build_builtin_corpus
from .config import OrderingConfig, PrepareConfig
from .dataset import PackedDataset
from .engine import EngineConfig
from .errors import DataError
from .order import similarity_walk
from .prepare import PrepareResult, prepare
from .readers import Corpus, Document, ReadOptions
from .store import read_manifest
from .tokenizer import TokenizerConfig, load_tokenizer

__all__ = [
    "BuiltinCorpusConfig",
    "Corpus",
    "DataError",
    "Document",
    "EngineConfig",
    "OrderingConfig",
    "PackedDataset",
    "PrepareConfig",
    "PrepareResult",
    "ReadOptions",
    "TokenizerConfig",
    "build_builtin_corpus",
    "load_tokenizer",
    "prepare",
    "read_manifest",
    "similarity_walk",
]
