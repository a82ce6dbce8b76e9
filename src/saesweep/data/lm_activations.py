"""Activations of a language model's hook (an hf source), served from the shared on-disk cache:
built on first use, memory-mapped, normalised by one recorded scale; and the spliced downstream
metrics on held-out token rows."""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from saesweep.errors import ConfigError
from saesweep.config.experiment import ExperimentConfig, HFSource
from saesweep.data import budget, cache, cache_build, corpus, lm
from saesweep.data.base import Activations, SplicePort


# ----------------------------------------------------------------------------- Activations
def permutation(n: int, *key: int) -> np.ndarray:
    """``torch.randperm(n)`` seeded by ``key`` (e.g. seed and epoch): the same on every host."""
    state = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(n, generator=g).numpy()


class HFActivations(Activations):
    """Activations of an hf source, read from the shared on-disk cache (see :mod:`.cache`).

    Training batches are drawn from the first ``train.tokens`` cached activations in an order
    fixed by ``seed``: epoch e is ``torch.randperm`` seeded by (seed, e), a new one each time
    the stream passes the end. Batch k is found by arithmetic, so ``start`` skips batches
    without producing them; only the current epoch's permutation (8 bytes per token) is held.
    """

    def __init__(self, cfg: ExperimentConfig, entry: Any, device: str | torch.device = "cpu") -> None:
        self.source: HFSource = cfg.source
        self.entry = entry
        self.device = device
        self.n_train = cfg.train.tokens
        self.n_eval = cfg.eval.tokens
        per_pred = lm.predictions_per_row(self.source)
        self.ce_rows = 0 if cfg.eval.ce_tokens == 0 else -(-cfg.eval.ce_tokens // per_pred)
        self.d_in = entry.d_in
        self.scale, raw_mean = entry.stats(self.n_train)
        self._mean = torch.from_numpy(np.asarray(raw_mean, dtype=np.float64) * self.scale).float()
        self._port: Optional[SplicePort] = None

    # ---------------------------------------------------------------- training stream

    def batch_indices(self, batch_size: int, seed: int, start: int = 0) -> Iterator[np.ndarray]:
        """Cache token indices of batches ``start, start + 1, ...`` (what ``train_batches`` reads)."""
        n, k = self.n_train, start
        perms: dict[int, np.ndarray] = {}
        while True:
            lo, hi = k * batch_size, (k + 1) * batch_size
            parts = []
            while lo < hi:
                epoch, off = divmod(lo, n)
                if epoch not in perms:
                    perms = {epoch: permutation(self.n_train, seed, epoch)}  # keep only the current epoch
                take = min(hi - lo, n - off)
                parts.append(perms[epoch][off : off + take])
                lo += take
            yield parts[0] if len(parts) == 1 else np.concatenate(parts)
            k += 1

    def train_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        for idx in self.batch_indices(batch_size, seed, start):
            yield torch.from_numpy(self.entry.gather(idx)).mul_(self.scale)

    def eval_activations(self) -> Tensor:
        return torch.from_numpy(self.entry.heldout_activations(self.n_eval)).mul_(self.scale)

    def mean(self) -> Tensor:
        return self._mean.clone()

    # ---------------------------------------------------------------- spliced metrics
    def splice_port(self) -> Optional[SplicePort]:
        """The LM at this source's hook and the held-out rows for the spliced CE/KL metrics
        (:func:`saesweep.metrics.downstream.downstream_metrics`); the LM is loaded on first use."""
        if self.ce_rows == 0:
            return None
        if self._port is None:
            def load() -> lm.HookedLM:
                model, _ = lm.load_lm(self.source, self.device, tokenizer=False)
                return lm.HookedLM(model, self.source.site)

            self._port = SplicePort(load, self.entry.heldout_token_ids(self.ce_rows), self.source.lm_batch_size,
                                    self.source.prepend_bos)
        return self._port

    def describe(self) -> dict:
        return {
            **super().describe(),
            "kind": "hf",
            "model": self.source.model,
            "hook": self.source.hook,
            "layer": self.source.layer,
            "dataset": self.source.dataset,
            "context_length": self.source.context_length,
            "train_tokens": self.n_train,
            "eval_tokens": self.n_eval,
            "ce_rows": self.ce_rows,
            "heldout_from": self.entry.manifest.get("heldout", {}).get("from"),
            "cache_key": self.entry.key,
        }

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
        self.entry.close()


class StreamedHFActivations(HFActivations):
    """Training activations computed by the LM while training runs, never all stored
    (``source.streaming``); held-out rows and the normalisation statistics come from the cache
    entry as for :class:`HFActivations`.

    The training rows (the same rows, in the same order, as a cached build's) are cut into
    windows of ``source.stream_buffer_tokens`` tokens (whole rows). Each window's activations
    are shuffled by a permutation seeded by (seed, window) and served in batches; batch k is
    found by arithmetic, so a resumed run skips earlier windows by reading their token rows
    without running the LM. Each token is used once; the few tokens the last step needs beyond
    ``train.tokens`` are drawn again from the last window. Every member of a pack trains on
    this one stream: one LM pass per pack.
    """

    def __init__(self, cfg: ExperimentConfig, entry: Any, device: str | torch.device = "cpu") -> None:
        super().__init__(cfg, entry, device)
        self.per = lm.tokens_per_row(self.source)
        self.train_rows, self.heldout_rows_needed = lm.needed_rows(cfg)
        self.window_rows = max(1, self.source.stream_buffer_tokens // self.per)
        self._producer: Optional[lm.ActivationProducer] = None
        self.lm_tokens = 0  # tokens this object ran the LM on (training windows)

    def _rows_from(self, first_row: int) -> Iterator[np.ndarray]:
        """Training token rows from ``first_row`` on (earlier ones are read, not run through the LM)."""
        datasets_cache = self.entry.path.parent.parent / "datasets"  # <root>/activations/<key>
        if self._producer is None:
            self._producer = lm.ActivationProducer(self.source, self.train_rows, self.heldout_rows_needed,
                                                   device=self.device, datasets_cache=datasets_cache)
            rows = self._producer.rows.train
        else:
            rows = corpus.token_rows(self.source, self.train_rows, self.heldout_rows_needed,
                                 datasets_cache=datasets_cache).train
        return itertools.islice(rows, first_row, None)

    def _windows(self, first: int) -> Iterator[np.ndarray]:
        """float32 activations ``[tokens, d]`` of windows ``first, first + 1, ...`` (in stream order)."""
        rows = self._rows_from(first * self.window_rows)
        n_windows = -(-self.n_train // (self.window_rows * self.per))
        for w in range(first, n_windows):
            chunk = list(itertools.islice(rows, self.window_rows))
            assert self._producer is not None
            acts = np.concatenate(list(self._producer.activations(chunk)))
            self.lm_tokens += acts.shape[0]
            yield acts[: max(0, self.n_train - w * self.window_rows * self.per)]

    def train_batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor]:
        wt = self.window_rows * self.per
        n_windows = -(-self.n_train // wt)
        pos = start * batch_size
        windows: Optional[Iterator[np.ndarray]] = None
        have: Optional[tuple[int, int]] = None  # (epoch, window) held in ``buf``
        buf = last = np.empty((0, self.d_in), np.float32)
        while True:
            parts, need = [], batch_size
            while need:
                epoch, off = divmod(pos, self.n_train)
                w, woff = (off // wt, off % wt) if epoch == 0 else (n_windows - 1, off % len(last) if len(last) else 0)
                if have != (epoch, w):
                    if epoch == 0:
                        if windows is None:
                            windows = self._windows(w)
                        last = next(windows)
                    elif not len(last):  # resumed past the end of the stream: the last window again
                        last = next(self._windows(n_windows - 1))
                    buf, have = last[permutation(len(last), seed, epoch, w)], (epoch, w)
                take = min(need, len(buf) - woff)
                parts.append(buf[woff : woff + take])
                pos += take
                need -= take
            batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
            yield torch.from_numpy(np.ascontiguousarray(batch)).mul_(self.scale)

    def describe(self) -> dict:
        return {**super().describe(), "streamed": True, "stream_buffer_tokens": self.window_rows * self.per}

    def close(self) -> None:
        self._producer = None
        super().close()


def open_hf(
    cfg: ExperimentConfig, device: str | torch.device = "cpu", *, progress: Optional[bool] = None,
    hooks: Sequence[str] = (),
) -> HFActivations:
    """Activations for ``cfg`` (an hf source), cached or streamed as
    :func:`~saesweep.data.budget.plan_activations` decides: the cache entry (all training rows,
    or only the normalisation prefix when streaming, and the held-out rows), built first when
    needed (``cache_mode: build``) or waited for until another process has built it
    (``cache_mode: wait``). When it is built, the other ``hooks`` missing from the cache are
    built with it, in the same LM pass."""
    if not isinstance(cfg.source, HFSource):
        raise ConfigError(f"source.kind: open_hf needs an hf source, got {cfg.source.kind!r}")
    plan = budget.plan_activations(cfg)
    cfg = cfg.model_copy(update={"source": plan.source})
    train_rows, heldout_rows = plan.cached_rows, plan.heldout_rows
    root = cache.cache_root(cfg.cache_dir)
    others = [cfg.source.model_copy(update={"hook": h}) for h in hooks if h != cfg.source.hook]
    entry = cache.try_open(root / "activations" / cache.entry_key(cfg.source), train_rows, heldout_rows)
    if entry is None and others and cfg.cache_mode == "build":
        entry, *rest = cache_build.open_entries([cfg.source, *others], root, train_rows, heldout_rows,
                                                device=device, progress=progress)
        for e in rest:
            e.close()
    elif entry is None:
        entry = cache_build.open_entry(cfg.source, root, train_rows, heldout_rows, device=device, progress=progress,
                                       mode=cfg.cache_mode)
    if plan.stream:
        return StreamedHFActivations(cfg, entry, device)
    return HFActivations(cfg, entry, device)
