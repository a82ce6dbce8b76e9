"""Sweep state in a real database, through Optuna's storages.

A sweep is an Optuna study; each attempt at a trial is an Optuna trial carrying the trial's
stable id (``trial_id``), its full config, its pack key and attempt number in user attributes,
and the swept parameters as Optuna params (so Optuna's samplers, importance evaluators and
dashboard work on it directly).

Backends, chosen by URL (:mod:`.storages`, one module each):

* a file path or ``journal:PATH`` -- Optuna's append-only journal file (the embedded default;
  safe for many processes on one host, or on a shared filesystem with working locks);
* ``postgresql://...`` -- Optuna's RDB storage on PostgreSQL, for many hosts;
* ``sqlite:///...`` -- accepted for a single worker only: SQLite does not give the row locks
  that concurrent claiming needs.

Exactly-once rests on Optuna's state transitions, which are atomic in both backends:

* claim: WAITING -> RUNNING succeeds for exactly one worker;
* finish: RUNNING -> COMPLETE or FAIL succeeds once; a worker whose lease was taken from it
  gets ``UpdateFinishedTrialError`` and discards its result;
* retry: only the process whose RUNNING -> FAIL transition succeeded adds the next attempt.

A lease is the time of a trial's last heartbeat (a system attribute written by its worker)
or, before the first one, of its claim. A RUNNING trial whose lease is older than
``lease_s`` is reaped by any worker: marked FAIL ("lease expired") and re-queued. On a
journal file a worker that runs trials also holds a ``flock`` on ``<journal>.leases/<worker>``
(:meth:`SweepStore.hold_lease`): while it is held the worker is alive, its trials are not
reaped and it writes no heartbeats, so the journal grows with the trials, not with training
time; the kernel drops the lock when the worker dies (even by ``kill -9``), and its trials
expire ``lease_s`` after their last heartbeat (the claim). PostgreSQL updates heartbeats in
place.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
)
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from saesweep import packing
from saesweep.errors import ConfigError
from saesweep.config.experiment import ExperimentConfig, stored_config
from saesweep.io import HeldLock, is_held
from saesweep.metric_registry import current_names
from saesweep.sweep.storages import open_backend
from saesweep.sweep.urls import redact

WAITING, RUNNING, COMPLETE, FAIL, PRUNED = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE,
                                            TrialState.FAIL, TrialState.PRUNED)
LEASE_ATTR = "saesweep:heartbeat"
WRITES_ATTR = "writes_checkpoint"
#: on a failed attempt whose training finished but whose evaluation raised: the pack checkpoint
#: holding its trained state
EVALUATE_FROM_ATTR = "evaluate_from"
#: the sweep's clock when a worker last saw the database come back after an outage
OUTAGE_ATTR = "outage_ended"
#: the longest wait between two tries of a store call through an outage (a worker's heartbeat
#: may come this late after the database is back)
RETRY_MAX_WAIT_S = 15.0


def host_id() -> str:
    return socket.gethostname()


def new_worker_id(slot: str = "") -> str:
    return f"{host_id()}:{os.getpid()}{':' + slot if slot else ''}:{uuid.uuid4().hex[:6]}"


@dataclass
class Claim:
    """A trial attempt this worker holds (RUNNING, under its lease)."""

    number: int  # Optuna trial number
    trial_pk: int  # Optuna's internal trial id
    trial_id: str  # saesweep's stable id
    attempt: int
    config: ExperimentConfig
    params: dict[str, Any]
    #: the pack checkpoint (a file name in the sweep's checkpoint folder) holding this trial's
    #: training state when an earlier attempt was interrupted
    checkpoint: Optional[str] = None


@dataclass
class TrialRecord:
    """One logical trial (all its attempts) as the store knows it."""

    trial_id: str
    sae_type: str
    state: str  # waiting | running | complete | failed
    attempts: int
    params: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None
    run_dir: Optional[str] = None
    worker: Optional[str] = None
    device: Optional[str] = None
    duration_s: Optional[float] = None
    number: Optional[int] = None
    #: the reason of the latest failed attempt, also when a later attempt waits, runs or completed
    last_failure: Optional[str] = None


class SweepStore:
    """Trials, states, leases, metrics and artifact paths of one sweep."""

    def __init__(self, url: str, name: str, *, directions: Optional[Sequence[str]] = None, create: bool = True,
                 read_only: bool = False) -> None:
        """``read_only``: for commands that only read (status, results, report, verify): the
        storage is opened without repairs or writes."""
        # optuna announces every trial it creates; a sweep creates hundreds
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url, self.name = url, name
        self._derived_keys: dict[int, str] = {}  # trial number -> pack key, for trials queued under another rule
        self.backend = open_backend(url, create=create and not read_only, read_only=read_only)
        self._held: dict[str, HeldLock] = {}  # liveness locks this process holds, by worker
        if create:
            dirs: Any = list(directions or ["minimize"])  # "minimize" / "maximize"
            try:
                self.study = optuna.create_study(study_name=name, storage=self.storage, directions=dirs, load_if_exists=True)
            except Exception as e:
                raise ConfigError(f"--storage {redact(url)}: {e}") from None
            if [d.name.lower() for d in self.study.directions] != dirs:
                raise ConfigError(
                    f"sweep {name!r} already exists with objectives of directions "
                    f"{[d.name.lower() for d in self.study.directions]}; use another --name to change them"
                )
        else:
            try:
                self.study = optuna.load_study(study_name=name, storage=self.storage)
            except KeyError:
                names = [s.study_name for s in optuna.get_all_study_summaries(self.storage)]
                raise ConfigError(f"no sweep named {name!r} in {redact(url)} (sweeps there: {', '.join(names) or 'none'})") from None
        self.study_id = self.storage.get_study_id_from_name(name)

    # ------------------------------------------------------------------ helpers
    # what the backend holds, read through it
    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def path(self) -> Optional[Path]:
        return self.backend.path

    @property
    def storage(self) -> Any:
        return self.backend.storage

    def lock(self):
        """The sweep-wide mutex (the backend's), as a context manager."""
        return self.backend.lock(self.name)

    def rdb_engine(self):
        return self.storage.engine

    #: how often the offset to the database server's clock is measured again
    CLOCK_RESYNC_S = 30.0

    def now(self) -> float:
        """Seconds since the epoch on the sweep's clock, which every lease is measured on.

        PostgreSQL: the database server's clock, so heartbeats written on one host and the
        reaper on another agree whatever their own clocks say. It is read with one query every
        ``CLOCK_RESYNC_S`` and carried forward on this host's monotonic clock in between (a
        jump of the wall clock here changes nothing); if the server cannot be asked, the last
        reading is carried forward. Other backends (one host, or a shared journal): this host's
        ``time.time()``, so hosts sharing a journal need synchronised clocks (NTP).
        """
        if not self.backend.server_clock:
            return time.time()
        anchor = getattr(self, "_clock", None)
        mono = time.monotonic()
        if anchor is None or mono - anchor[1] > self.CLOCK_RESYNC_S:
            try:
                anchor = self.backend.server_time()
                self._clock = anchor
            except Exception:
                if anchor is None:
                    raise
        return anchor[0] + (time.monotonic() - anchor[1])

    def trial(self, trial_pk: int) -> FrozenTrial:
        return self.storage.get_trial(trial_pk)

    def trials(self, states: Optional[Sequence[TrialState]] = None) -> list[FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False, states=tuple(states) if states else None)

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.study.user_attrs)

    def set_info(self, **values: Any) -> None:
        for k, v in values.items():
            self.study.set_user_attr(k, v)

    # ------------------------------------------------------------------ populate
    def add_trials(self, configs: Sequence[ExperimentConfig], params: Sequence[dict[str, Any]],
                   spaces: Optional[Sequence[dict[str, BaseDistribution]]] = None) -> int:
        """Queue the configs whose trial id the sweep does not hold yet; returns how many were added."""
        with self.lock():
            known = {t.user_attrs.get("trial_id") for t in self.trials()}
            added = 0
            for i, (cfg, p) in enumerate(zip(configs, params)):
                if cfg.trial_id in known:
                    continue
                known.add(cfg.trial_id)
                dists = spaces[i] if spaces else {k: _distribution(v) for k, v in p.items()}
                self.add_waiting(cfg, p, dists, attempt=1)
                added += 1
            return added

    @staticmethod
    def _trial(state: TrialState, cfg: ExperimentConfig, params: dict, dists: dict, attempt: int,
               avoid: Sequence[str] = (), checkpoint: Optional[str] = None) -> FrozenTrial:
        return optuna.trial.create_trial(
            state=state,
            params=params,
            distributions=dists,
            user_attrs={
                "trial_id": cfg.trial_id,
                "sae_type": cfg.sae_type,
                **packing.stored_attrs(cfg),
                "attempt": attempt,
                "config": cfg.to_dict(),
                **({"avoid": list(avoid)} if avoid else {}),
                **({"checkpoint": checkpoint} if checkpoint else {}),
            },
        )

    def add_waiting(self, cfg: ExperimentConfig, params: dict, dists: dict, attempt: int = 1,
                    avoid: Sequence[str] = (), checkpoint: Optional[str] = None) -> None:
        """Queue one attempt of a trial (``avoid``: workers it should not go back to;
        ``checkpoint``: the pack checkpoint it resumes from)."""
        self.study.add_trial(self._trial(WAITING, cfg, params, dists, attempt, avoid, checkpoint))

    def add_running(self, cfg: ExperimentConfig, params: dict, dists: dict, worker: str) -> Claim:
        """A first attempt that ``worker`` runs at once (sampled search): created RUNNING with
        its lease, never visible as waiting to other workers."""
        pk = self.storage.create_new_trial(self.study_id, template_trial=self._trial(RUNNING, cfg, params, dists, 1))
        self.beat(pk, worker)
        return Claim(self.storage.get_trial_number_from_id(pk), pk, cfg.trial_id, 1, cfg, dict(params))

    def pk_of(self, t: FrozenTrial) -> int:
        """The storage's id of a trial (what its write methods take), by public API."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, t.number)

    # ------------------------------------------------------------------ claiming
    def claim(self, worker: str, max_members: int = 1, accept: Optional[Callable[[FrozenTrial], bool]] = None,
              share: int = 1) -> list[Claim]:
        """Atomically take up to ``max_members`` waiting trials that can train as one pack.

        With ``share`` workers on the queue, a claim takes at most 1/share of a pack group, so
        one worker does not take all the work while the others idle. Claims take turns (a lock of
        their own, apart from queueing): two workers choosing the same group at once would each
        win part of it and train two small packs instead of one full one. Each flip from WAITING
        to RUNNING stays atomic on its own, so a claim is exactly-once even without the lock.
        """
        with self.backend.lock(f"{self.name}:claims"):
            return self._claim(worker, max_members, accept, share)

    def _claim(self, worker: str, max_members: int, accept: Optional[Callable[[FrozenTrial], bool]],
               share: int) -> list[Claim]:
        for _ in range(20):
            waiting = [t for t in self.trials([WAITING]) if accept is None or accept(t)]
            if not waiting:
                return []
            group = packing.choose_claim(waiting, self._pack_key_of, lambda t: t.user_attrs.get("checkpoint"),
                                         max_members, share)
            claims = []
            for t in group:
                pk = self.pk_of(t)
                try:
                    won = self.storage.set_trial_state_values(pk, RUNNING)
                except UpdateFinishedTrialError:  # our view was stale: someone ran and finished it
                    won = False
                if won:
                    self.beat(pk, worker)
                    claims.append(self._claim_of(t, pk))
            if claims:
                return claims
        return []

    def _pack_key_of(self, t: FrozenTrial) -> str:
        """A queued trial's pack key under the current packing rule (see :mod:`saesweep.packing`)."""
        if t.number not in self._derived_keys:
            self._derived_keys[t.number] = packing.key_of_stored(t.user_attrs, lambda: self._config_of(t))
        return self._derived_keys[t.number]

    @staticmethod
    def _config_of(t: FrozenTrial) -> ExperimentConfig:
        return stored_config(t.user_attrs["config"], where=f"trial {t.user_attrs.get('trial_id')}")

    def _claim_of(self, t: FrozenTrial, pk: Optional[int] = None) -> Claim:
        cfg = self._config_of(t)
        pk = self.pk_of(t) if pk is None else pk
        return Claim(t.number, pk, t.user_attrs["trial_id"], int(t.user_attrs.get("attempt", 1)), cfg, dict(t.params),
                     t.user_attrs.get("checkpoint"))

    def set_checkpoint(self, claims: Sequence[Claim], name: str) -> None:
        """Record the pack checkpoint the claims' worker writes (a trial whose lease expires is
        re-queued to resume from it)."""
        for c in claims:
            self.storage.set_trial_user_attr(c.trial_pk, WRITES_ATTR, name)

    def beat(self, trial_pk: int, worker: str) -> None:
        """Renew (or start) the lease of a RUNNING trial."""
        self.storage.set_trial_system_attr(trial_pk, LEASE_ATTR, {"t": self.now(), "worker": worker, "host": host_id()})

    def _lease_file(self, worker: str) -> Path:
        return Path(f"{self.path}.leases") / f"{worker.replace('/', '_')}.lock"

    def hold_lease(self, worker: str) -> None:
        """Where the backend proves liveness by a lock file (a journal): hold ``worker``'s (see the
        module docstring)."""
        if self.backend.liveness_locks and worker not in self._held:
            self._held[worker] = HeldLock(self._lease_file(worker))

    def release_lease(self, worker: str) -> None:
        held = self._held.pop(worker, None)
        if held is not None:
            held.release()

    def heartbeat(self, claims: Sequence[Claim], worker: str) -> list[Claim]:
        """Renew the leases; returns the claims whose lease was lost (reaped by someone). A
        journal worker holding its liveness lock writes nothing: nobody can reap its trials."""
        if worker in self._held:
            return []
        lost = []
        for c in claims:
            try:
                self.beat(c.trial_pk, worker)
            except UpdateFinishedTrialError:
                lost.append(c)
        return lost

    # ------------------------------------------------------------------ finishing
    def complete(self, claim: Claim, metrics: dict[str, Any], *, objectives: Sequence[str], extra: Optional[dict] = None) -> bool:
        """Record a finished trial; False when the lease was lost (the result is discarded)."""
        values = [float(metrics.get(o, math.nan)) for o in objectives]
        if not all(math.isfinite(v) for v in values):
            missing = [o for o, v in zip(objectives, values) if not math.isfinite(v)]
            return self.fail(claim, f"objective metric(s) {', '.join(missing)} missing or not finite", retry=False)[0]
        try:
            self.storage.set_trial_user_attr(claim.trial_pk, "metrics", _jsonable(metrics))
            for k, v in (extra or {}).items():
                self.storage.set_trial_user_attr(claim.trial_pk, k, _jsonable(v))
            self.storage.set_trial_state_values(claim.trial_pk, COMPLETE, values)
        except UpdateFinishedTrialError:
            return False
        return self.storage.get_trial(claim.trial_pk).state == COMPLETE

    def fail(self, claim: Claim, reason: str, *, retry: bool, max_retries: int = 2, extra: Optional[dict] = None,
             same_attempt: bool = False, avoid_slot: Optional[str] = None,
             checkpoint: Optional[str] = None) -> tuple[bool, bool]:
        """Mark the attempt failed; queue the next attempt when ``retry`` and attempts remain
        (``same_attempt``: an interruption, not counted; ``checkpoint``: where it resumes from).

        Returns (this call recorded the failure, a retry was queued).
        """
        try:
            self.storage.set_trial_user_attr(claim.trial_pk, "reason", reason[:2000])
            for k, v in (extra or {}).items():
                self.storage.set_trial_user_attr(claim.trial_pk, k, _jsonable(v))
            self.storage.set_trial_state_values(claim.trial_pk, FAIL)
        except UpdateFinishedTrialError:
            return False, False
        t = self.storage.get_trial(claim.trial_pk)
        if t.state != FAIL:  # a journal accepts the transition even when another worker's result won
            return False, False
        if retry and (same_attempt or claim.attempt <= max_retries):
            attempt = claim.attempt if same_attempt else claim.attempt + 1
            avoid = list(t.user_attrs.get("avoid", [])) + ([avoid_slot] if avoid_slot else [])
            self.add_waiting(claim.config, dict(t.params), dict(t.distributions), attempt=attempt, avoid=avoid,
                             checkpoint=checkpoint)
            return True, True
        return True, False

    def prune(self, claim: Claim, reason: str, last: Optional[dict] = None) -> bool:
        """Record a trial stopped early by the pruner (a finished outcome, not a failure)."""
        try:
            self.storage.set_trial_user_attr(claim.trial_pk, "reason", reason)
            if last:
                self.storage.set_trial_user_attr(claim.trial_pk, "last_log", _jsonable(last))
            self.storage.set_trial_state_values(claim.trial_pk, PRUNED)
        except UpdateFinishedTrialError:
            return False
        return True

    def requeue_failed(self, trial_ids: Optional[set[str]] = None) -> list[str]:
        """Queue a fresh attempt of every trial (of ``trial_ids``, or all) whose last attempt failed
        for good: its retries spent, diverged, or out of memory everywhere. Returns their ids."""
        with self.lock():
            out = []
            for tid, attempts in self._attempts_by_id().items():
                if trial_ids is not None and tid not in trial_ids:
                    continue
                if any(t.state != FAIL for t in attempts) or "config" not in attempts[-1].user_attrs:
                    continue
                last = attempts[-1]
                attempt = max(int(t.user_attrs.get("attempt", 1)) for t in attempts) + 1
                self.add_waiting(self._config_of(last), dict(last.params), dict(last.distributions), attempt=attempt)
                out.append(tid)
            return out

    def _unevaluated(self) -> list[tuple[str, FrozenTrial]]:
        """(trial id, last attempt) of the trials that failed for good in evaluation after
        their training finished, their trained state kept in a checkpoint."""
        out = []
        for tid, attempts in self._attempts_by_id().items():
            last = attempts[-1]
            if all(t.state == FAIL for t in attempts) and last.user_attrs.get(EVALUATE_FROM_ATTR) \
                    and "config" in last.user_attrs:
                out.append((tid, last))
        return out

    def unevaluated_checkpoints(self) -> set[str]:
        """The checkpoint files that hold trained trials still to be evaluated."""
        return {str(t.user_attrs[EVALUATE_FROM_ATTR]) for _, t in self._unevaluated()}

    def requeue_unevaluated(self, checkpoint_dir: Path, trial_ids: Optional[set[str]] = None) -> list[str]:
        """Queue again (the attempt not counted) every trial whose training finished but whose
        evaluation failed, to resume from its checkpoint in ``checkpoint_dir`` with nothing left
        to train; returns their ids. One whose checkpoint is gone stays failed."""
        with self.lock():
            out = []
            for tid, last in self._unevaluated():
                name = str(last.user_attrs[EVALUATE_FROM_ATTR])
                if (trial_ids is not None and tid not in trial_ids) or not (Path(checkpoint_dir) / name).exists():
                    continue
                self.add_waiting(self._config_of(last), dict(last.params), dict(last.distributions),
                                 attempt=int(last.user_attrs.get("attempt", 1)), checkpoint=name)
                out.append(tid)
            return out

    def note_outage_end(self) -> None:
        """Record that the database was unreachable until now: leases are not reaped for the next
        lease_s, so that workers that could not heartbeat meanwhile are not presumed dead."""
        self.set_info(**{OUTAGE_ATTR: self.now()})

    def reap_expired(self, lease_s: float, max_retries: int = 2) -> list[str]:
        """Fail and re-queue RUNNING trials whose lease expired; returns their trial ids. Within
        ``lease_s`` (plus the longest retry wait) of the end of a database outage nothing is
        reaped: the workers that could not heartbeat through it get a lease's time to do so."""
        now, reaped = self.now(), []
        ended = self.study.user_attrs.get(OUTAGE_ATTR)
        if isinstance(ended, (int, float)) and now - float(ended) < lease_s + RETRY_MAX_WAIT_S:
            return []
        # A claim writes its first heartbeat (on the sweep's clock) at once. A RUNNING trial
        # without one was claimed by a worker that died in between: its lease is counted from
        # when this process first saw it so, never from Optuna's datetime_start (the claiming
        # host's local wall clock, in its own time zone).
        unbeaten = getattr(self, "_unbeaten", {})
        seen: dict[int, float] = {}
        for t in self.trials([RUNNING]):
            beat = t.system_attrs.get(LEASE_ATTR)
            if self.backend.liveness_locks and isinstance(beat, dict) and isinstance(beat.get("worker"), str) \
                    and is_held(self._lease_file(beat["worker"])):
                continue  # its worker is alive
            if isinstance(beat, dict) and isinstance(beat.get("t"), (int, float)):
                last = float(beat["t"])
            else:
                last = seen[t.number] = unbeaten.get(t.number, now)
            if now - last > lease_s:
                who = beat.get("worker") if isinstance(beat, dict) else "?"
                ok, _ = self.fail(self._claim_of(t), f"lease expired: no heartbeat from {who} for {now - last:.0f}s",
                                  retry=True, max_retries=max_retries, checkpoint=t.user_attrs.get(WRITES_ATTR))
                if ok:
                    reaped.append(t.user_attrs["trial_id"])
                seen.pop(t.number, None)
        self._unbeaten = seen
        return reaped

    # ------------------------------------------------------------------ reading
    def _attempts_by_id(self) -> dict[str, list[FrozenTrial]]:
        """Every attempt of every trial, by trial id, in queue order."""
        by_id: dict[str, list[FrozenTrial]] = {}
        for t in self.trials():
            by_id.setdefault(t.user_attrs.get("trial_id", f"#{t.number}"), []).append(t)
        return by_id

    def records(self) -> list[TrialRecord]:
        """One record per logical trial, in queue order."""
        out = []
        for tid, attempts in self._attempts_by_id().items():
            done = [t for t in attempts if t.state in (COMPLETE, PRUNED)]
            running = [t for t in attempts if t.state == RUNNING]
            waiting = [t for t in attempts if t.state == WAITING]
            last = (done or running or waiting or attempts)[-1]
            state = ("complete" if done[-1].state == COMPLETE else "pruned") if done else \
                "running" if running else "waiting" if waiting else "failed"
            ua = last.user_attrs
            out.append(
                TrialRecord(
                    trial_id=tid,
                    sae_type=ua.get("sae_type", "?"),
                    state=state,
                    # an interrupted run keeps its attempt number: it is not counted again
                    attempts=len({t.user_attrs.get("attempt", 1) for t in attempts if t.state != WAITING}),
                    params=dict(last.params),
                    metrics=current_names(dict(ua.get("metrics", {}))),
                    reason=(done[-1].user_attrs.get("reason") if done else
                            attempts[-1].user_attrs.get("reason") if attempts[-1].state == FAIL else None),
                    run_dir=ua.get("run_dir"),
                    worker=ua.get("worker"),
                    device=ua.get("device"),
                    duration_s=(last.duration.total_seconds() if last.duration else None),
                    number=last.number,
                    last_failure=next((t.user_attrs.get("reason") for t in reversed(attempts) if t.state == FAIL),
                                      None),
                )
            )
        return out

    def counts(self) -> dict[str, int]:
        """Trials by state (:func:`tally` of :meth:`records`, without ``retrying``)."""
        c = tally(self.records())
        c.pop("retrying")
        return c


