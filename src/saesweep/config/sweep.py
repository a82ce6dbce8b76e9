"""The sweep spec: the ONE place that defines grids, defaults and the search method.

The architectures' own grids are the built-in default (48 / 288 / 144 / 432 = 912 experiments); a spec
file (``--spec FILE``, or ``./saesweep.yaml`` when present) overrides any part of it. Every
front end (config generator, runners, bash script, W&B sweeps, device schedulers) expands the
same spec with :func:`expand`, so editing a grid happens here or in the spec file, nowhere else.
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from saesweep import saes
from saesweep.errors import ConfigError
from saesweep.config.experiment import (
    ExperimentConfig,
    Strict,
    format_validation_error,
    get_dotted,
    parse_config,
    read_yaml,
    set_dotted,
)
from saesweep import metric_registry as metrics

# ---------------------------------------------------------------- the default grids
#: the axes every architecture's default grid has (``sparsity_coeff`` where it applies); each
#: architecture adds its own (its class's ``grid``)
COMMON_GRID: dict[str, list] = {
    "lr": [1e-4, 3e-4, 1e-3],
    "dict_size_ratio": [8.0, 16.0, 32.0, 64.0],
    "sparsity_coeff": [0.01, 0.03, 0.1, 0.3],
}


def default_grid(sae_type: str) -> dict[str, list]:
    """The default grid of ``sae_type``: the common axes, then its own."""
    d = saes.declaration(sae_type)
    common = {k: list(v) for k, v in COMMON_GRID.items() if k != "sparsity_coeff" or d.uses_sparsity_coeff}
    return {**common, **{k: list(v) for k, v in d.grid.items()}}


def default_grids() -> dict[str, dict[str, list]]:
    """A fresh copy of every architecture's default grid, in display order."""
    return {name: default_grid(name) for name in saes.names()}


def classic_types() -> list[str]:
    """The four classic types a sweep runs when it names none."""
    return [name for name in saes.names() if saes.declaration(name).classic]


#: the hyperparameters every architecture takes (``target_l0`` instead of ``sparsity_coeff`` or ``k``)
COMMON_PARAMS = ("lr", "dict_size_ratio", "sparsity_coeff", "target_l0", "initial_coeff")
#: the grid axes a target L0 replaces (``search.method: frontier`` drops them)
SPARSITY_AXES = ("sparsity_coeff", "k", "target_l0")
#: sections of the experiment config whose fields a grid may sweep by dotted name: above all
#: ``source.hook`` (layers as a sweep axis: trials of several hooks get their activations from
#: one LM pass, see :func:`saesweep.data.cache_build.warm`, and train in per-hook packs)
NESTED_AXES = ("source", "train", "eval")


def sweepable() -> tuple[str, ...]:
    """Every parameter a grid may sweep, in the order tables show them: the common ones, then
    each registered architecture's own (so a new architecture's fields join by registering)."""
    return (*COMMON_PARAMS, *saes.all_hyperparams())

