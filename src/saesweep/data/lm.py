"""Residual-stream activations of a Hugging Face causal language model.

Conventions (they hold for training, held-out and spliced metrics alike):

* **Hook point.** ``source.layer`` is the index of the block whose *input* is read
  (``blocks.L.hook_resid_pre`` -> L, ``blocks.L.hook_resid_post`` -> L+1). L = n_layers means
  the output of the last block, i.e. the input of the final norm. Capturing stops the forward
  pass there (a hook raises :class:`_Stop`): later blocks and the LM head never run.
* **Token rows.** Documents are concatenated into one stream and cut into rows of exactly
  ``context_length`` ids. A text document is tokenised without special tokens and preceded by
  the model's BOS id (EOS when it has no BOS), its document separator. Pre-tokenised
  ``input_ids`` rows (used whenever that column exists) are concatenated as they are: they
  carry their own separators (the stories260K rows hold BOS = 1 at each story start). With
  ``prepend_bos`` a row is ``[BOS] + the next context_length - 1 stream ids``, and a BOS that
  would directly follow the prepended one is dropped from the stream, so a row never starts
  ``BOS BOS``: data that already starts with BOS is not doubled.
* **BOS position.** With ``prepend_bos`` position 0 is left out everywhere: it is not a
  training or held-out activation (the same vector in every row, and an outlier), the splice
  leaves it unchanged, and its prediction is not scored. A row then gives
  ``context_length - 1`` activations and ``context_length - 2`` scored predictions
  (``context_length`` and ``context_length - 1`` without ``prepend_bos``).
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

import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from saesweep.config.experiment import ConfigError, ExperimentConfig, HFSource

_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
_DOC_BATCH = 256  # documents read and tokenised at a time


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the hook point."""