STATES = ("complete", "failed", "waiting", "running", "pruned")


def tally(records: Sequence[TrialRecord]) -> dict[str, int]:
    """The one count of a sweep's trials that every command shows: trials (not attempts) by
    state, a trial that failed and later completed counting as complete; ``retrying``: the
    waiting ones whose last attempt failed (a re-run gives them their next attempt)."""
    c = {k: 0 for k in STATES}
    c["retrying"] = 0
    for r in records:
        c[r.state] += 1
        if r.state == "waiting" and r.last_failure and r.attempts:
            c["retrying"] += 1
    return c


def count_line(c: dict[str, int]) -> str:
    """``3 complete, 1 failed, 2 waiting (2 after a failed attempt), 0 running``."""
    waiting = f"{c.get('waiting', 0)} waiting" + (f" ({c['retrying']} after a failed attempt)" if c.get("retrying") else "")
    pruned = f", {c['pruned']} pruned" if c.get("pruned") else ""
    return f"{c.get('complete', 0)} complete, {c.get('failed', 0)} failed, {waiting}, {c.get('running', 0)} running{pruned}"


def failure_line(records: Sequence[TrialRecord]) -> Optional[str]:
    """When no trial of ``records`` completed but some failed (for good or for now): the most
    common reason, with how many trials it stopped."""
    from collections import Counter

    if not records or any(r.state in ("complete", "pruned") for r in records):
        return None
    reasons = Counter(r.last_failure for r in records if r.last_failure)
    if not reasons:
        return None
    reason, n = reasons.most_common(1)[0]
    return f"no trial completed: {n} of {len(records)} failed with: {reason}"


def _distribution(value: Any) -> BaseDistribution:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return CategoricalDistribution([value])
    return FloatDistribution(float(value), float(value))


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
