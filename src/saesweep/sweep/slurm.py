"""Workers on a cluster: a Slurm job array of ``saesweep worker`` processes, through submitit.

Each array task is one allocation (one node's share: ``--gpus_per_task`` GPUs, CPUs, memory)
and runs ``saesweep worker --storage URL --sweep NAME --devices auto`` there, which starts a
worker per device of the allocation; all of them claim packs from the sweep's one queue (a
PostgreSQL database every node can reach, or a journal file on a shared filesystem whose
locks work). A task ends when the sweep has nothing left to run.

Preemption and time limits: Slurm signals the job (``--signal=USR2@<signal_delay_s>`` before the
time limit; on preemption SIGTERM, then the same signal). submitit calls
:meth:`SweepWorkerTask.checkpoint`, which stops the task's workers the graceful way (each
checkpoints its pack and puts its trials back in the queue, the attempt not counted) and
returns the task for submitit to requeue. The requeued task, or any other worker, claims those
trials again and resumes their packs from the checkpoints (on the shared sweep folder).

Passwords: a password in the storage URL is never pickled into the job folder nor written on
a command line. :func:`password_to_env` moves it into ``PGPASSWORD`` (which libpq reads), the
job gets the URL without it, and Slurm passes the submitting environment on to the job
(sbatch's default ``--export=ALL``); better still, keep it in ``~/.pgpass`` on the cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from saesweep.errors import ConfigError
from saesweep.sweep.launcher import Launched, Launcher
from saesweep.sweep.urls import PASSWORD_ENV, password_to_env, redact, split_password


@contextlib.contextmanager
def _env_var(name: str, value: Optional[str]) -> Iterator[None]:
    """``os.environ[name] = value`` for the block (nothing when value is None)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# --------------------------------------------------------------------------- the task
def _ignore_user_signals() -> None:  # in the worker child, before exec (dispositions survive exec)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class SweepWorkerTask:
    """One array task: runs ``saesweep worker`` on this allocation until the sweep is done.

    Submitted through submitit (pickled into the job folder, so it holds no password). On
    preemption or time-out submitit calls :meth:`checkpoint` (see the module docstring).
    """

    def __init__(self, storage: str, sweep: str, *, devices: str = "auto", max_parallel: Optional[int] = None,
                 stop_timeout_s: float = 60.0, stopped_grace_s: float = 30.0, requeues: int = 0) -> None:
        self.storage, self.sweep = storage, sweep
        self.devices, self.max_parallel = devices, max_parallel
        self.stop_timeout_s, self.stopped_grace_s = stop_timeout_s, stopped_grace_s
        self.requeues = requeues
        self._proc: Optional[subprocess.Popen] = None
        self._got_term = False

    # submitit's helpers.Checkpointable protocol, without importing submitit here
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"], state["_got_term"] = None, False
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "saesweep", "worker", "--storage", self.storage, "--sweep", self.sweep,
               "--devices", self.devices]
        if self.max_parallel:
            cmd += ["--max_parallel", str(self.max_parallel)]
        return cmd

    def __call__(self, index: int = 0) -> dict[str, Any]:
        import socket

        self._watch_sigterm()
        t0 = time.time()
        print(f"saesweep launch: task {index} on {socket.gethostname()} (pid {os.getpid()}), sweep '{self.sweep}' "
              f"on {redact(self.storage)}, devices {self.devices}"
              + (f"; requeued {self.requeues} time(s)" if self.requeues else ""), flush=True)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen(self.command(), env=env, preexec_fn=_ignore_user_signals)
        while (code := self._proc.poll()) is None:
            time.sleep(0.5)
        summary = {"task": index, "exit_code": code, "requeues": self.requeues, "host": socket.gethostname(),
                   "wall_s": round(time.time() - t0, 1)}
        if code in (0, 1):  # 0: the sweep is done; 1: done, with failed trials (listed by the worker)
            return summary
        if code in (130, -signal.SIGTERM, 128 + signal.SIGTERM):
            # stopped by a signal (preemption: Slurm signals every process of the job); the
            # requeue signal usually follows at once: give submitit's handler the chance
            deadline = time.time() + self.stopped_grace_s
            while time.time() < deadline:
                time.sleep(0.2)
            return {**summary, "stopped": True}
        raise RuntimeError(f"saesweep worker exited with code {code} (see the log above)")

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Stop the workers gracefully, then hand submitit this task to requeue."""
        from submitit.helpers import DelayedSubmission

        proc = self._proc
        if proc is not None and proc.poll() is None:
            print("saesweep launch: preempted or out of time: stopping the workers "
                  "(they checkpoint their packs and requeue their trials)", flush=True)
            if not self._got_term:  # after a SIGTERM to the whole job they are stopping already
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                print(f"saesweep launch: the workers did not stop within {self.stop_timeout_s:.0f}s; killing them "
                      "(their trials are re-run after their leases expire)", flush=True)
                proc.kill()
                proc.wait()
        nxt = SweepWorkerTask(self.storage, self.sweep, devices=self.devices, max_parallel=self.max_parallel,
                              stop_timeout_s=self.stop_timeout_s, stopped_grace_s=self.stopped_grace_s,
                              requeues=self.requeues + 1)
        return DelayedSubmission(nxt, *args, **kwargs)

    def _watch_sigterm(self) -> None:
        """Remember a SIGTERM (Slurm sends one to every process of a preempted job) and pass it on
        to the handler that was there (submitit's, which logs it)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            self._got_term = True
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_term)