class Range(Strict):
    """A continuous (or integer) range for random/TPE search."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


ParamSpace = Union[list, Range]
#: a frontier search's defaults: this many target L0s over this range
FRONTIER_POINTS = 5
FRONTIER_L0_RANGE = (8.0, 128.0)


def _param_space(where: str, v: Any) -> ParamSpace:
    if isinstance(v, Range):
        return v
    if isinstance(v, dict):
        try:
            return Range.model_validate(v)
        except ValidationError as e:
            raise ValueError(f"{where}: {format_validation_error(e)}") from None
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError(f"{where}: empty list of values")
        return list(v)
    return [v]  # a single value


class SearchSpec(Strict):
    """How trials are chosen: the full ``grid``; ``random`` / ``tpe`` samples with a budget; or
    ``frontier``: the grid with its sparsity axis (``sparsity_coeff``, ``k``) replaced by
    ``n_trials`` values of ``target_l0`` spread evenly in log L0 over ``l0_range``, so that every
    architecture gets an evenly spaced L0 / quality frontier without choosing coefficients."""

    method: Literal["grid", "random", "tpe", "frontier"] = "grid"
    n_trials: Optional[Annotated[int, Field(gt=0)]] = Field(
        None, description="budget per sae_type for random/tpe; the number of target L0s for frontier (default 5)")
    l0_range: Optional[tuple[Annotated[float, Field(ge=1.0)], Annotated[float, Field(ge=1.0)]]] = Field(
        None, description="frontier: the lowest and highest target L0 (default 8, 128)")
    objectives: list[str] = Field(default_factory=lambda: ["fvu"], min_length=1, max_length=3)
    seed: int = 0
    pruner: Literal["none", "median", "asha"] = "none"

    @field_validator("objectives")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for m in v:
            metrics.direction(m)  # ValueError naming the choices
        return v

    @model_validator(mode="after")
    def _budget(self) -> "SearchSpec":
        if self.method in ("random", "tpe") and self.n_trials is None:
            raise ValueError(f"search.method {self.method!r} needs search.n_trials")
        if self.l0_range is not None:
            if self.method != "frontier":
                raise ValueError("search.l0_range applies to search.method frontier")
            if not self.l0_range[0] < self.l0_range[1]:
                raise ValueError(f"search.l0_range: low ({self.l0_range[0]:g}) must be below high ({self.l0_range[1]:g})")
        return self

    @property
    def is_grid(self) -> bool:
        """Whether the trials are a grid's, known up front (``grid``, and ``frontier``'s grid of targets)."""
        return self.method in ("grid", "frontier")

    def frontier_targets(self) -> list[float]:
        """``frontier``'s target L0s: ``n_trials`` (default 5) spread evenly in log L0 over
        ``l0_range`` (default 8 to 128), to three significant digits."""
        import math

        low, high = self.l0_range or FRONTIER_L0_RANGE
        n = self.n_trials or FRONTIER_POINTS
        if n == 1:
            return [float(f"{math.sqrt(low * high):.3g}")]
        step = (math.log(high) - math.log(low)) / (n - 1)
        return [float(f"{math.exp(math.log(low) + i * step):.3g}") for i in range(n)]

    @model_validator(mode="after")
    def _pruning(self) -> "SearchSpec":
        if self.pruner != "none" and len(self.objectives) > 1:
            raise ValueError("search.pruner works with one objective; set pruner: none for multi-objective search")
        return self

    @property
    def directions(self) -> list[str]:
        return [metrics.direction(m) for m in self.objectives]


class ExecutionSpec(Strict):
    """How trials run: parallel workers, devices, packing, retries, leases."""

    max_parallel: Annotated[int, Field(ge=1, le=4096)] = 1
    devices: str = Field("auto", description="auto, or a list such as cuda:0,cuda:1,cpu or cpu:0,cpu:1")
    policy: Literal["dynamic", "round_robin"] = "dynamic"
    pack_size: Annotated[int, Field(ge=1, le=65536,
                                    description="most trials trained together in one pack (1 = no packing)")] = 16
    max_retries: Annotated[int, Field(ge=0)] = 2
    max_consecutive_failures: Annotated[int, Field(ge=1)] = 10
    lease_s: Annotated[float, Field(gt=0)] = 120.0
    heartbeat_s: Annotated[float, Field(gt=0)] = 15.0
    checkpoint_every_s: Annotated[float, Field(gt=0, description=(
        "longest time between two checkpoints of a pack; a pack whose checkpoint is quick to write "
        "checkpoints more often (a write takes at most ~1 % of the training time, and never more often "
        "than checkpoint_min_s)"))] = 120.0
    checkpoint_min_s: Optional[Annotated[float, Field(gt=0)]] = Field(
        None, description="shortest time between two checkpoints (default 1 s, or checkpoint_every_s when shorter)")
    outage_budget_s: Annotated[float, Field(gt=0, description=(
        "how long a worker waits out an unreachable database (retrying with backoff while it trains on) "
        "before it exits; its finished results stay in their run folders and the next worker records them"))] = 600.0

    progress_every_s: Annotated[float, Field(gt=0, description=(
        "seconds between two progress lines (packs running, trials done, tokens/s, ETA) when the output "
        "is not a terminal (a log file, a pipe, a batch job); a terminal shows live bars instead"))] = 30.0

    @model_validator(mode="before")
    @classmethod
    def _heartbeat_for_lease(cls, data: Any) -> Any:
        """A short lease without a heartbeat of its own beats four times per lease."""
        if isinstance(data, dict) and "heartbeat_s" not in data and isinstance(data.get("lease_s"), (int, float)) \
                and not isinstance(data.get("lease_s"), bool) and data["lease_s"] > 0:
            data = {**data, "heartbeat_s": min(15.0, float(data["lease_s"]) / 4)}
        return data

    @property
    def checkpoint_floor_s(self) -> float:
        """The shortest time between two checkpoints of a pack."""
        return min(1.0, self.checkpoint_every_s) if self.checkpoint_min_s is None else self.checkpoint_min_s

    @model_validator(mode="after")
    def _check_checkpoint_range(self) -> "ExecutionSpec":
        if self.checkpoint_min_s is not None and self.checkpoint_min_s > self.checkpoint_every_s:
            raise ValueError(f"execution.checkpoint_min_s ({self.checkpoint_min_s:g}) must not exceed "
                             f"execution.checkpoint_every_s ({self.checkpoint_every_s:g})")
        if self.heartbeat_s > self.lease_s / 3:  # a lease must outlive a few missed beats
            raise ValueError(f"execution.heartbeat_s ({self.heartbeat_s:g}) must be at most a third of "
                             f"execution.lease_s ({self.lease_s:g}), or live trials' leases expire between beats")
        return self


class TrackingSpec(Strict):
    """Experiment tracking. W&B is used when ``wandb`` is true: online with credentials,
    offline otherwise (``WANDB_MODE`` is respected); never required."""

    wandb: bool = False
    project: str = "saesweep"
    entity: Optional[str] = None
    group: Optional[str] = Field(None, description="W&B group (default: the sweep name)")
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"


#: what a sweep name may be (it names a folder and a study)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"


class SweepSpec(Strict):
    """A sweep: a base experiment, per-type grids, the search method, storage and execution."""

    name: str = Field("seed", pattern=NAME_PATTERN, max_length=100)
    base: dict[str, Any] = Field(default_factory=dict, description="ExperimentConfig fields shared by every trial")
    sae_types: list[str] = Field(default_factory=classic_types, min_length=1)
    grids: dict[str, dict[str, Any]] = Field(default_factory=default_grids)
    search: SearchSpec = Field(default_factory=SearchSpec)
    storage: Optional[str] = Field(None, description="journal file path, postgresql://..., default <output_dir>/<name>/sweep.journal")
    output_dir: str = "runs"
    limit: Optional[Annotated[int, Field(gt=0)]] = None
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    baselines: bool = Field(False, description="when the sweep ends, score random baselines beside its trials "
                            "(saesweep baseline)")

    @field_validator("grids")
    @classmethod
    def _spaces(cls, grids: dict[str, dict[str, Any]]) -> dict[str, dict[str, ParamSpace]]:
        out = {}
        for t, grid in grids.items():
            if not isinstance(grid, dict):
                raise ValueError(f"grids.{t}: expected a mapping of parameter -> values")
            out[t] = {p: _param_space(f"grids.{t}.{p}", v) for p, v in grid.items()}
        return out

    @model_validator(mode="after")
    def _frontier(self) -> "SweepSpec":
        """A frontier search: each type's sparsity axis becomes the spread target L0s."""
        if self.search.method == "frontier":
            targets = self.search.frontier_targets()
            for grid in self.grids.values():
                for axis in SPARSITY_AXES:
                    grid.pop(axis, None)
                grid["target_l0"] = list(targets)
            if any(k in self.base for k in ("sparsity_coeff", "k", "target_l0")):
                raise ValueError("base: a frontier search sets target_l0 for every trial; remove "
                                 + ", ".join(k for k in ("sparsity_coeff", "k", "target_l0") if k in self.base))
        return self

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        for t in self.sae_types:
            if t not in saes.names():
                raise ValueError(f"sae_types: unknown SAE type {t!r}; choose from {', '.join(saes.names())}")
            if t not in self.grids:
                raise ValueError(f"grids: no grid for sae_type {t!r}")
            if not self.grids[t]:
                raise ValueError(f"grids.{t} is empty; give at least one parameter, e.g. lr: [0.001]")
        for t, grid in self.grids.items():
            if t not in saes.names():
                raise ValueError(f"grids: unknown SAE type {t!r}; choose from {', '.join(saes.names())}")
            own = {*COMMON_PARAMS, *saes.declaration(t).hyperparams}
            for p, space in grid.items():
                if p not in own and p.split(".")[0] not in NESTED_AXES:
                    raise ValueError(f"grids.{t}.{p}: not a parameter of {t} (its parameters: {', '.join(sorted(own))}; "
                                     f"or a nested field such as source.hook)")
                if isinstance(space, Range) and self.search.is_grid:
                    raise ValueError(f"grids.{t}.{p}: a range needs search.method random or tpe, not grid")
        for key in self.base:
            if key in ("sae_type",):
                raise ValueError("base.sae_type: set sae_types instead")
        return self

    # ----------------------------------------------------------------- helpers
    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def trials_dir(self) -> Path:
        return self.sweep_dir / "trials"

    @property
    def storage_url(self) -> str:
        return self.storage or str(self.sweep_dir / "sweep.journal")

    def grid_size(self, sae_type: str) -> int:
        n = 1
        for space in self.grids[sae_type].values():
            n *= len(space) if isinstance(space, list) else 0
        return n

    def hooks(self) -> list[str]:
        """The hooks the grids sweep (``source.hook`` axes), in first-seen order: their
        activations come from one LM pass (:func:`saesweep.data.open_source`'s ``hooks``)."""
        out: list[str] = []
        for t in self.sae_types:
            space = self.grids.get(t, {}).get("source.hook")
            for h in space if isinstance(space, list) else []:
                if h not in out:
                    out.append(h)
        return out

    def base_for(self, sae_type: str) -> dict[str, Any]:
        """The base fields that apply to ``sae_type``: base may set e.g. final_beta for the types
        that take it, or sparsity_coeff, which the TopK types do not use."""
        cls = saes.declaration(sae_type)
        every = saes.all_hyperparams()
        return {k: v for k, v in self.base.items()
                if (k not in every or k in cls.hyperparams) and (k != "sparsity_coeff" or cls.uses_sparsity_coeff)}

    def base_config(self, sae_type: str, **params: Any) -> ExperimentConfig:
        """The trial of ``sae_type`` with ``params``; a dotted name (``source.hook``) sets a
        nested field."""
        data = copy.deepcopy(self.base_for(sae_type))
        data.update(sae_type=sae_type, output_dir=str(self.trials_dir))
        for k, v in params.items():
            set_dotted(data, k, v)
        return parse_config(data, where=f"sweep {self.name} ({sae_type})")


