"""Search spaces and sampled search for the store.

Grid trials record their parameters with a categorical distribution over the grid's values,
so Optuna's importance evaluators and dashboard see the real search space.

Sampled search (``search.method: random | tpe``) creates trials on demand, in the same store,
through Optuna's samplers (:func:`ask_trials`); pruning stops clearly bad trials from their
intermediate training losses through Optuna's pruners (:func:`pruning_callback`).

How a sampled sweep works:

* the budget ``search.n_trials`` holds per SAE type and counts distinct trials (first attempts;
  retries do not count); workers sample under the sweep-wide lock, so it holds with any number
  of workers and hosts;
* each SAE type has its own search space (its grid: a list is categorical, a ``Range`` a float,
  log-scaled when ``log: true``) and its own sampler history: a type's proposals only learn
  from the trials of that type;
* every proposal is deterministic for ``search.seed`` and the sweep's history (each proposal
  uses a fresh sampler seeded from the config's seed, the type and the trial's index);
* proposals are distinct experiments: a configuration the sweep already holds is re-sampled;
  when a finite (all-list) space has no configuration left, the type stops below its budget;
* a worker that finds no waiting trial asks for up to ``pack_size`` new ones at once (TPE: its
  whole random start-up, then ``TPE_BATCH`` at a time, so that it learns between proposals);
  the proposals that share the first one's pack shape (``dict_size_ratio``, gates) are claimed
  by that worker and trained as one pack, the others are queued for the next claims;
* with several objectives the sampler is multi-objective (TPE handles it; random ignores it)
  and the sweep's result is a Pareto set (``store.study.best_trials``).
"""

from __future__ import annotations

import copy
import datetime
import math
import time
import warnings
import zlib
from typing import Any, Callable, Optional, Sequence, cast

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
)

from saesweep import packing
from saesweep.errors import ConfigError
from saesweep.config.experiment import ExperimentConfig
from saesweep.config.sweep import Range, SweepSpec, sweepable, swept_params
from saesweep import metric_registry as metrics
from saesweep.sweep.store import COMPLETE, PRUNED, RUNNING, WAITING


def distribution(space: Any) -> BaseDistribution:
    if isinstance(space, Range):
        return FloatDistribution(space.low, space.high, log=space.log)
    return CategoricalDistribution(list(space))


def grid_spaces(spec: SweepSpec, configs: Sequence[ExperimentConfig]) -> tuple[list[dict], list[dict]]:
    """(params, distributions) per config of a grid sweep."""
    params, spaces = [], []
    for cfg in configs:
        params.append(swept_params(spec, cfg))
        spaces.append({p: distribution(spec.grids[cfg.sae_type][p]) for p in params[-1]})
    return params, spaces


def inferred_spaces(configs: Sequence[ExperimentConfig]) -> tuple[list[dict], list[dict]]:
    """(params, distributions) for configs from files: the values seen per type and field."""
    seen: dict[tuple[str, str], list] = {}
    for cfg in configs:
        for f in sweepable():
            v = getattr(cfg, f, None)
            if v is not None:
                vals = seen.setdefault((cfg.sae_type, f), [])
                if v not in vals:
                    vals.append(v)
    params, spaces = [], []
    for cfg in configs:
        p = {f: getattr(cfg, f) for f in sweepable() if getattr(cfg, f, None) is not None}
        params.append(p)
        spaces.append({f: CategoricalDistribution(sorted(seen[(cfg.sae_type, f)], key=_order)) for f in p})
    return params, spaces


def _order(v: Any):
    return (str(type(v)), v)




# ------------------------------------------------------------------ sampled search
#: after TPE's random start-up, at most this many trials are proposed at once (one pack)
TPE_BATCH = 4
#: re-sampling attempts before falling back to an unseen point of a finite space
MAX_RESAMPLE = 25


def search_space(spec: SweepSpec, sae_type: str) -> dict[str, BaseDistribution]:
    """The Optuna distributions of one SAE type's grid (lists categorical, ranges float)."""
    return {p: distribution(space) for p, space in spec.grids[sae_type].items()}


