"""Reading a prepared dataset: ``PackedDataset``, the memory-mapped rows of one split (layout:
:mod:`diffmoe.data.store`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .store import MANIFEST, SPLITS, read_manifest, sha256_file


class PackedDataset(torch.utils.data.Dataset):
    """The rows of one split of a prepared dataset, memory-mapped.

    ``dataset[i]`` is a dict:
      - ``input_ids``: int64 [context_len], the row without its last token;
      - ``labels``: int64 [context_len], the row without its first token (next-token targets);
      - ``domain``: int64 [] (scalar), index into ``domains`` of the domain with most tokens in the row.

    ``domain_tokens`` (uint32 [rows, num_domains], memory-mapped) gives the full domain mix of each row.
    Train rows are shuffled; held-out rows are grouped by domain (in ``domains`` order), so all but at
    most ``num_domains - 1`` of them hold a single domain (see :meth:`rows_of_domain`).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", verify: bool = False):
        if split not in SPLITS:
            raise DataError(f"invalid split={split!r}: choose one of {', '.join(SPLITS)}")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.split = split
        info = self.manifest["splits"][split]
        self.domains: list[str] = self.manifest["domains"]
        self.context_len: int = self.manifest["context_len"]
        self.row_len: int = self.manifest["row_len"]
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        self.eod_id: int = self.manifest["tokenizer"]["eod_id"]
        if verify:
            self.verify()
        self._shards = [self._open_shard(entry) for entry in info["shards"]]
        self._offsets = np.cumsum([0] + [len(s) for s in self._shards])
        self.domain_tokens = self._load_array(info["domain_tokens_file"], mmap=True)
        if len(self.domain_tokens) != len(self):
            raise DataError(
                f"{self.path}: {info['domain_tokens_file']} has {len(self.domain_tokens)} rows, the shards {len(self)}"
            )

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn pickle the dataset: send paths, not the mapped arrays.
        return {k: v for k, v in self.__dict__.items() if k not in ("_shards", "domain_tokens")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        info = self.manifest["splits"][self.split]
        self._shards = [self._open_shard(entry) for entry in info["shards"]]
        self.domain_tokens = self._load_array(info["domain_tokens_file"], mmap=True)

    def _open_shard(self, entry: dict) -> np.ndarray:
        rows = self._load_array(entry["file"], mmap=True)
        if rows.shape != (entry["rows"], self.row_len):
            raise DataError(
                f"{self.path / entry['file']}: shape {rows.shape}, the manifest says ({entry['rows']}, {self.row_len})"
            )
        return rows

    def _load_array(self, name: str, mmap: bool = False) -> np.ndarray:
        file = self.path / name
        try:
            return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{file}: missing or unreadable ({e})") from None

    def verify(self) -> None:
        """Check every file against the manifest's sha256; :class:`DataError` names the first mismatch."""
        for name, digest in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise DataError(f"{file}: missing (listed in {MANIFEST})")
            if sha256_file(file) != digest:
                raise DataError(f"{file}: checksum differs from {MANIFEST}: the dataset was modified")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def row(self, index: int) -> np.ndarray:
        """Raw tokens of row ``index``: [row_len] in the dataset dtype (a view, no copy)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        index %= len(self)
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._shards[shard][index - self._offsets[shard]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(self.row(index).astype(np.int64))
        return {
            "input_ids": tokens[:-1],
            "labels": tokens[1:],
            "domain": torch.tensor(int(np.argmax(self.domain_tokens[index]))),
        }

    def rows_of_domain(self, domain: str, pure: bool = True) -> np.ndarray:
        """int64 indices of the rows whose tokens all come from ``domain`` (``pure``), or whose
        majority domain it is."""
        if domain not in self.domains:
            raise DataError(f"unknown domain {domain!r}: this dataset has {', '.join(self.domains)}")
        d = self.domains.index(domain)
        if pure:
            return np.flatnonzero(self.domain_tokens[:, d] == self.domain_tokens.sum(axis=1))
        return np.flatnonzero(np.argmax(self.domain_tokens, axis=1) == d)
