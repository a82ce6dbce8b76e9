"""How a job's language-model activations reach the trainer, decided before any work starts:
cached (and in which dtype) or streamed, and whether the disk holds what that needs.

* ``source.cache_dtype: auto`` stores a training cache entry in float32 while it takes at most
  :data:`AUTO_16BIT_BYTES` in float32, else in bfloat16 (half the bytes; the rounding is within
  the bf16 tolerance the trainer already accepts).
* ``source.streaming: auto`` streams when the training cache would exceed the disk budget
  (``source.cache_max_gb``, else the free space of the cache's file system). A streamed job
  still caches its held-out rows and the leading tokens the normalisation is measured on.
* A job that must cache (``streaming: false``) and does not fit is refused with the numbers
  and the ways out (:class:`~saesweep.config.experiment.ConfigError`, exit code 2).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from saesweep.errors import ConfigError
from saesweep.config.experiment import ExperimentConfig, HFSource
from saesweep.data import cache, hf, lm

#: ``cache_dtype: auto`` switches to bfloat16 above this many float32 bytes of training activations
AUTO_16BIT_BYTES = 2**30
GB = 1e9


@dataclass(frozen=True)
class ActivationPlan:
    """What one job's activations need. ``source`` has ``cache_dtype`` resolved."""

    source: HFSource
    stream: bool
    d_in: int
    train_rows: int
    heldout_rows: int
    #: rows of training activations the cache entry holds (all of them, or the normalisation
    #: prefix when streaming)
    cached_rows: int
    #: bytes this job adds to the cache (0 when a large enough entry exists)
    new_bytes: int
    #: bytes caching every training token would take, in the resolved dtype
    full_bytes: int
    free_bytes: int
    root: Path

    @property
    def key(self) -> str:
        return cache.entry_key(self.source)

    def describe(self) -> str:
        how = "streamed through a shuffling buffer" if self.stream else "cached"
        return (f"{self.source.hook}: {how}, {self.source.cache_dtype} "
                f"({_gb(self.full_bytes)} for every training token, {_gb(self.new_bytes)} new in the cache)")


def _gb(n: float) -> str:
    return f"{n / GB:.3g} GB"


def entry_bytes(d: int, train_tokens: int, heldout_tokens: int, heldout_rows: int, context_length: int,
                dtype: str) -> int:
    """Bytes of a cache entry: training shards in ``dtype``, held-out float32 and their token ids."""
    return (train_tokens * d * cache.STORAGE[dtype].itemsize + heldout_tokens * d * 4
            + heldout_rows * context_length * 8)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or would hold it: its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def resolve_dtype(source: HFSource, train_tokens: int, d: int) -> str:
    if source.cache_dtype != "auto":
        return source.cache_dtype
    return "float32" if train_tokens * d * 4 <= AUTO_16BIT_BYTES else "bfloat16"


def prefix_rows(train_rows: int, per: int) -> int:
    """Training rows a streamed job caches: enough for the normalisation statistics."""
    return min(train_rows, -(-cache.NORM_TOKENS // per))


def plan_activations(cfg: ExperimentConfig, *, model_config: Any = None) -> ActivationPlan:
    """The plan for one hf-source config; a ConfigError when it cannot fit on the disk."""
    source = cfg.source
    if not isinstance(source, HFSource):
        raise ConfigError(f"source.kind: activation plans are for hf sources, got {source.kind!r}")
    config = model_config if model_config is not None else hf.check_source(source)
    d = hf.hook_width(source, config)
    train_rows, heldout_rows = lm.needed_rows(cfg)
    per = lm.tokens_per_row(source)
    dtype = resolve_dtype(source, train_rows * per, d)
    src = source.model_copy(update={"cache_dtype": dtype})
    root = cache.cache_root(cfg.cache_dir)
    ctx = source.context_length

    def size(rows: int) -> int:
        return entry_bytes(d, rows * per, heldout_rows * per, heldout_rows, ctx, dtype)

    there = cache.read_manifest(root / "activations" / cache.entry_key(src))
    have_train = there["train"]["rows"] if there else 0
    have_held = there["heldout"]["rows"] if there else 0

    def new(rows: int) -> int:  # a smaller entry is rebuilt larger (its full shards relinked)
        return 0 if have_train >= rows and have_held >= heldout_rows else size(max(rows, have_train))

    free = free_bytes(root)
    budget = min(free, cfg.source.cache_max_gb * GB) if cfg.source.cache_max_gb else free
    stream = source.streaming if isinstance(source.streaming, bool) else new(train_rows) > budget
    cached = prefix_rows(train_rows, per) if stream else train_rows
    plan = ActivationPlan(src, stream, d, train_rows, heldout_rows, cached, new(cached), size(train_rows), free, root)
    if plan.new_bytes > budget:
        raise ConfigError(refusal([plan], budget))
    return plan


def refusal(plans: Sequence[ActivationPlan], budget: float) -> str:
    p = plans[0]
    need = sum(q.new_bytes for q in plans)
    what = "source.cache_max_gb" if p.source.cache_max_gb and p.source.cache_max_gb * GB < p.free_bytes else "free disk"
    tokens = sum(q.train_rows for q in plans) * lm.tokens_per_row(p.source)
    options = []
    if p.source.cache_dtype == "float32":
        options.append("source.cache_dtype: bfloat16 (half the bytes)")
    if not p.stream:
        options.append("source.streaming: true (the LM runs alongside training; only held-out rows are cached)")
    options.append("fewer train.tokens")
    options.append("another cache_dir (or $SAESWEEP_CACHE) on a larger disk")
    return (f"source: the activation cache needs {_gb(need)} in {p.root} for {tokens:,} training tokens "
            f"at d = {p.d_in} in {p.source.cache_dtype}, but {what} allows {_gb(budget)}; "
            f"options: {'; '.join(options)}")


def plan_sweep(configs: Sequence[ExperimentConfig]) -> list[ActivationPlan]:
    """One plan per distinct cache entry of the configs' hf sources (the largest request of each),
    checked together against the free space of each cache folder. Raises ConfigError."""
    largest: dict[tuple[str, str], ExperimentConfig] = {}
    model_configs: dict[str, Any] = {}
    for cfg in configs:
        if not isinstance(cfg.source, HFSource):
            continue
        k = (str(cache.cache_root(cfg.cache_dir)), cfg.source.model_dump_json(exclude={"lm_batch_size"}))
        best = largest.get(k)
        if best is None or lm.needed_rows(cfg) > lm.needed_rows(best):
            largest[k] = cfg
    plans = []
    for cfg in largest.values():
        mc = model_configs.get(cfg.source.model)
        if mc is None:
            mc = model_configs[cfg.source.model] = hf.check_source(cfg.source)
        plans.append(plan_activations(cfg, model_config=mc))
    by_root: dict[Path, list[ActivationPlan]] = {}
    for p in plans:
        by_root.setdefault(p.root, []).append(p)
    for group in by_root.values():
        if sum(p.new_bytes for p in group) > group[0].free_bytes:
            raise ConfigError(refusal(group, group[0].free_bytes))
    return plans
