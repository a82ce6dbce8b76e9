"""W&B logging of every trial, through the real ``wandb`` package.

One W&B run per trial attempt: its config (the resolved experiment config, flat swept
parameters, trial id, sweep), its training curves (``train/loss``, ``train/mse``, ``train/l0``,
... against the training step), its final metrics in the run summary (``fvu``, ``l0``, ...,
under the same names as in saesweep's results) and where and how it ran (``device``, ``host``,
``tokens_per_s``, ``run_dir``, ``state``). Runs are grouped by sweep (``tracking.group``,
default the sweep name) and typed by SAE type (``job_type``).

A pack trains several trials in one process at once, so the tracker holds one ``wandb.Run``
per trial (``wandb.init(reinit="create_new")``) and logs through each run object.

Mode: the ``WANDB_MODE`` environment variable wins; otherwise ``tracking.mode``, where
``auto`` means online when W&B credentials exist (``WANDB_API_KEY``, or a netrc entry for the
W&B host, as ``wandb login`` writes) and offline otherwise. Offline runs are written under
``WANDB_DIR`` (default: the sweep's folder) and can be uploaded later with ``wandb sync``.

W&B never stops a sweep: the first error is reported once as a warning and the tracker turns
itself off for the rest of the process.
"""

from __future__ import annotations

import atexit
import math
import os
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

#: training-log keys that are not sent under ``train/`` (every other numeric one is: the losses,
#: each auxiliary term by its name, lr, the steered coefficient)
NOT_LOGGED = ("step", "tokens")
DEFAULT_BASE_URL = "https://api.wandb.ai"


# ---------------------------------------------------------------------- mode
def has_credentials() -> bool:
    """Whether W&B credentials exist on this machine (no network access)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
    try:  # wandb's own netrc reader (private API; the fallback below reads the same file)
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(read_netrc_auth(host=host))
    except Exception:
        pass
    import netrc
    from urllib.parse import urlparse

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        auth = netrc.netrc(path).authenticators(urlparse(host).hostname or host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(mode: str = "auto") -> str:
    """online | offline | disabled: ``WANDB_MODE`` first, then the spec's mode (see module doc)."""
    env = (os.environ.get("WANDB_MODE") or "").strip().lower()
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if (os.environ.get("WANDB_DISABLED") or "").lower() in ("true", "1", "yes"):
        return "disabled"
    if mode != "auto":
        return mode
    return "online" if has_credentials() else "offline"


