"""Activations of a language model's hook (an hf source), served from the shared on-disk cache:
built on first use, memory-mapped, normalised by one recorded scale; and the spliced downstream
metrics on held-out token rows."""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from saesweep.config.experiment import ConfigError, ExperimentConfig, HFSource
from saesweep.data import cache, cache_build, lm
from saesweep.data.base import Activations, Reconstructor
from saesweep.metrics.downstream import spliced_metrics


# ----------------------------------------------------------------------------- Activations
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
        self._lm: Optional[lm.HookedLM] = None
        self._baseline: Optional[dict[str, float]] = None  # clean and zero-ablated CE/KL of the rows

    # ---------------------------------------------------------------- training stream
    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.randperm(self.n_train, generator=g).numpy()

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
                    perms = {epoch: self._perm(seed, epoch)}  # keep only the current epoch
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
    def downstream_metrics(self, reconstructors: Sequence[Reconstructor]) -> list[dict[str, float]]:
        """:func:`~saesweep.metrics.downstream.spliced_metrics` per reconstructor on held-out rows.

        Reconstructors map raw activations ``[N, d]`` (float32, on the LM's device) to raw
        reconstructions. The LM is loaded on first use.
        """
        if not reconstructors:
            return []
        if self.ce_rows == 0:
            return [{} for _ in reconstructors]
        if self._lm is None:
            model, _ = lm.load_lm(self.source, self.device, tokenizer=False)
            self._lm = lm.HookedLM(model, self.source.layer)
        rows = self.entry.heldout_token_ids(self.ce_rows)
        out, self._baseline = spliced_metrics(
            self._lm, rows, reconstructors, batch_rows=self.source.lm_batch_size, baseline=self._baseline,
            shortcut=os.environ.get("SAESWEEP_SPLICE", "tail") != "full",  # full: a whole forward per SAE
        )
        return out

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
        self._lm = None
        self.entry.close()


def open_hf(
    cfg: ExperimentConfig, device: str | torch.device = "cpu", *, progress: Optional[bool] = None,
    hooks: Sequence[str] = (),
) -> HFActivations:
    """Activations for ``cfg`` (an hf source): the cache entry, built first when needed (``cache_mode:
    build``) or waited for until another process has built it (``cache_mode: wait``). When it is
    built, the other ``hooks`` missing from the cache are built with it, in the same LM pass."""
    if not isinstance(cfg.source, HFSource):
        raise ConfigError(f"source.kind: open_hf needs an hf source, got {cfg.source.kind!r}")
    lm.check_source(cfg.source)
    train_rows, heldout_rows = lm.needed_rows(cfg)
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
    return HFActivations(cfg, entry, device)
