"""The sweep engine: a worker claims packs of trials from the store, trains them, records results.

Every front end ends here: config-file runs, the in-memory sweep, the bash script, device
schedulers (a device worker is a worker pinned to a device) and workers on other hosts.

A worker loops: reap expired leases, claim a pack of compatible waiting trials, train it with
``run_pack`` while a heartbeat thread renews the leases, then record each member as complete or
failed (failed attempts are retried up to ``max_retries`` unless they diverged). It stops when
the sweep has no waiting and no running trials, when told to stop, or after
``max_consecutive_failures`` failures in a row.
"""

from __future__ import annotations

import errno
import json
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from optuna.trial import FrozenTrial

from saesweep import packing
from saesweep.config.experiment import ExperimentConfig
from saesweep.config.sweep import ExecutionSpec, SweepSpec
from saesweep.data import open_source
from saesweep.sweep.search import (
    ask_trials,
    grid_spaces,
    inferred_spaces,
    pruning_callback,
)
from saesweep.sweep.store import (
    EVALUATE_FROM_ATTR,
    RETRY_MAX_WAIT_S,
    RUNNING,
    WAITING,
    Claim,
    SweepStore,
    new_worker_id,
)
from saesweep.sweep.progress_log import PROGRESS_FOLDER, PackProgress
from saesweep.sweep.urls import redact
from saesweep.tracking import make_tracker
from saesweep.training.run import INTERRUPTED, EvaluationFailed, RunResult, finished_result, run_pack
from saesweep.training.trainer import resolve_device


class SweepAborted(RuntimeError):
    """Too many failures in a row, or a full disk: the sweep stops with a clear message."""

    exit_code = 1


#: the exit code of a worker that gave up on an unreachable database (BSD's EX_TEMPFAIL: try again later)
EXIT_OUTAGE = 75


class OutageAborted(SweepAborted):
    """The database stayed unreachable past ``execution.outage_budget_s``: nothing is lost, and
    running the same command again when it is back carries on."""

    exit_code = EXIT_OUTAGE


@dataclass
class WorkerStats:
    worker: str
    device: str
    trials_done: int = 0
    trials_failed: int = 0
    packs: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    wall_s: float = 0.0
    lost_leases: int = 0
    aborted: Optional[str] = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.busy_s if self.busy_s else 0.0

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(tokens_per_s=self.tokens_per_s, busy_fraction=self.busy_fraction)
        return d


class Heartbeat(threading.Thread):
    """Renews the leases of a pack's claims every ``every_s`` while it trains; ``lost`` holds
    the trials another worker reaped meanwhile."""

    def __init__(self, store: Any, claims: list[Claim], worker: str, every_s: float) -> None:
        """``store``: the SweepStore, or the worker's retrying view of it."""
        super().__init__(daemon=True)
        self.store, self.claims, self.worker, self.every_s = store, claims, worker, every_s
        self.stop_event = threading.Event()
        self.lost: set[int] = set()
        self.all_lost = threading.Event()  # every lease was taken away: training on is wasted
        self.written: Optional[str] = None  # a checkpoint the pack wrote, to record with the next beat

    def checkpoint_written(self, path: Path) -> None:
        """Called by the trainer after a checkpoint write: the next beat records it (training
        never waits on the database for it)."""
        self.written = path.name

    def run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            live = [c for c in self.claims if c.trial_pk not in self.lost]
            try:
                for c in self.store.heartbeat(live, self.worker):
                    self.lost.add(c.trial_pk)
                written, self.written = self.written, None
                if written is not None:
                    self.store.set_checkpoint([c for c in live if c.trial_pk not in self.lost], written)
            except Exception:  # a transient storage error: try again at the next beat
                pass
            if len(self.lost) == len(self.claims):
                self.all_lost.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