# ------------------------------------------------------------------- tracker
class WandbTracker:
    """Logs the trials of a sweep worker to W&B (see the module docstring)."""

    def __init__(self, spec: Any = None, store: Any = None, *, mode: Optional[str] = None,
                 project: Optional[str] = None, entity: Optional[str] = None, group: Optional[str] = None,
                 wandb_dir: Optional[str] = None) -> None:
        tracking = getattr(spec, "tracking", None)
        self.sweep = getattr(spec, "name", None) or getattr(store, "name", None)
        self.mode = mode or resolve_mode(getattr(tracking, "mode", "auto"))
        self.project = project or getattr(tracking, "project", None) or "saesweep"
        self.entity = entity or getattr(tracking, "entity", None)
        self.group = group or getattr(tracking, "group", None) or self.sweep
        self.dir = wandb_dir or os.environ.get("WANDB_DIR") or (str(spec.sweep_dir) if spec is not None else None)
        self.spec = spec
        self.runs: dict[str, Any] = {}  # trial id -> open wandb Run
        self.last_step: dict[str, int] = {}
        self.broken: Optional[str] = None
        self._lock = threading.Lock()
        atexit.register(self.close)

    # --------------------------------------------------------------- runs
    def _fail(self, what: str, e: BaseException) -> None:
        if self.broken is None:
            self.broken = f"{what}: {type(e).__name__}: {e}"
            warnings.warn(f"W&B logging is off for the rest of this worker ({self.broken}); the sweep goes on",
                          stacklevel=3)
            print(f"saesweep: warning: W&B logging turned off: {self.broken}", file=sys.stderr)

    def _init_run(self, config) -> Any:
        import wandb

        if self.dir:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
        params = {p: getattr(config, p) for p in _swept(self.spec, config)}
        run_config = {**config.to_dict(), **params, "trial_id": config.trial_id, "sweep": self.sweep}
        return wandb.init(
            project=self.project, entity=self.entity, group=self.group, job_type=config.sae_type,
            name=config.trial_id, tags=[config.sae_type], config=run_config, mode=self.mode, dir=self.dir,
            reinit="create_new", settings=wandb.Settings(console="off", silent=True),
        )

    def run_for(self, config) -> Optional[Any]:
        """The open run of a trial, started on first use (None when W&B is off)."""
        if self.broken:
            return None
        run = self.runs.get(config.trial_id)
        if run is None:
            try:
                run = self._init_run(config)
            except Exception as e:
                self._fail("wandb.init", e)
                return None
            self.runs[config.trial_id] = run
        return run

    def attach(self, config, run: Any) -> None:
        """Log a trial to a run started elsewhere (the W&B sweep agent's ``wandb.init()``)."""
        self.runs[config.trial_id] = run

    # ------------------------------------------------------------ logging
    def log(self, config, record: dict) -> None:
        """One training log record of one trial (``on_log`` of the trainer)."""
        if self.broken:
            return
        with self._lock:
            step = int(record.get("step", 0))
            tid = config.trial_id
            if tid in self.runs and step <= self.last_step.get(tid, -1):
                # the same trial starts again (a retry, or a resume from a checkpoint) in this
                # process: the earlier attempt ended without finish(); close it as failed
                self._finish_run(tid, {"state": "restarted"}, exit_code=1)
            run = self.run_for(config)
            if run is None:
                return
            data = {f"train/{k}": float(v) for k, v in record.items() if k not in NOT_LOGGED and _finite(v)}
            if "tokens" in record:
                data["tokens"] = int(record["tokens"])
            try:
                run.log(data, step=step)
            except Exception as e:
                self._fail("wandb.log", e)
            self.last_step[tid] = step

    def finish(self, claim, result) -> None:
        """A trial ended (complete, failed or pruned): final metrics and device, then close its run."""
        if self.broken:
            return
        with self._lock:
            config = getattr(result, "config", None) or claim.config
            if self.run_for(config) is None:
                return
            summary = {k: v for k, v in (result.metrics or {}).items() if _summary_value(v)}
            summary.update(state=result.status, run_dir=str(Path(result.run_dir).resolve()), host=socket.gethostname(),
                           trial_id=config.trial_id, attempt=getattr(claim, "attempt", 1))
            if result.reason:
                summary["reason"] = result.reason[:500]
            if "last_log" in (result.metrics or {}):
                summary.update({f"last/{k}": v for k, v in result.metrics["last_log"].items() if _finite(v)})
            self._finish_run(config.trial_id, summary, exit_code=0 if result.status in ("complete", "pruned") else 1,
                             tag=result.status if result.status != "complete" else None)

    def _finish_run(self, trial_id: str, summary: dict, exit_code: int, tag: Optional[str] = None) -> None:
        run = self.runs.pop(trial_id, None)
        self.last_step.pop(trial_id, None)
        if run is None:
            return
        try:
            if tag:
                run.tags = tuple(run.tags or ()) + (tag,)
            run.summary.update(summary)
            run.finish(exit_code=exit_code)
        except Exception as e:
            self._fail("wandb.finish", e)

    def close(self) -> None:
        """Close the runs still open (their trials ended without a result: crashed or stopped)."""
        with self._lock:
            for tid in list(self.runs):
                self._finish_run(tid, {"state": "interrupted"}, exit_code=1)


def _swept(spec, config) -> list[str]:
    if spec is not None and config.sae_type in getattr(spec, "grids", {}):
        return list(spec.grids[config.sae_type])
    return []


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _summary_value(v: Any) -> bool:
    return isinstance(v, (str, bool)) or _finite(v)


