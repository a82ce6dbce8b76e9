"""Experiment tracking sinks (W&B). A tracker gets ``log(config, record)`` at every training log
step and ``finish(claim, result)`` when a trial ends.

W&B is used when the sweep spec says ``tracking: {wandb: true}``; it is never required: without
the ``wandb`` package, or when it misbehaves, the sweep runs on with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional


def make_tracker(spec: Any, store: Any = None) -> Optional[Any]:
    """The tracker the sweep spec asks for, or None."""
    tracking = getattr(spec, "tracking", None)
    if not getattr(tracking, "wandb", False):
        return None
    from saesweep.tracking.wandb import WandbTracker, resolve_mode

    mode = resolve_mode(tracking.mode)
    if mode == "disabled":
        return None
    try:
        import wandb  # noqa: F401
    except ImportError:
        warnings.warn("tracking.wandb is on but the wandb package is not installed "
                      "(pip install 'saesweep[wandb]'); the sweep runs without W&B", stacklevel=2)
        return None
    return WandbTracker(spec, store, mode=mode)


__all__ = ["make_tracker"]