class RetryingStore:
    """The store as a worker uses it: each call below is retried through lost database connections
    (what the backend's ``is_retryable`` says; backing off from 1 s to 15 s) for up to
    ``give_up_s`` (``execution.outage_budget_s``): a database restart or failover must not kill a
    worker. One line says when the database is lost and one when it is back; training goes on
    meanwhile (only the heartbeat thread and the recording of results wait). When it is back, the
    sweep notes the time, and no lease is reaped until every worker has had a lease's time to
    heartbeat again (:meth:`.SweepStore.reap_expired`)."""

    def __init__(self, store: SweepStore, give_up_s: float, label: str = "saesweep worker") -> None:
        import tenacity

        self.store, self.backend, self.give_up_s, self.label = store, store.backend, give_up_s, label
        self._outage_lock = threading.Lock()
        self._down_since: Optional[float] = None
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(store.backend.is_retryable),
            wait=tenacity.wait_exponential(multiplier=1, min=1, max=RETRY_MAX_WAIT_S),
            stop=tenacity.stop_after_delay(give_up_s),
            before_sleep=self._lost,
            sleep=lambda s: time.sleep(s),
            reraise=True,
        )

    def _lost(self, state: Any) -> None:
        with self._outage_lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        error = state.outcome.exception() if state.outcome is not None else None
        print(f"{self.label}: database unreachable ({type(error).__name__}); retrying for up to "
              f"{self.give_up_s:.0f}s while training goes on", file=sys.stderr)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = self._retrying(fn, *args, **kwargs)
        if self._down_since is not None:
            self._back()
        return out

    def _back(self) -> None:
        """A call went through during an outage: the database is back if a write to it goes
        through too (some calls touch nothing), and then the sweep notes the outage's end."""
        try:
            self.store.note_outage_end()
        except Exception as e:
            if self.backend.is_retryable(e):
                return  # still away
            raise
        with self._outage_lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            print(f"{self.label}: database reachable again after {time.monotonic() - since:.0f}s", file=sys.stderr)

    # the store's calls a worker makes, each retried
    def claim(self, *args: Any, **kwargs: Any) -> list[Claim]:
        return self._call(self.store.claim, *args, **kwargs)

    def complete(self, *args: Any, **kwargs: Any) -> bool:
        return self._call(self.store.complete, *args, **kwargs)

    def fail(self, *args: Any, **kwargs: Any) -> tuple[bool, bool]:
        return self._call(self.store.fail, *args, **kwargs)

    def prune(self, *args: Any, **kwargs: Any) -> bool:
        return self._call(self.store.prune, *args, **kwargs)

    def heartbeat(self, *args: Any, **kwargs: Any) -> list[Claim]:
        return self._call(self.store.heartbeat, *args, **kwargs)

    def hold_lease(self, worker: str) -> None:
        self._call(self.store.hold_lease, worker)

    def release_lease(self, worker: str) -> None:
        self._call(self.store.release_lease, worker)

    def reap_expired(self, *args: Any, **kwargs: Any) -> list[str]:
        if self._down_since is not None:  # coming out of an outage: note its end before judging leases
            self._back()
            if self._down_since is not None:
                return []
        return self._call(self.store.reap_expired, *args, **kwargs)

    def set_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self._call(self.store.set_checkpoint, *args, **kwargs)

    def trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        return self._call(self.store.trials, *args, **kwargs)

    def trial(self, trial_pk: int) -> FrozenTrial:
        return self._call(self.store.trial, trial_pk)

    def unevaluated_checkpoints(self) -> set[str]:
        return self._call(self.store.unevaluated_checkpoints)

    def add_running(self, *args: Any, **kwargs: Any) -> Claim:
        return self._call(self.store.add_running, *args, **kwargs)

    def add_waiting(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(self.store.add_waiting, *args, **kwargs)

    @property
    def info(self) -> dict[str, Any]:
        return self._call(lambda: self.store.info)

    # what sampled search and pruning read and write directly (not retried, as one call each)
    def lock(self) -> Any:
        return self.store.lock()

    @property
    def storage(self) -> Any:
        return self.store.storage

    @property
    def study(self) -> Any:
        return self.store.study


class Worker:
    """Claims and runs packs until the sweep is done (see the module docstring)."""

    def __init__(
        self,
        store: SweepStore,
        execution: ExecutionSpec,
        *,
        device: str = "cpu",
        slot: str = "",
        show_progress: Optional[bool] = False,
        stop: Optional[threading.Event] = None,
        poll_s: float = 2.0,
        accept: Optional[Callable[[Any], bool]] = None,
        share: int = 1,
        max_pack: Optional[int] = None,
        slow_s: float = 0.0,
    ) -> None:
        """``slow_s``: seconds this worker waits per trial before training a pack, as a slower
        device would take (the scheduler's tests give one slot a slow device)."""
        if max_pack is not None and max_pack < execution.pack_size:  # this slot's device fits no larger pack
            execution = execution.model_copy(update={"pack_size": max(1, int(max_pack))})
        self.store, self.ex = RetryingStore(store, execution.outage_budget_s), execution
        self.device = device
        self.show_progress = show_progress
        self.stop = stop or threading.Event()
        self.poll_s = poll_s
        self.accept = accept
        self.share = max(1, share)  # workers sharing the queue: a pack takes at most its share of a group
        self.slot = slot or device
        self.worker_id = new_worker_id(self.slot)
        self._data: Any = None  # the activations of the last pack, and what they were opened for
        self._data_key: Optional[str] = None
        self.stats = WorkerStats(self.worker_id, device)
        self.slow_s = slow_s
        info = store.info
        self.objectives = list(info.get("objectives", ["fvu"]))
        self.checkpoint_dir = Path(info.get("checkpoint_dir", "runs/.checkpoints"))
        self.spec = SweepSpec.model_validate(info["spec"]) if "spec" in info else None
        self._progress = PackProgress(self.checkpoint_dir.parent / PROGRESS_FOLDER, self.worker_id)
        self.tracker = None
        if self.spec is not None:

            self.tracker = make_tracker(self.spec, store)

    # --------------------------------------------------------------------- loop
    def run(self) -> WorkerStats:
        t0 = time.perf_counter()
        consecutive = 0
        self.store.hold_lease(self.worker_id)
        try:
            while not self.stop.is_set():
                self.store.reap_expired(self.ex.lease_s, self.ex.max_retries)
                claims = self.store.claim(self.worker_id, self.ex.pack_size, accept=self._accepts, share=self.share)
                if not claims and self.spec is not None and not self.spec.search.is_grid:

                    claims = ask_trials(self.store, self.spec, self.worker_id, self.ex.pack_size)
                if not claims:
                    if not self._more_may_come():
                        self._clear_checkpoints()
                        break
                    self.stop.wait(self.poll_s)  # others are running: wait, maybe reclaim later
                    continue
                ok, failed = self.run_claims(claims)
                consecutive = 0 if ok else consecutive + failed
                if consecutive >= self.ex.max_consecutive_failures:
                    msg = (f"{consecutive} trials failed in a row on {self.worker_id}; stopping this worker "
                           f"(last reason: {self._last_reason})")
                    self.stats.aborted = msg
                    raise SweepAborted(msg)
        except Exception as e:
            if not self.store.backend.is_retryable(e):
                raise
            msg = (f"the sweep's database ({redact(self.store.store.url)}) was unreachable for more than "
                   f"{self.ex.outage_budget_s:.0f}s (execution.outage_budget_s): stopping this worker; the trials it "
                   f"finished are saved in their run folders, and the same command run again once the database is "
                   f"back records them and carries on (exit code {EXIT_OUTAGE})")
            self.stats.aborted = msg
            raise OutageAborted(msg) from None
        finally:
            try:
                self.store.release_lease(self.worker_id)
            except Exception as e:
                if not self.store.backend.is_retryable(e) and not isinstance(sys.exc_info()[1], OutageAborted):
                    raise
            self._drop_data()
            self.stats.wall_s = time.perf_counter() - t0
        return self.stats

    _last_reason: str = ""

    def _accepts(self, t) -> bool:
        if self.slot in t.user_attrs.get("avoid", ()):  # ran out of memory here before
            return False
        return self.accept is None or self.accept(t)

    def _more_may_come(self) -> bool:
        """Trials this worker could still get: waiting ones, or running ones whose lease may expire."""

        return any(self._accepts(t) for t in self.store.trials([WAITING, RUNNING]))

    def _adopt_finished(self, claims: list[Claim]) -> tuple[list[Claim], int]:
        """Record the claims whose run folder already holds a finished result (trained by a worker
        that could not record it: the database was away, or its lease lapsed); returns the claims
        left to train and how many were recorded."""
        left, done = [], 0
        for c in claims:
            metrics = finished_result(c.config)
            if metrics is None:
                left.append(c)
                continue
            extra = {**self._result_attrs(c.config.run_dir, metrics), "adopted": True}
            if self.store.complete(c, metrics, objectives=self.objectives, extra=extra):
                done += 1
                print(f"saesweep worker {self.slot}: {c.trial_id} was trained and saved already; recorded from "
                      f"{c.config.run_dir}", file=sys.stderr)
        self.stats.trials_done += done
        return left, done

    def run_claims(self, claims: list[Claim]) -> tuple[int, int]:
        """Train one pack; returns (trials completed, trials failed)."""
        claims, adopted = self._adopt_finished(claims)
        if not claims:
            return adopted, 0
        if self.slow_s:
            t0 = time.perf_counter()
            self.stop.wait(self.slow_s * len(claims))
            self.stats.busy_s += time.perf_counter() - t0
        configs = [c.config for c in claims]
        beat = Heartbeat(self.store, claims, self.worker_id, self.ex.heartbeat_s)
        beat.start()
        t0 = time.perf_counter()
        ckpt = self.checkpoint_dir / packing.checkpoint_name(c.trial_id for c in claims)
        # trials interrupted in a pack are claimed together again (store.claim) and resume from
        # its checkpoint, also when fewer of them fit in this pack; this pack saves its own file
        earlier = {c.checkpoint for c in claims}
        only = earlier.pop() if len(earlier) == 1 else None
        resume = self.checkpoint_dir / only if only is not None else None
        # until this pack writes its own checkpoint, a reaped member resumes from the one it came from
        self.store.set_checkpoint(claims, only if resume is not None and resume.exists() else ckpt.name)
        should_prune = None
        if self.spec is not None and self.spec.search.pruner != "none":

            should_prune = pruning_callback(self.store, self.spec, claims)
        progress = self._progress
        progress.start([c.trial_id for c in claims], configs[0].train.steps, configs[0].train.batch_size)
        tracker = self.tracker

        def on_log(cfg: ExperimentConfig, record: dict) -> None:
            progress.log(cfg, record)
            if tracker is not None:
                tracker.log(cfg, record)

        try:
            results = run_pack(configs, device=self.device, show_progress=self.show_progress, data=self._data_for(configs[0]),
                               checkpoint=ckpt, checkpoint_every_s=self.ex.checkpoint_every_s,
                               checkpoint_min_s=self.ex.checkpoint_floor_s, resume_from=resume,
                               on_checkpoint=beat.checkpoint_written,
                               on_log=on_log,
                               should_stop=lambda: self.stop.is_set() or beat.all_lost.is_set(),
                               should_prune=should_prune)
        except Exception as e:
            beat.stop()
            progress.end()
            self.stats.busy_s += time.perf_counter() - t0
            if _is_oom(e):
                return self._out_of_memory(claims)
            if isinstance(e, EvaluationFailed):
                return self._evaluation_failed(claims, e)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # no trial is at fault: stop here
                for c in claims:
                    self.store.fail(c, "disk full", retry=True, same_attempt=True,
                                    checkpoint=ckpt.name if ckpt.exists() else None)
                msg = f"disk full ({e.filename or 'a write'}): stopping this worker; free some space and run again"
                self.stats.aborted = msg
                raise SweepAborted(msg) from None
            reason = f"{type(e).__name__}: {e}".strip()
            self._last_reason = reason
            for c in claims:  # the whole pack failed: every member is retried
                self.store.fail(c, reason, retry=True, max_retries=self.ex.max_retries,
                                extra={"traceback": traceback.format_exc()[-4000:], "worker": self.worker_id,
                                       "slot": self.slot})
                self._track_finish(c, RunResult(c.trial_id, "failed", c.config.run_dir, c.config, {}, reason))
            self.stats.trials_failed += len(claims)
            return 0, len(claims)
        except BaseException:
            beat.stop()
            progress.end()
            raise
        progress.end()
        self.stats.busy_s += time.perf_counter() - t0
        self.stats.packs += 1
        try:  # the leases are kept alive until every result is recorded (the database may be slow to return)
            done, failed = self._record(claims, results, beat, ckpt, resume)
        finally:
            beat.stop()
        return done + adopted, failed

    def _evaluation_failed(self, claims: list[Claim], e: EvaluationFailed) -> tuple[int, int]:
        """Training finished but evaluation raised: the trials fail with the reason, their weights
        in their run folders and their trained state in the pack's checkpoint, which the next run
        of the sweep evaluates without training again (:meth:`.SweepStore.requeue_unevaluated`)."""
        self._last_reason = e.reason
        extra: dict[str, Any] = {"worker": self.worker_id, "slot": self.slot,
                                 "traceback": traceback.format_exc()[-4000:]}
        if e.checkpoint is not None:
            extra[EVALUATE_FROM_ATTR] = e.checkpoint.name
        for c in claims:
            self.store.fail(c, e.reason, retry=False, extra=extra)
            self._track_finish(c, RunResult(c.trial_id, "failed", c.config.run_dir, c.config, {}, e.reason))
        self.stats.trials_failed += len(claims)
        return 0, len(claims)

    def _result_attrs(self, run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
        """What a trial's record says of where and by whom it was trained."""
        return {"run_dir": str(Path(run_dir).resolve()), "worker": self.worker_id, "slot": self.slot,
                "device": metrics.get("device", self.device)}

    def _record(self, claims: list[Claim], results: list[RunResult], beat: Heartbeat, ckpt: Path,
                resume: Optional[Path]) -> tuple[int, int]:
        """Record a trained pack's results; returns (trials completed, trials failed)."""
        done = failed = 0
        for c, r in zip(claims, results):
            extra = self._result_attrs(r.run_dir, r.metrics)
            if c.trial_pk in beat.lost:  # reaped by another worker: our result is not recorded
                self.stats.lost_leases += 1
                self._track_finish(c, r)
                continue
            if r.ok:
                if self.store.complete(c, r.metrics, objectives=self.objectives, extra=extra):
                    done += 1
                    self.stats.tokens += int(r.metrics.get("tokens", 0))
                else:
                    self.stats.lost_leases += 1
            elif r.status == "pruned":
                self.store.prune(c, r.reason or "pruned", r.metrics.get("last_log"))
            elif r.reason == INTERRUPTED:  # stopped on request: back in the queue, the attempt not counted
                self.store.fail(c, r.reason, retry=True, max_retries=self.ex.max_retries, extra=extra, same_attempt=True,
                                checkpoint=ckpt.name if ckpt.exists() else None)
            else:
                self._last_reason = r.reason or "failed"
                self.store.fail(c, r.reason or "failed", retry=False, extra=extra)  # divergence is not retried
                failed += 1
            self._track_finish(c, r)
        if not any(r.reason == INTERRUPTED for r in results):  # every member is finished, whatever its end
            ckpt.unlink(missing_ok=True)
        if resume is not None and resume != ckpt:
            self._drop_if_unused(resume)
        self.stats.trials_done += done
        self.stats.trials_failed += failed
        return done, failed


    def _clear_checkpoints(self) -> None:
        """Nothing left to run anywhere in the sweep: no checkpoint can be resumed any more."""
        if self.store.trials([WAITING, RUNNING]) or not self.checkpoint_dir.is_dir():
            return
        keep = self.store.unevaluated_checkpoints()  # trained packs whose evaluation failed
        for f in self.checkpoint_dir.iterdir():  # checkpoints, and temp files of killed writers
            if f.is_file() and f.name not in keep:
                f.unlink(missing_ok=True)

    def _drop_if_unused(self, path: Path) -> None:
        """Delete an interrupted pack's checkpoint once no queued or running trial resumes from it."""
        if not any(t.user_attrs.get("checkpoint") == path.name for t in self.store.trials([WAITING, RUNNING])) \
                and path.name not in self.store.unevaluated_checkpoints():
            path.unlink(missing_ok=True)

    def _data_for(self, cfg: ExperimentConfig) -> Any:
        """The activations ``cfg`` trains and evaluates on, kept from one pack to the next: a
        sweep's packs mostly share them, so the cache entry, the held-out set and the LM for the
        CE metrics are opened once per worker instead of once per pack."""

        dev = resolve_device(self.device or cfg.train.device)
        key = json.dumps([cfg.source.model_dump(mode="json"), cfg.cache_dir, cfg.cache_mode, cfg.train.tokens,
                          cfg.eval.model_dump(mode="json"), str(dev)], sort_keys=True)
        if key != self._data_key:
            self._drop_data()
            # a sweep over hooks: the first worker to need one of them fills them all, one LM pass
            self._data = open_source(cfg, device=dev, hooks=self.spec.hooks() if self.spec is not None else ())
            self._data_key = key
        return self._data

    def _drop_data(self) -> None:
        data, self._data, self._data_key = self._data, None, None
        if data is not None:
            data.close()

    def _track_finish(self, claim: Claim, result: Any) -> None:
        if self.tracker is not None:
            self.tracker.finish(claim, result)

    def _out_of_memory(self, claims: list[Claim]) -> tuple[int, int]:
        """The device ran out of memory on this pack (called from ``run_claims``' handler).

        First the failed attempt's tensors are released: the traceback's frames still hold
        them, so they are cleared before the allocator cache is emptied. A pack is split: its
        second half goes back to the queue (the attempt not counted), this worker lowers its own
        pack size to the half and trains the first half. A single trial goes back to the queue
        marked to avoid this slot, the attempt not counted, while another slot of the sweep may
        take it; when every slot has run out of memory on it, it fails.
        """
        self._drop_data()  # its tensors (an LM for the CE metrics) may hold device memory too
        exc = sys.exc_info()[1]
        if exc is not None and exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        del exc
        _free_device_memory()
        if len(claims) > 1:
            half = len(claims) // 2
            if half < self.ex.pack_size:
                self.ex = self.ex.model_copy(update={"pack_size": half})
            for c in claims[half:]:  # back to the queue, attempt not counted
                self.store.fail(c, f"out of memory in a pack of {len(claims)} on {self.slot}: pack split",
                                retry=True, same_attempt=True, extra={"worker": self.worker_id})
            return self.run_claims(claims[:half])
        c = claims[0]
        t = self.store.trial(c.trial_pk)
        avoided = set(t.user_attrs.get("avoid", ())) | {self.slot}
        slots = set(self.store.info.get("slots") or ())
        others = slots - avoided
        self.stats.trials_failed += 1
        if others:
            self._last_reason = f"out of memory on {self.slot}; retried on another slot"
            self.store.fail(c, self._last_reason, retry=True, same_attempt=True, avoid_slot=self.slot,
                            extra={"worker": self.worker_id})
            return 0, 0  # not a failure of the trial: it runs elsewhere
        if slots:
            self._last_reason = f"out of memory on every slot ({', '.join(sorted(avoided))})"
            self.store.fail(c, self._last_reason, retry=False, extra={"worker": self.worker_id})
            return 0, 1
        self._last_reason = f"out of memory on {self.slot}"  # slots unknown: an ordinary retry, elsewhere
        self.store.fail(c, self._last_reason, retry=True, max_retries=self.ex.max_retries, avoid_slot=self.slot,
                        extra={"worker": self.worker_id})
        return 0, 1


def _is_oom(e: BaseException) -> bool:
    import torch

    oom: Any = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or "out of memory" in str(e).lower()


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------- sweep set-up
def open_sweep(spec: SweepSpec) -> SweepStore:
    """Open (or create) the sweep's store, recording the spec the first time."""
    store = SweepStore(spec.storage_url, spec.name, directions=spec.search.directions)
    stored = spec.model_dump(mode="json")
    if stored.get("storage"):
        stored["storage"] = redact(stored["storage"])  # never keep a password in the sweep
    info = store.info
    if "spec" not in info:
        store.set_info(objectives=spec.search.objectives, spec=stored,
                       checkpoint_dir=str(spec.sweep_dir.resolve() / "checkpoints"), created=time.time())
    elif {k: info["spec"].get(k) for k in ("execution", "tracking", "search")} != {k: stored[k] for k in ("execution", "tracking", "search")}:
        store.set_info(spec={**info["spec"], **{k: stored[k] for k in ("execution", "tracking", "search")}})
    return store


def queue_trials(store: SweepStore, spec: SweepSpec, configs: Sequence[ExperimentConfig], *, from_files: bool = False) -> int:
    """Queue ``configs`` (idempotent: trial ids the sweep already holds are kept as they are)."""

    params, spaces = inferred_spaces(configs) if from_files else grid_spaces(spec, configs)
    return store.add_trials(configs, params, spaces)
