"""Experiment tracking sinks (W&B). A tracker gets ``log(config, record)`` at every training log
step and ``finish(claim, result)`` when a trial ends."""

from __future__ import annotations

from typing import Any, Optional


def make_tracker(spec: Any, store: Any = None) -> Optional[Any]:
    """The tracker the sweep spec asks for, or None."""
    if not getattr(getattr(spec, "tracking", None), "wandb", False):
        return None
    raise NotImplementedError("W&B tracking is not implemented yet")
