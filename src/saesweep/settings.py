"""Every environment variable saesweep reads, in one place: its name, its default and what it
changes. Code reads them through :func:`env`, which refuses a name not declared here."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Setting:
    name: str
    default: Optional[str]
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("SAESWEEP_CACHE", None, "the cache folder (activations, and the architectures' declarations) when a config gives no cache_dir "
            "(default ~/.cache/saesweep)"),
    Setting("SAESWEEP_CACHE_WAIT_S", "7200", "cache_mode wait: seconds to wait for another process's cache entry"),
    Setting("SAESWEEP_CACHE_WAIT_POLL_S", "5", "cache_mode wait: seconds between looks"),
    Setting("SAESWEEP_STEP", "fused", "the training step: fused (hand-written gradients) or autograd (the reference)"),
    Setting("SAESWEEP_PACK_MODE", None, "a pack's members computed one by one (loop) or batched (stacked); "
            "default: loop on CPU, stacked elsewhere"),
    Setting("SAESWEEP_CHUNK", None, "tokens per chunk of the fused step (default: the step plan's)"),
    Setting("SAESWEEP_SPLICE", "tail", "LM-loss metrics: run only the layers after the hook (tail) or a whole "
            "forward per SAE (full)"),
    Setting("SAESWEEP_MALLOC_TUNE", "1", "0 leaves glibc's allocator settings alone"),
    Setting("SAESWEEP_DEBUG", None, "set: a command that fails unexpectedly shows its traceback instead of one line "
                                    "(as --debug does)"),
    Setting("SAESWEEP_SLOW_SLOTS", None, "testing: 'cpu:1=1.5' makes that slot's workers wait 1.5 s more per trial"),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def env(name: str) -> Optional[str]:
    """The value of the setting ``name`` (its default when unset or empty)."""
    setting = _BY_NAME[name]  # a KeyError here is a setting missing from SETTINGS
    return os.environ.get(name) or setting.default


def cache_root(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """``cache_dir``, else ``$SAESWEEP_CACHE``, else ``~/.cache/saesweep``."""
    root = cache_dir or env("SAESWEEP_CACHE") or Path.home() / ".cache" / "saesweep"
    return Path(root).expanduser()