def n_startup_trials(n_trials: int) -> int:
    """TPE's random start-up: a third of the budget, between 2 and 10 trials."""
    return max(2, min(10, n_trials // 3))


def make_sampler(search, seed: int, n_trials: Optional[int] = None):
    """The Optuna sampler of a search spec (a fresh one per proposal; see the module docstring)."""
    import optuna

    if search.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.method == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                              n_startup_trials=n_startup_trials(n_trials or search.n_trials or 30))
    raise ValueError(f"search.method {search.method!r} does not sample")


def _seed(base: int, *parts: Any) -> int:
    return zlib.crc32(":".join(map(str, (base, *parts))).encode()) & 0x7FFFFFFF


def _first_attempts(trials, sae_type: str) -> set:
    return {t.user_attrs.get("trial_id") for t in trials
            if t.user_attrs.get("sae_type") == sae_type and int(t.user_attrs.get("attempt", 1)) == 1}


def ask_trials(store, spec: SweepSpec, worker: str, max_n: int) -> list:
    """New RUNNING trials sampled by the spec's sampler (random/TPE), within the budget.

    Returns claims owned by ``worker`` (one pack, at most ``max_n`` trials); empty once the
    budget of every type is spent.
    """
    search = spec.search
    if search.is_grid or not search.n_trials:
        return []
    with store.lock():
        trials = store.trials()
        known = {t.user_attrs.get("trial_id") for t in trials}
        created = {t: _first_attempts(trials, t) for t in spec.sae_types}
        # the type with the fewest trials first, so that every type progresses
        for sae_type in sorted(spec.sae_types, key=lambda t: (len(created[t]), spec.sae_types.index(t))):
            k = len(created[sae_type])
            left = search.n_trials - k
            if left <= 0:
                continue
            n = min(max(1, max_n), left)
            if search.method == "tpe":
                startup_left = n_startup_trials(search.n_trials) - k
                n = min(n, startup_left if startup_left > 0 else TPE_BATCH)
            mine = [t for t in trials if t.user_attrs.get("sae_type") == sae_type]
            picks = _propose(spec, sae_type, mine, known, k, n)
            if not picks:
                continue

            space = search_space(spec, sae_type)
            key = packing.pack_key(picks[0][0])
            claims = []
            for cfg, params in picks:
                if packing.pack_key(cfg) == key:
                    claims.append(store.add_running(cfg, params, {p: space[p] for p in params}, worker))
                else:  # another shape: queued for the next claims (this worker's or another's)
                    store.add_waiting(cfg, params, {p: space[p] for p in params})
            return claims
    return []


def _view_study(directions: Sequence[str], trials, space: dict[str, BaseDistribution]):
    """An in-memory study holding copies of ``trials`` (one type's history) for a sampler."""
    import optuna


    view = optuna.create_study(directions=cast(Any, list(directions)), storage=optuna.storages.InMemoryStorage())
    for t in trials:
        if t.state not in (COMPLETE, PRUNED, RUNNING, WAITING):
            continue
        if any(k in space and space[k] != d for k, d in t.distributions.items()) or set(t.params) - set(space):
            continue  # from an older version of the spec: another search space
        if t.state == WAITING:  # queued, not started: to TPE's constant liar it is as good as running
            t = copy.copy(t)
            t.state, t.datetime_start = RUNNING, datetime.datetime.now()
        view.add_trial(t)
    return view


def _propose(spec: SweepSpec, sae_type: str, mine, known: set, k: int, n: int) -> list[tuple[ExperimentConfig, dict]]:
    """Up to ``n`` new distinct configs, sampled one after the other on the type's history."""
    from optuna.trial import TrialState

    search = spec.search
    space = search_space(spec, sae_type)
    view = _view_study(search.directions, mine, space)
    picks: list[tuple[ExperimentConfig, dict]] = []
    seen = set(known)
    for j in range(n):
        got = None
        for attempt in range(MAX_RESAMPLE):
            view.sampler = make_sampler(search, _seed(search.seed, sae_type, k + j, attempt))
            vt = view.ask(space)
            params = dict(vt.params)
            try:
                cfg = spec.base_config(sae_type, **params)
            except ConfigError:  # a sampled value the config refuses: sample again
                view.tell(vt, state=TrialState.FAIL)
                continue
            if cfg.trial_id not in seen:
                got = (cfg, params)  # stays RUNNING in the view: TPE's constant liar avoids it next
                break
            view.tell(vt, state=TrialState.FAIL)
        if got is None:
            got = _unseen_point(spec, sae_type, space, seen, _seed(search.seed, sae_type, k + j, "fallback"))
        if got is None:
            break
        picks.append(got)
        seen.add(got[0].trial_id)
    return picks


def _unseen_point(spec, sae_type, space, seen, seed):
    """A random configuration of a finite space that the sweep does not hold yet, if any."""
    import itertools
    import random

    from optuna.distributions import CategoricalDistribution

    if not all(isinstance(d, CategoricalDistribution) for d in space.values()):
        return None
    keys = list(space)
    rng = random.Random(seed)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(space[k].choices for k in keys))]
    rng.shuffle(points)
    for params in points:
        cfg = spec.base_config(sae_type, **params)
        if cfg.trial_id not in seen:
            return cfg, params
    return None


# ------------------------------------------------------------------------- pruning
#: how often a pruning callback re-reads the other trials of the sweep
PRUNING_REFRESH_S = 10.0


def intermediate_metric(objective: str) -> str:
    """The training-log value reported as the intermediate value for ``objective``.

    ``l0`` is pruned on the training batch's L0 and ``l1`` on the sparsity penalty; every other
    objective (fvu, mse, explained variance, CE/KL, recovery) on the training batch's ``mse``,
    lower is better, which is what they all follow.
    """
    intermediate = metrics.METRICS[objective].intermediate
    if intermediate is None:  # the registry requires one of every objective
        raise ValueError(f"metric {objective!r} is not an objective")
    return intermediate