# ----------------------------------------------------------------------------- sources
def dataset_files(spec: str) -> Optional[list[Path]]:
    """The files of a comma-separated data-file list, or None when ``spec`` is not one."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if parts and all(Path(p).suffix.lower() in _BUILDERS for p in parts):
        return [Path(p).expanduser() for p in parts]
    return None


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def is_local_dataset(spec: str) -> bool:
    return dataset_files(spec) is not None or _looks_local(spec)


def is_local_model(name: str) -> bool:
    return _looks_local(name)


def num_layers(config: Any) -> int:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    raise ConfigError(f"source.model: cannot tell how many blocks {type(config).__name__} has")


def d_model(config: Any) -> int:
    """The residual-stream width of a model config (``hidden_size``, or GPT-2's ``n_embd``)."""
    for key in ("hidden_size", "d_model", "n_embd"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise ConfigError(f"source.model: cannot tell the residual width of {type(config).__name__}")


def lm_config(source: HFSource) -> Any:
    """The model's ``AutoConfig`` (reads config.json only)."""
    from transformers import AutoConfig

    if is_local_model(source.model) and not Path(source.model).expanduser().is_dir():
        raise ConfigError(f"source.model: no such model folder: {source.model}")
    try:
        kw = {"revision": source.revision} if source.revision else {}
        return AutoConfig.from_pretrained(_model_path(source), **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"source.model: cannot load the config of {source.model!r} ({first})") from None


def check_source(source: HFSource) -> Any:
    """Cheap checks before any work; returns the model config. Raises :class:`ConfigError`."""
    config = lm_config(source)
    n = num_layers(config)
    if not 0 <= source.layer <= n:
        raise ConfigError(
            f"source.hook: {source.hook!r} is out of range for {source.model} ({n} blocks); use "
            f"blocks.L.hook_resid_pre with L in 0..{n} or blocks.L.hook_resid_post with L in 0..{n - 1}"
        )
    files = dataset_files(source.dataset)
    if files is not None:
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"source.dataset: no such file: {', '.join(missing)}")
        kinds = {_BUILDERS[f.suffix.lower()] for f in files}
        if len(kinds) > 1:
            raise ConfigError("source.dataset: the files mix formats; list .parquet or .jsonl/.json or .txt files")
    elif _looks_local(source.dataset) and not Path(source.dataset).expanduser().is_dir():
        raise ConfigError(f"source.dataset: no such file or folder: {source.dataset}")
    if source.prepend_bos and _bos_id(config, None) is None:
        raise ConfigError(f"source.prepend_bos: {source.model} defines no BOS token; set prepend_bos: false")
    return config


def _first_id(value: Any) -> Optional[int]:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _bos_id(config: Any, tokenizer: Any) -> Optional[int]:
    """The model config's ``bos_token_id``, else the tokenizer's."""
    bos = _first_id(getattr(config, "bos_token_id", None))
    if bos is None and tokenizer is not None:
        bos = _first_id(tokenizer.bos_token_id)
    return bos


def _separator_id(config: Any, tokenizer: Any) -> Optional[int]:
    sep = _bos_id(config, tokenizer)
    if sep is None:
        sep = _first_id(getattr(config, "eos_token_id", None))
    if sep is None and tokenizer is not None:
        sep = _first_id(tokenizer.eos_token_id)
    return sep


# ----------------------------------------------------------------------------- model
def _model_path(source: HFSource) -> str:
    return str(Path(source.model).expanduser()) if is_local_model(source.model) else source.model


def load_tokenizer(source: HFSource) -> Any:
    from transformers import AutoTokenizer

    kw = {"revision": source.revision} if source.revision else {}
    try:
        return AutoTokenizer.from_pretrained(_model_path(source), **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"source.model: no usable tokenizer for {source.model!r}, needed for a text dataset ({e})"
        ) from None


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Hide the datasets/transformers progress bars (split generation, weight loading) while
    loading: saesweep shows its own bar for the work that takes time, the activation build."""
    import datasets
    from transformers.utils import logging as tf_logging

    ds_on, tf_on = datasets.utils.logging.is_progress_bar_enabled(), tf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if ds_on:
            datasets.enable_progress_bars()
        if tf_on:
            tf_logging.enable_progress_bar()


def load_lm(source: HFSource, device: str | torch.device = "cpu", *, tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """``(model, tokenizer or None)``: the causal LM in eval mode on ``device`` in ``source.lm_dtype``."""
    from transformers import AutoModelForCausalLM

    kw = {"revision": source.revision} if source.revision else {}
    try:
        with quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(_model_path(source), dtype=getattr(torch, source.lm_dtype), **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"source.model: cannot load {source.model!r} ({e})") from None
    model.eval().requires_grad_(False).to(device)
    return model, (load_tokenizer(source) if tokenizer else None)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the outermost ModuleList of n_layers modules."""
    n = num_layers(model.config)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"source.model: found no list of {n} blocks in {type(model).__name__}")


class Tail:
    """What follows the hook point, for one batch: the blocks from the hook on, called as the
    clean forward called them but for the residual, then the final norm and the unembedding.
    ``residual`` is the clean residual at the hook point."""

    def __init__(self, blocks: list, calls: list, final: Optional[nn.Module], head: nn.Module, residual: Tensor):
        self.blocks, self.calls, self.final, self.head, self.residual = blocks, calls, final, head, residual

    @torch.inference_mode()
    def __call__(self, h: Tensor) -> Tensor:
        for block, (args, kwargs) in zip(self.blocks, self.calls):
            out = block(h, *args[1:], **kwargs) if args else block(**{**kwargs, "hidden_states": h})
            h = out[0] if isinstance(out, tuple) else out
        if self.final is not None:
            h = self.final(h)
        return self.head(h)


