"""What a trial needs besides its config, checked before any of it trains: the modules its
source, its evaluation and its tracking import. A missing one is a :class:`ConfigError` naming
it and how to install it, raised before training starts (so no training is lost to an
evaluation that cannot run)."""

from __future__ import annotations

import importlib
from typing import Iterable, Sequence

from saesweep.errors import ConfigError
from saesweep.config.experiment import ExperimentConfig

#: what each part of a trial imports: (module, pip requirement, what needs it)
_SYNTHETIC = (("scipy.optimize", "scipy>=1.10", "the recovery metrics of a synthetic source (Hungarian matching)"),)
_HF = (("transformers", "transformers>=4.45", "a language-model source"),
       ("datasets", "datasets>=2.20", "a language-model source's dataset"))
_WANDB = (("wandb", "wandb>=0.18", "tracking.wandb"),)

_checked: set[str] = set()


def requirements(configs: Iterable[ExperimentConfig], *, wandb: bool = False) -> list[tuple[str, str, str]]:
    """The modules ``configs`` import when they train, evaluate and log, without repeats."""
    need: dict[str, tuple[str, str, str]] = {}
    for cfg in configs:
        for item in (_SYNTHETIC if cfg.source.kind == "synthetic" else _HF):
            need.setdefault(item[0], item)
    if wandb:
        need.setdefault(_WANDB[0][0], _WANDB[0])
    return list(need.values())


def check_runtime(configs: Sequence[ExperimentConfig], *, wandb: bool = False) -> None:
    """A ConfigError for the first module ``configs`` need that does not import here."""
    for module, requirement, why in requirements(configs, wandb=wandb):
        if module in _checked:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(
                f"{why} needs the Python module {module.split('.')[0]}, which does not import here "
                f"({type(e).__name__}: {e}); install it with: pip install '{requirement}' "
                "(bash scripts/setup.sh installs every dependency)") from None
        _checked.add(module)