# ------------------------------------------------------------------------- submitting
@dataclass
class LaunchOptions:
    """What ``saesweep launch`` submits (flag names in the comments)."""

    storage: str
    sweep: str
    cluster: str = "slurm"  # --slurm | --local
    array: int = 1  # --array: tasks in the job array
    max_concurrent: Optional[int] = None  # --max_concurrent: tasks running at once (%K)
    partition: Optional[str] = None
    gpus_per_task: int = 0
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    time_min: int = 60 * 24
    devices: str = "auto"
    max_parallel: Optional[int] = None
    folder: str = "slurm_logs/%j"
    job_name: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    setup: list[str] = field(default_factory=list)  # shell lines run before the task (module load ...)
    slurm_args: dict[str, str] = field(default_factory=dict)  # any other sbatch option
    signal_delay_s: int = 120
    max_requeues: int = 10  # time-outs a task may be requeued after (preemptions are not counted)

    def check(self) -> None:
        if self.cluster not in ("slurm", "local"):
            raise ConfigError(f"launch: cluster must be slurm or local, got {self.cluster!r}")
        for name in ("array", "time_min", "signal_delay_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_min', '')}: must be at least 1, got {getattr(self, name)}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"--max_concurrent: must be at least 1, got {self.max_concurrent}")
        if self.gpus_per_task < 0:
            raise ConfigError(f"--gpus_per_task: must be 0 or more, got {self.gpus_per_task}")
        if self.signal_delay_s >= 60 * self.time_min:
            raise ConfigError(f"--signal_delay_s {self.signal_delay_s}: must be shorter than --time ({self.time_min} min)")

    @property
    def name(self) -> str:
        return self.job_name or f"saesweep-{self.sweep}"

    def task(self) -> SweepWorkerTask:
        # the workers get signal_delay_s minus a margin to checkpoint before Slurm kills the job
        return SweepWorkerTask(self.storage, self.sweep, devices=self.devices, max_parallel=self.max_parallel,
                               stop_timeout_s=max(10.0, self.signal_delay_s - 20.0))

    def executor_parameters(self) -> dict[str, Any]:
        """``AutoExecutor.update_parameters`` keyword arguments (slurm_* ones apply on Slurm only)."""
        p: dict[str, Any] = {
            "name": self.name,
            "timeout_min": int(self.time_min),
            "nodes": 1,
            "tasks_per_node": 1,
            "gpus_per_node": int(self.gpus_per_task),
            "cpus_per_task": self.cpus_per_task,
            "mem_gb": self.mem_gb,
            "slurm_partition": self.partition,
            "slurm_array_parallelism": self.max_concurrent or self.array,
            "slurm_signal_delay_s": int(self.signal_delay_s),
            "slurm_account": self.account,
            "slurm_qos": self.qos,
            "slurm_constraint": self.constraint,
            "slurm_setup": list(self.setup) or None,
            "slurm_additional_parameters": dict(self.slurm_args) or None,
        }
        return {k: v for k, v in p.items() if v is not None}

    def sbatch_parameters(self) -> dict[str, Any]:
        """The same, as sbatch options (what a dry run shows)."""
        p = self.executor_parameters()
        out: dict[str, Any] = {"job_name": p.pop("name"), "time": p.pop("timeout_min"), "nodes": p.pop("nodes"),
                               "ntasks_per_node": p.pop("tasks_per_node")}
        gpus = p.pop("gpus_per_node")
        if gpus:
            out["gpus_per_node"] = gpus
        if "cpus_per_task" in p:
            out["cpus_per_task"] = p.pop("cpus_per_task")
        if "mem_gb" in p:
            mem = p.pop("mem_gb")
            out["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
        out.update({k[len("slurm_"):]: v for k, v in p.items()})
        return out


def sbatch_preview(opts: LaunchOptions) -> str:
    """The sbatch script submitit would write for the array (needs no Slurm here)."""
    try:
        from submitit.slurm.slurm import _make_sbatch_string
    except ImportError:
        raise ConfigError("launch: needs submitit (pip install 'saesweep[slurm]')") from None
    p = opts.sbatch_parameters()
    parallelism = p.pop("array_parallelism", opts.array)
    folder = Path(opts.folder).expanduser().resolve()
    cmd = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=cmd, folder=folder, map_count=opts.array, array_parallelism=parallelism, **p)


def dry_run_lines(opts: LaunchOptions) -> list[str]:
    opts.check()
    where = "Slurm" if opts.cluster == "slurm" else "this machine (submitit's local executor)"
    lines = [f"Would submit a job array of {opts.array} worker task(s) to {where} for sweep '{opts.sweep}' "
             f"on {redact(opts.storage)}",
             f"  each task runs: python {' '.join(redact(a) for a in opts.task().command()[1:])}",
             f"  logs and job files: {opts.folder}",
             "submitit parameters:"]
    for k, v in opts.executor_parameters().items():
        lines.append(f"  {k} = {v!r}")
    if opts.cluster == "slurm":
        lines += ["sbatch script:"] + ["  " + line for line in sbatch_preview(opts).splitlines()]
    return lines


def submit(opts: LaunchOptions, *, env_password: Optional[str] = None):
    """Submit the job array; returns submitit's jobs.

    ``opts.storage`` must not hold a password (see :func:`password_to_env`): ``env_password``
    is put into ``PGPASSWORD`` for the submission only, from where sbatch (or the local
    executor) passes it to the jobs' environment.
    """
    opts.check()
    if split_password(opts.storage)[1] is not None:
        raise ConfigError("launch: the storage URL given to submit() must not hold a password; use password_to_env()")
    try:
        import submitit
    except ImportError:
        raise ConfigError("launch: needs submitit (pip install 'saesweep[slurm]')") from None
    folder = Path(opts.folder).expanduser()
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=opts.cluster,
                                         slurm_max_num_timeout=opts.max_requeues,
                                         local_max_num_timeout=opts.max_requeues)
    except RuntimeError as e:  # no srun / sbatch here
        raise ConfigError(f"launch --slurm: {e} (use --dry_run to see what would be submitted)") from None
    try:
        executor.update_parameters(**opts.executor_parameters())
    except (ValueError, NameError, AssertionError) as e:
        raise ConfigError(f"launch: submitit refused the parameters: {str(e).splitlines()[0]}") from None
    with _env_var(PASSWORD_ENV, env_password):
        jobs = executor.map_array(opts.task(), list(range(opts.array)))
    return jobs