def grid_points(grid: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def expand(spec: SweepSpec, sae_types: Optional[list[str]] = None) -> list[ExperimentConfig]:
    """Every trial of a grid sweep (in a stable order), after ``limit``."""
    out: list[ExperimentConfig] = []
    for t in sae_types or spec.sae_types:
        for point in grid_points(spec.grids[t]):
            out.append(spec.base_config(t, **point))
    return out[: spec.limit] if spec.limit else out


def swept_params(spec: SweepSpec, cfg: ExperimentConfig) -> dict[str, Any]:
    """The values of ``cfg`` for the parameters its type's grid varies."""
    return {p: get_dotted(cfg, p) for p in spec.grids[cfg.sae_type]}


# -------------------------------------------------------------------- loading
SPEC_FILE = "saesweep.yaml"


def load_spec(path: Optional[str | os.PathLike] = None, **overrides: Any) -> SweepSpec:
    """The spec from ``path``, else ``./saesweep.yaml`` if present, else the default grids; then overrides.

    ``overrides`` are top-level spec fields (``sae_types``, ``limit``, ``name``...) or dotted ones
    (``execution.max_parallel``, ``base.train.tokens``); ``None`` values are ignored.
    """
    data: dict[str, Any] = {}
    where = "the default sweep"
    if path is None and Path(SPEC_FILE).exists():
        path = SPEC_FILE
    if path is not None:
        loaded = read_yaml(Path(path))
        if loaded is None:
            raise ConfigError(f"{path}: empty; a sweep spec needs at least one field (see examples/demo.yaml), "
                              "or leave --spec out for the default grids")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sweep fields")
        data, where = loaded, str(path)
    for key, value in overrides.items():
        if value is not None:
            set_dotted(data, key, value)
    return parse_spec(data, where=where)


def parse_spec(data: dict[str, Any], where: str = "sweep spec") -> SweepSpec:
    if isinstance(data.get("grids"), dict):
        # a spec lists only the grids it changes; the others keep their defaults
        data = {**data, "grids": {**default_grids(), **data["grids"]}}
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation_error(e)}") from None
    for t in spec.sae_types:  # the base config, and every grid value, must be valid for each type
        parse_config({**spec.base_for(t), "sae_type": t}, where=f"{where}: base")
        # each value with the other axes at their first value: some fields need another
        # (initial_coeff needs target_l0)
        values = {p: space if isinstance(space, list) else [space.low, space.high]
                  for p, space in spec.grids[t].items()}
        first = {p: vs[0] for p, vs in values.items() if vs}
        for p, vs in values.items():
            for v in vs:
                spec.base_config(t, **{**first, p: v})
    return spec