def make_pruner(search, steps: int):
    """The Optuna pruner of a search spec for trials of ``steps`` training steps (None: off)."""
    import optuna

    if search.pruner == "median":
        # the first 20% of training is too noisy to judge; 5 finished trials of a type first
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, steps // 5))
    if search.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, steps // 10), reduction_factor=3)
    return None


def pruning_callback(store, spec: SweepSpec, claims: Sequence) -> Callable[[ExperimentConfig, dict], bool]:
    """A ``should_prune(config, log_record)`` for the trainer, backed by the spec's Optuna pruner.

    At each log step the record's :func:`intermediate_metric` of the first objective is stored
    as the trial's intermediate value (step = training step) and the pruner judges it against
    the other trials of the same SAE type. Pruning needs a single objective: with several, the
    callback never prunes (and says so once).
    """
    return _Pruning(store, spec, claims)


class _Pruning:
    def __init__(self, store, spec: SweepSpec, claims: Sequence) -> None:
        self.store, self.spec = store, spec
        self.by_id = {c.trial_id: c for c in claims}
        steps = max((c.config.train.steps for c in claims), default=1)
        self.pruner = make_pruner(spec.search, steps)
        self.key = intermediate_metric(spec.search.objectives[0])
        if len(spec.search.objectives) > 1 and self.pruner is not None:
            warnings.warn(f"search.pruner {spec.search.pruner!r} needs a single objective; "
                          f"with {spec.search.objectives} no trial is pruned", stacklevel=2)
            self.pruner = None
        self._views: dict[str, tuple[float, Any, Any, dict]] = {}  # sae_type -> (time, view, its storage, {number: view pk})
        self._mirrored: dict[int, set] = {}

    def _view(self, sae_type: str):
        """An in-memory copy of the type's trials (intermediate values, ASHA rungs) for the pruner."""
        import optuna
        from optuna.trial import FrozenTrial


        now = time.monotonic()
        cached = self._views.get(sae_type)
        if cached and now - cached[0] < PRUNING_REFRESH_S:
            return cached[1:]
        storage = optuna.storages.InMemoryStorage()
        view = optuna.create_study(direction="minimize", storage=storage)
        study_id = storage.get_study_id_from_name(view.study_name)
        ids = {}
        for t in self.store.trials([COMPLETE, PRUNED, RUNNING]):
            if t.user_attrs.get("sae_type") != sae_type or (t.state == COMPLETE and not t.values):
                continue
            copy = FrozenTrial(number=-1, trial_id=-1, state=t.state, value=None,
                               values=[t.values[0]] if t.state == COMPLETE else None,
                               datetime_start=t.datetime_start, datetime_complete=t.datetime_complete,
                               params={}, distributions={}, user_attrs={},
                               system_attrs={k: v for k, v in t.system_attrs.items() if k.startswith("completed_rung")},
                               intermediate_values=dict(t.intermediate_values))
            ids[t.number] = storage.create_new_trial(study_id, template_trial=copy)
        self._views[sae_type] = (now, view, storage, ids)
        return view, storage, ids

    def __call__(self, config: ExperimentConfig, record: dict) -> bool:
        c = self.by_id.get(config.trial_id)
        if c is None or self.pruner is None:
            return False
        value = record.get(self.key)
        if value is None or not math.isfinite(float(value)):
            return False
        step = int(record.get("step", 0))
        try:
            self.store.storage.set_trial_intermediate_value(c.trial_pk, step, float(value))
        except Exception:  # lease lost or a storage hiccup: never stop training for it
            return False
        try:
            from optuna.trial import FrozenTrial

            view, storage, ids = self._view(config.sae_type)
            vpk = ids.get(c.number)
            if vpk is None:
                return False
            storage.set_trial_intermediate_value(vpk, step, float(value))
            frozen: FrozenTrial = storage.get_trial(vpk)
            prune = bool(self.pruner.prune(view, frozen))
            self._mirror_rungs(c.trial_pk, storage.get_trial(vpk).system_attrs)
            return prune
        except Exception as e:  # a pruner problem never fails a trial
            warnings.warn(f"pruning disabled for this pack: {type(e).__name__}: {e}", stacklevel=2)
            self.pruner = None
            return False

    def _mirror_rungs(self, pk: int, attrs: dict) -> None:
        """ASHA keeps its rung results in system attributes: copy them to the sweep's trial."""
        done = self._mirrored.setdefault(pk, set())
        for k, v in attrs.items():
            if k.startswith("completed_rung") and k not in done:
                try:
                    self.store.storage.set_trial_system_attr(pk, k, v)
                    done.add(k)
                except Exception:
                    pass

