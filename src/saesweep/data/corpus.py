"""Documents cut into token rows for a Hugging Face causal language model.

Conventions (the activations of :mod:`.lm` follow them):

* **Token rows.** Documents are concatenated into one stream and cut into rows of exactly
  ``context_length`` ids. A text document is tokenised without special tokens and preceded by
  the model's BOS id (EOS when it has no BOS), its document separator. Pre-tokenised
  ``input_ids`` rows (used whenever that column exists) are concatenated as they are: they
  carry their own separators (the stories260K rows hold BOS = 1 at each story start). With
  ``prepend_bos`` a row is ``[BOS] + the next context_length - 1 stream ids``, and a BOS that
  would directly follow the prepended one is dropped from the stream, so a row never starts
  ``BOS BOS``: data that already starts with BOS is not doubled.
* **Held-out rows** come from ``eval_split`` when the dataset has that split. Otherwise they
  come from the end of ``split``: its last documents, read backwards, and training stops
  before the first of them (for a streamed hub dataset without that split: its last data
  file, and training reads the others; a split of one file is downloaded whole). Held-out
  and training rows never share a document.
* **Data sources.** ``source.dataset`` is a hub name (streamed: only the rows needed are
  read), a local folder (``save_to_disk`` output, or data files whose names give the splits,
  e.g. ``train.parquet`` + ``validation.parquet``), or comma-separated ``.parquet`` /
  ``.jsonl`` / ``.json`` / ``.txt`` files (a .txt line is a document), which together form
  the split ``split`` (no eval split). Local data is read through ``datasets`` (an Arrow copy goes to
  ``<cache>/datasets``); rows are read and tokenised lazily, in batches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from saesweep.errors import ConfigError
from saesweep.config.experiment import HFSource
from saesweep.data.hf import (
    DATA_BUILDERS,
    bos_id,
    check_source,
    dataset_files,
    load_tokenizer,
    looks_local,
    quiet_hf,
    separator_id,
)


_DOC_BATCH = 256  # documents read and tokenised at a time


class _Docs:
    """One split of a dataset: documents as id arrays, read in order or backwards, in batches."""

    def __init__(self, data: Any, source: HFSource, where: str) -> None:
        self.data = data
        self.random_access = hasattr(data, "__getitem__") and hasattr(data, "__len__")
        columns = list(data.column_names or [])
        if not columns and not self.random_access:  # a stream without declared features
            first = next(iter(data.take(1)), None)
            columns = list(first) if first else []
        if "input_ids" in columns:
            self.column, self.is_text = "input_ids", False
        elif source.text_column in columns:
            self.column, self.is_text = source.text_column, True
        else:
            raise ConfigError(
                f"source.text_column: {where} has no column {source.text_column!r} and no 'input_ids' "
                f"(columns: {', '.join(columns) or 'none'})"
            )
        if self.random_access:  # read only the column used
            self.data = data.select_columns([self.column])
        self.where = where
        self.tokenizer: Any = None
        self.separator: Optional[int] = None
        self.vocab_size: Optional[int] = None

    def __len__(self) -> int:
        return len(self.data)

    def _ids(self, docs: list) -> list[np.ndarray]:
        if self.is_text:
            enc = self.tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
            sep = [] if self.separator is None else [self.separator]
            return [np.asarray(sep + list(ids), dtype=np.int64) for ids in enc]
        out = [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]
        if self.vocab_size is not None:
            for o in out:
                if o.size and (o.min() < 0 or o.max() >= self.vocab_size):
                    raise ConfigError(
                        f"source.dataset: {self.where} holds token id {int(o.max())} outside the model's "
                        f"vocabulary (size {self.vocab_size})"
                    )
        return out

    def forward(self, stop: Optional[int] = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, ids)`` of documents 0, 1, ... (up to ``stop``, exclusive)."""
        if self.random_access:
            stop = len(self.data) if stop is None else stop
            for i in range(0, stop, _DOC_BATCH):
                yield from self._indexed(i, list(self.data[i : min(stop, i + _DOC_BATCH)][self.column]))
        else:
            i = 0
            for batch in self.data.iter(batch_size=_DOC_BATCH):
                yield from self._indexed(i, list(batch[self.column]))
                i += len(batch[self.column])

    def _indexed(self, first: int, docs: list) -> Iterator[tuple[int, np.ndarray]]:
        keep = [(first + j, d) for j, d in enumerate(docs) if d is not None and len(d) > 0]
        ids = self._ids([d for _, d in keep])
        for (i, _), a in zip(keep, ids):
            yield i, a

    def backward(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, ids)`` of the last document, the one before, ... (random access only)."""
        for j in range(len(self.data), 0, -_DOC_BATCH):
            lo = max(0, j - _DOC_BATCH)
            docs = list(self.data[lo:j][self.column])
            yield from reversed(list(self._indexed(lo, docs)))


def _chunk(docs: Iterable[tuple[int, np.ndarray]], ctx: int, bos: Optional[int]) -> Iterator[tuple[np.ndarray, int]]:
    """Rows of ``ctx`` ids from a document stream, each with the index of the last document used."""
    body = ctx - 1 if bos is not None else ctx
    pending = np.empty(0, dtype=np.int64)
    for idx, ids in docs:
        pending = np.concatenate([pending, ids]) if pending.size else ids
        while True:
            if bos is not None and pending.size and pending[0] == bos:
                pending = pending[1:]
            if pending.size < body:
                break
            row = pending[:body]
            if bos is not None:
                row = np.concatenate([np.array([bos], dtype=np.int64), row])
            pending = pending[body:]
            yield row, idx


def _open_splits(source: HFSource, datasets_cache: Optional[Path], streaming: Optional[bool]) -> tuple[Any, Any, str]:
    """``(train data, held-out data or None, description of the held-out rows)``."""
    import datasets

    cache = str(datasets_cache) if datasets_cache else None
    files = dataset_files(source.dataset)
    if files is not None:
        builder = DATA_BUILDERS[files[0].suffix.lower()]
        data = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=cache)
        return data, None, f"the end of {source.dataset}"
    local = looks_local(source.dataset)
    path = str(Path(source.dataset).expanduser()) if local else source.dataset
    if local and any((Path(path) / f).exists() for f in ("dataset_dict.json", "state.json")):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.Dataset):
            return loaded, None, f"the end of {source.dataset}"
        splits = dict(loaded)
    else:
        stream = (not local) if streaming is None else streaming
        try:
            splits = dict(datasets.load_dataset(path, streaming=stream, cache_dir=cache))
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"source.dataset: cannot open {source.dataset!r} ({first})") from None
    if source.split not in splits:
        raise ConfigError(f"source.split: {source.dataset} has no split {source.split!r} (splits: {', '.join(splits)})")
    train = splits[source.split]
    if source.eval_split and source.eval_split in splits and source.eval_split != source.split:
        return train, splits[source.eval_split], f"split {source.eval_split!r}"
    if isinstance(train, datasets.IterableDataset):
        n = train.num_shards
        if n > 1:  # hold out the last data file; train on the others
            heldout = train.shard(num_shards=n, index=n - 1)
            rest = datasets.concatenate_datasets([train.shard(num_shards=n, index=i) for i in range(n - 1)])
            return rest, heldout, f"the last data file of split {source.split!r}"
        train = datasets.load_dataset(path, split=source.split, cache_dir=cache)  # one file: read it all
    return train, None, f"the end of split {source.split!r}"


@dataclass
class TokenRows:
    """Held-out token rows (in memory) and a lazy iterator over the training rows."""

    heldout: np.ndarray  # [n_heldout_rows, context_length] int64
    train: Iterator[np.ndarray]  # rows of context_length ids, exactly n_train_rows of them
    heldout_from: str


def token_rows(
    source: HFSource,
    n_train_rows: int,
    n_heldout_rows: int,
    *,
    datasets_cache: Optional[Path] = None,
    streaming: Optional[bool] = None,
    config: Any = None,
) -> TokenRows:
    """Cut the dataset into training and held-out rows of ``context_length`` ids (see module doc).

    Held-out rows are made first, so that training can stop before the first held-out
    document; only the documents needed are read and tokenised.
    """
    config = config if config is not None else check_source(source)
    with quiet_hf():
        train_data, heldout_data, heldout_from = _open_splits(source, datasets_cache, streaming)
    train = _Docs(train_data, source, f"split {source.split!r} of {source.dataset}")
    heldout = _Docs(heldout_data, source, heldout_from) if heldout_data is not None else None
    tokenizer = load_tokenizer(source) if train.is_text or (heldout is not None and heldout.is_text) else None
    for docs in (train, heldout):
        if docs is not None:
            docs.tokenizer, docs.separator = tokenizer, separator_id(config, tokenizer)
            docs.vocab_size = getattr(config, "vocab_size", None)
    bos = bos_id(config, tokenizer) if source.prepend_bos else None
    ctx = source.context_length

    stop: Optional[int] = None
    if heldout is not None:
        rows = [r for r, _ in itertools.islice(_chunk(heldout.forward(), ctx, bos), n_heldout_rows)]
    else:
        rows, stop = [], len(train)
        for r, idx in itertools.islice(_chunk(train.backward(), ctx, bos), n_heldout_rows):
            rows.append(r)
            stop = idx
    if len(rows) < n_heldout_rows:
        raise ConfigError(
            f"source.dataset: {heldout_from} gives only {len(rows)} held-out rows of {ctx} tokens; "
            f"{n_heldout_rows} needed for eval.tokens / eval.ce_tokens"
        )

    def train_rows() -> Iterator[np.ndarray]:
        n = 0
        for r, _ in _chunk(train.forward(stop), ctx, bos):
            if n == n_train_rows:
                return
            yield r
            n += 1
        if n < n_train_rows:
            raise ConfigError(
                f"source.dataset: split {source.split!r} of {source.dataset} gives only {n} training rows of "
                f"{ctx} tokens besides the held-out ones; {n_train_rows} needed for train.tokens"
            )

    return TokenRows(np.stack(rows) if rows else np.empty((0, ctx), np.int64), train_rows(), heldout_from)