class HookedLM:
    """A causal LM with its residual stream at ``layer`` readable and replaceable."""

    def __init__(self, model: nn.Module, layer: int) -> None:
        self.model = model
        self.blocks = find_blocks(model)
        self.n_layers = len(self.blocks)
        if not 0 <= layer <= self.n_layers:
            raise ConfigError(f"source.hook: layer {layer} is not in 0..{self.n_layers}")
        self.layer = layer
        self._tail_ok: Optional[bool] = None  # whether clean_and_tail's shortcut reproduces the model

    @contextlib.contextmanager
    def _hooked(self, fn: Callable[[Tensor], Optional[Tensor]]) -> Iterator[None]:
        """Apply ``fn`` to the residual at the hook point (it may replace it or raise)."""
        if self.layer < self.n_layers:

            def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new,) + tuple(args[1:]), kwargs)
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            handle = self.blocks[self.layer].register_forward_pre_hook(pre, with_kwargs=True)
        else:

            def post(module: nn.Module, args: tuple, out: Any) -> Any:
                h = out[0] if isinstance(out, tuple) else out
                new = fn(h)
                if new is None:
                    return None
                return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

            handle = self.blocks[-1].register_forward_hook(post)
        try:
            yield
        finally:
            handle.remove()

    @torch.inference_mode()
    def capture(self, ids: Tensor) -> Tensor:
        """Residual ``[batch, ctx, d]`` at the hook point; nothing after it is computed."""
        return self.capture_layers(ids, [self.layer])[self.layer]

    @torch.inference_mode()
    def capture_layers(self, ids: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        """The residual entering each block in ``layers`` (``n_layers``: the last block's output),
        all from one forward pass that stops after the deepest of them."""
        want = sorted(set(layers))
        for layer in want:
            if not 0 <= layer <= self.n_layers:
                raise ConfigError(f"source.hook: layer {layer} is not in 0..{self.n_layers}")
        box: dict[int, Tensor] = {}
        handles = []

        def grab(layer: int, h: Tensor) -> None:
            box[layer] = h
            if layer == want[-1]:
                raise _Stop

        for layer in want:
            if layer < self.n_layers:
                def pre(module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
                    grab(layer, args[0] if args else kwargs["hidden_states"])

                handles.append(self.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(module: nn.Module, args: tuple, out: Any) -> None:
                    grab(self.n_layers, out[0] if isinstance(out, tuple) else out)

                handles.append(self.blocks[-1].register_forward_hook(post))
        try:
            self.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(box) != len(want):
            raise RuntimeError("the hook point was never reached in the forward pass")
        return box

    @torch.inference_mode()
    def clean_and_tail(self, ids: Tensor) -> tuple[Tensor, Optional[Tail]]:
        """Clean logits of ``ids``, and (when this model allows it) a :class:`Tail` that turns a
        replaced residual at the hook point into logits by running only what follows the hook.

        During the clean forward every block from the hook on records its call (arguments
        other than the residual: masks, position embeddings), and the modules outside the
        blocks record what they were given and returned, which finds the final norm between the
        last block and the unembedding. The first time, the tail is checked: on the clean
        residual it must give the clean logits (else, e.g. for a model that post-processes its
        logits, every edit falls back to a full forward).
        """
        calls: list[tuple[tuple, dict]] = []
        seen: dict[nn.Module, tuple[Any, Any]] = {}
        handles = []

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args, kwargs))

        for block in list(self.blocks)[self.layer:]:
            handles.append(block.register_forward_pre_hook(record, with_kwargs=True))
        last_out: list[Tensor] = []
        handles.append(self.blocks[-1].register_forward_hook(
            lambda m, a, out: last_out.append(out[0] if isinstance(out, tuple) else out)))
        head = self.model.get_output_embeddings()
        inside = {id(m) for b in self.blocks for m in b.modules()}
        for module in self.model.modules():
            if id(module) not in inside and module is not head and not list(module.children()):
                handles.append(module.register_forward_hook(
                    lambda m, a, out: seen.__setitem__(m, (a[0] if a else None, out))))
        head_in: list[Tensor] = []
        handles.append(head.register_forward_pre_hook(lambda m, a: head_in.append(a[0])))
        try:
            logits = self.model(input_ids=ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        if self._tail_ok is False or not last_out or not head_in:
            return logits, None
        final = None
        if not torch.equal(last_out[0], head_in[0]):
            final = next((m for m, (a, out) in seen.items() if isinstance(a, Tensor) and isinstance(out, Tensor)
                          and a.shape == last_out[0].shape and torch.equal(a, last_out[0])
                          and torch.equal(out, head_in[0])), None)
            if final is None:
                self._tail_ok = False
                return logits, None
        if calls:
            args, kwargs = calls[0]
            residual = args[0] if args else kwargs["hidden_states"]
        else:
            residual = last_out[0]
        tail = Tail(list(self.blocks)[self.layer:], calls, final, head, residual)
        if self._tail_ok is None:
            self._tail_ok = bool(torch.allclose(tail(residual), logits, rtol=1e-5, atol=1e-5))
        return logits, tail if self._tail_ok else None

    @torch.inference_mode()
    def logits(self, ids: Tensor, edit: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """Full forward; ``edit`` maps the residual at the hook point to its replacement."""
        ctx = self._hooked(edit) if edit is not None else contextlib.nullcontext()
        with ctx:
            return self.model(input_ids=ids, use_cache=False).logits


# ----------------------------------------------------------------------------- corpus
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
        builder = _BUILDERS[files[0].suffix.lower()]
        data = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=cache)
        return data, None, f"the end of {source.dataset}"
    local = _looks_local(source.dataset)
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
            docs.tokenizer, docs.separator = tokenizer, _separator_id(config, tokenizer)
            docs.vocab_size = getattr(config, "vocab_size", None)
    bos = _bos_id(config, tokenizer) if source.prepend_bos else None
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


# ----------------------------------------------------------------------------- activations
def tokens_per_row(source: HFSource) -> int:
    """Activations per token row (the BOS position is left out with ``prepend_bos``)."""
    return source.context_length - (1 if source.prepend_bos else 0)


def predictions_per_row(source: HFSource) -> int:
    """Scored next-token predictions per row in the CE/KL metrics (every position but the last)."""
    return source.context_length - 1


class ActivationProducer:
    """Token rows and the LM that turns them into activations (what the cache builds from)."""

    def __init__(
        self,
        source: HFSource,
        n_train_rows: int,
        n_heldout_rows: int,
        *,
        device: str | torch.device = "cpu",
        datasets_cache: Optional[Path] = None,
        streaming: Optional[bool] = None,
    ) -> None:
        config = check_source(source)
        self.source = source
        self.rows = token_rows(
            source, n_train_rows, n_heldout_rows, datasets_cache=datasets_cache, streaming=streaming, config=config
        )
        self.device = torch.device(device)
        model, _ = load_lm(source, self.device, tokenizer=False)
        self.lm = HookedLM(model, source.layer)
        self.start = 1 if source.prepend_bos else 0

    def activations(self, rows: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """float32 ``[rows_in_batch * tokens_per_row, d]`` per LM batch of ``lm_batch_size`` rows."""
        for acts in self.activations_by_layer(rows, [self.source.layer]):
            yield acts[self.source.layer]

    def activations_by_layer(self, rows: Iterable[np.ndarray], layers: Sequence[int]) -> Iterator[dict[int, np.ndarray]]:
        """The same for several layers at once, from one forward pass per LM batch."""
        it = iter(rows)
        while True:
            batch = list(itertools.islice(it, self.source.lm_batch_size))
            if not batch:
                return
            ids = torch.from_numpy(np.stack(batch)).to(self.device)
            out = {}
            for layer, h in self.lm.capture_layers(ids, layers).items():
                h = h[:, self.start :]
                out[layer] = h.reshape(-1, h.shape[-1]).float().cpu().numpy()
            yield out


def needed_rows(cfg: ExperimentConfig) -> tuple[int, int]:
    """``(training rows, held-out rows)`` of ``context_length`` ids that ``cfg`` needs."""
    source = cfg.source
    per = tokens_per_row(source)
    heldout = -(-cfg.eval.tokens // per)
    if cfg.eval.ce_tokens:
        heldout = max(heldout, -(-cfg.eval.ce_tokens // predictions_per_row(source)))
    return -(-cfg.train.tokens // per), heldout