def absolute_storage(url: str) -> str:
    """A journal path made absolute (jobs may start in another folder); URLs unchanged."""
    if "://" in url or url == ":memory:":
        return url
    prefix = "journal:" if url.startswith("journal:") else ""
    return prefix + str(Path(url[len(prefix):]).expanduser().resolve())


def parse_mem(value: str) -> float:
    """``--mem`` in GB: 32, 32G, 32GB, 500M, 500MB, 1T."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"--mem {value!r}: expected a size such as 32G, 500M or 32 (GB)")
    n, unit = float(m.group(1)), m.group(2).upper()
    return n * {"": 1, "K": 2**-20, "M": 2**-10, "G": 1, "T": 1024}[unit]


def wait_for(jobs: Sequence[Any], echo=print) -> int:
    """Wait for every job; 0 when all ended well."""
    code = 0
    for job in jobs:
        try:
            r = job.result()
            echo(f"  task {r.get('task')}: exit {r.get('exit_code')}"
                 + (f", requeued {r['requeues']} time(s)" if r.get("requeues") else "")
                 + (" (stopped)" if r.get("stopped") else ""))
            if r.get("exit_code") not in (0,) or r.get("stopped"):
                code = 1
        except Exception as e:
            echo(f"  job {job.job_id}: failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
            code = 1
    return code


class SlurmLauncher(Launcher):
    """A job array of sweep workers through submitit: on Slurm (``cluster="slurm"``), or with
    submitit's local executor on this machine (``cluster="local"``, to try a launch out). The
    storage password, if any, reaches the jobs in their environment, never in a job file."""

    def __init__(self, opts: LaunchOptions, *, password: Optional[str] = None):
        opts.check()
        self.opts, self.password = opts, password
        self.where = "Slurm" if opts.cluster == "slurm" else "this machine (submitit's local executor)"

    def describe(self, store_url: str, sweep: str) -> list[str]:
        return dry_run_lines(self.opts)

    def start(self, store) -> "SubmittedJobs":
        if store.name != self.opts.sweep:
            raise ConfigError(f"launch: the store holds sweep {store.name!r}, the jobs would run {self.opts.sweep!r}")
        return SubmittedJobs(submit(self.opts, env_password=self.password))


class SubmittedJobs(Launched):
    """submitit's jobs of one array."""

    def __init__(self, jobs: Sequence[Any]):
        self.jobs = list(jobs)
        self.ids = [str(j.job_id) for j in self.jobs]

    def wait(self) -> int:
        return wait_for(self.jobs)


__all__ = ["LaunchOptions", "SlurmLauncher", "SubmittedJobs", "SweepWorkerTask", "absolute_storage", "dry_run_lines", "parse_mem", "password_to_env",
           "sbatch_preview", "split_password", "submit", "wait_for"]
