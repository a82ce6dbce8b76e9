"""W&B sweeps (the fourth way of running a sweep) from the one sweep spec.

``sweep_config(spec, sae_type)`` builds the W&B sweep configuration from the spec's grid for
that type -- never from a copy of it: a list becomes ``values``, a ``Range`` a
``log_uniform_values`` / ``uniform`` distribution with ``min``/``max``. The method follows the
spec's search (grid -> ``grid``, random -> ``random``, tpe -> ``bayes``), the metric its first
objective. ``setup(...)`` writes the YAML, writes the agent program
``scripts/sweep_agent_<type>.py`` and, when this machine is logged in to W&B, creates the sweep;
otherwise it prints the exact ``wandb sweep`` / ``wandb agent`` commands.

The agent program is what ``wandb agent`` starts for every run of the sweep: it calls
``wandb.init()`` (which receives the run's parameters from the agent), builds the
``ExperimentConfig`` from the spec's base and those parameters, trains it with
``saesweep.run`` and logs curves and final metrics to that run (:func:`agent_main`).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, cast

import yaml

from saesweep.errors import ConfigError
from saesweep.config.sweep import Range, SweepSpec, sweepable
from saesweep import metric_registry as metrics

METHODS = {"grid": "grid", "frontier": "grid", "random": "random", "tpe": "bayes"}
AGENT_FILE = "sweep_agent_{sae_type}.py"
SWEEP_FILE = "wandb_sweep_{sae_type}.yaml"


# ------------------------------------------------------------------ the config
def sweep_config(spec: SweepSpec, sae_type: str, *, method: Optional[str] = None, metric: Optional[str] = None,
                 program: Optional[str] = None) -> dict[str, Any]:
    """The W&B sweep configuration of one SAE type's grid (see the module docstring)."""
    if sae_type not in spec.grids:
        raise ConfigError(f"--sae_type {sae_type}: the spec has no grid for it (grids: {', '.join(spec.grids)})")
    method = method or METHODS[spec.search.method]
    if method not in METHODS.values():
        raise ConfigError(f"--method {method}: choose from {', '.join(dict.fromkeys(METHODS.values()))}")
    metric = metric or spec.search.objectives[0]
    if metric not in metrics.objectives():
        raise ConfigError(f"--metric {metric}: choose from {', '.join(metrics.objectives())}")
    params: dict[str, Any] = {"sae_type": {"value": sae_type}}
    for name, space in spec.grids[sae_type].items():
        if isinstance(space, Range):
            if method == "grid":
                raise ConfigError(f"grids.{sae_type}.{name}: a range cannot be searched by a W&B grid sweep; "
                                  "use --method random or bayes, or give a list of values")
            params[name] = {"distribution": "log_uniform_values" if space.log else "uniform",
                            "min": float(space.low), "max": float(space.high)}
        else:
            params[name] = {"values": [_plain(v) for v in space]}
    n = combinations({"parameters": params})
    cfg: dict[str, Any] = {
        "name": f"{spec.name}-{sae_type}",
        "description": f"saesweep sweep '{spec.name}', sae_type {sae_type}"
                       + (f": {n} combinations" if n is not None else ""),
        "program": program or f"scripts/{AGENT_FILE.format(sae_type=sae_type)}",
        "method": method,
        "metric": {"name": metric, "goal": metrics.direction(metric)},
        "parameters": params,
    }
    if method != "grid" and spec.search.n_trials:
        cfg["run_cap"] = int(spec.search.n_trials)
    if spec.tracking.project:
        cfg["project"] = spec.tracking.project
    if spec.tracking.entity:
        cfg["entity"] = spec.tracking.entity
    return cfg


def _plain(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return v
    return str(v)


def combinations(config: dict[str, Any]) -> Optional[int]:
    """How many runs a grid over ``config``'s parameters makes (None when one is a distribution)."""
    n = 1
    for p in config["parameters"].values():
        if "values" in p:
            n *= len(p["values"])
        elif "value" not in p:
            return None
    return n


# -------------------------------------------------------------- validation
def schema_violations(config: dict[str, Any]) -> Optional[list[str]]:
    """W&B's own validation of a sweep config (empty list: valid; None: validator not installed).

    The schema is W&B's: the ``sweeps`` package (``pip install wandb[sweeps]``, or ``sweeps``
    alone) ships it as ``sweeps/config/schema.json`` with the checks ``wandb sweep`` runs before
    creating a sweep (``sweeps.schema_violations_from_proposed_config``). When ``sweeps``
    cannot be imported (its numpy pin), its schema file is validated with ``jsonschema``.
    """
    try:
        with warnings.catch_warnings():  # sweeps' pydantic models warn about v1-style config keys
            warnings.simplefilter("ignore")
            import sweeps

        check = sweeps.schema_violations_from_proposed_config
    except Exception:  # not installed, or its dependencies are not (jsonref, numpy...)
        check = None
    if check is not None:
        return list(check(json.loads(json.dumps(config))))
    path = sweeps_schema_path()
    return None if path is None else schema_file_violations(config, path)


def schema_file_violations(config: dict[str, Any], path: Path) -> Optional[list[str]]:
    """``config`` checked against the JSON schema file at ``path`` with ``jsonschema`` (None: not installed)."""
    try:
        import jsonschema
    except ImportError:
        return None
    schema = json.loads(Path(path).read_text())
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
    return [e.message for e in validator.iter_errors(json.loads(json.dumps(config)))]


def sweeps_schema_path() -> Optional[Path]:
    """W&B's sweep config JSON schema as installed with the ``sweeps`` package, if it is."""
    import importlib.util

    try:
        found = importlib.util.find_spec("sweeps")
    except (ImportError, ValueError):
        return None
    for root in (found.submodule_search_locations or []) if found else []:
        path = Path(root) / "config" / "schema.json"
        if path.exists():
            return path
    return None


# -------------------------------------------------------------------- setup
AGENT_TEMPLATE = '''#!/usr/bin/env python
"""W&B sweep agent program for saesweep, sae_type {sae_type} (written by `saesweep wandb-sweep`).

`wandb agent SWEEP_ID` starts it once per run; each run trains one SAE through saesweep.run
with the parameters W&B chose and logs its curves and final metrics to that run. The base
config and the grid come from {spec_desc}.
Run it by hand (one trial, offline unless logged in):
    python {path} --lr=0.001 --dict_size_ratio=8.0 --sparsity_coeff=0.03
"""

import sys

try:
    from saesweep.sweep.wandb_agent import agent_main
except ModuleNotFoundError:  # not installed: the source tree this script was written from
    sys.path.insert(0, {src!r})
    from saesweep.sweep.wandb_agent import agent_main

SAE_TYPE = {sae_type!r}
SPEC = {spec!r}
OVERRIDES = {overrides!r}

if __name__ == "__main__":
    sys.exit(agent_main(SAE_TYPE, spec_path=SPEC, overrides=OVERRIDES, argv=sys.argv[1:]))
'''


def write_agent_script(path: Path, sae_type: str, spec_path: Optional[str], overrides: dict[str, Any]) -> Path:
    from saesweep.io import atomic_write_text

    spec_abs = str(Path(spec_path).resolve()) if spec_path else None
    text = AGENT_TEMPLATE.format(
        sae_type=sae_type, spec=spec_abs, overrides=overrides, path=_display(path),
        spec_desc=f"the spec {spec_abs}" if spec_abs else "./saesweep.yaml when present, else saesweep's built-in seed grids",
        src=str(Path(__file__).resolve().parents[1]),
    )
    atomic_write_text(path, text)
    os.chmod(path, 0o755)
    return path


def _display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(path).resolve())


def setup(spec: SweepSpec, sae_type: str, *, spec_path: Optional[str] = None, overrides: Optional[dict] = None,
          method: Optional[str] = None, metric: Optional[str] = None, agent_dir: str = "scripts",
          output: Optional[str] = None, create_agent_script: bool = False, create: Optional[bool] = None,
          echo=print) -> dict[str, Any]:
    """Write the sweep YAML (and the agent program), create the sweep when possible; returns what it did."""
    from saesweep.io import atomic_write_text
    from saesweep.tracking.wandb import has_credentials, resolve_mode

    agent = Path(agent_dir) / AGENT_FILE.format(sae_type=sae_type)
    config = sweep_config(spec, sae_type, method=method, metric=metric, program=_display(agent))
    violations = schema_violations(config)
    if violations:
        raise ConfigError("the W&B sweep config breaks W&B's schema: " + "; ".join(violations))
    yaml_path = Path(output) if output else Path(agent_dir) / SWEEP_FILE.format(sae_type=sae_type)
    atomic_write_text(yaml_path, f"# W&B sweep for saesweep sweep '{spec.name}', sae_type {sae_type}; "
                                 "written by `saesweep wandb-sweep` from the sweep spec's grid\n"
                      + yaml.safe_dump(config, sort_keys=False))
    n = combinations(config)
    echo(f"W&B sweep config: {_display(yaml_path)}  (method {config['method']}, metric {config['metric']['name']} "
         f"{config['metric']['goal']}, " + (f"{n} combinations)" if n is not None else f"run_cap {config.get('run_cap')})"))
    if metric is None and len(spec.search.objectives) > 1:
        echo(f"  note: a W&B sweep optimises one metric: {config['metric']['name']} (the spec's first objective; "
             "--metric picks another)")
    if violations is None:
        echo("  (not validated: install W&B's sweep validator with `pip install sweeps jsonschema` to check it)")
    out: dict[str, Any] = {"config": config, "yaml": yaml_path, "combinations": n, "agent": None, "sweep_id": None}
    if create_agent_script:
        write_agent_script(agent, sae_type, spec_path, overrides or {})
        out["agent"] = agent
        echo(f"Agent program: {_display(agent)}")
    elif not agent.exists():
        echo(f"  note: {_display(agent)} does not exist yet; add --create_agent_script to write it")
    project = spec.tracking.project
    scope = (["-e", spec.tracking.entity] if spec.tracking.entity else []) + ["-p", project]
    mode = resolve_mode(spec.tracking.mode)
    logged_in = has_credentials()
    can_create = logged_in and mode == "online"
    if create is None:
        create = can_create
    if create:
        try:
            import wandb

            sweep_id = wandb.sweep(config, project=project, entity=spec.tracking.entity)
        except Exception as e:  # network, permissions: print the manual route instead
            echo(f"Could not create the sweep on W&B ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        else:
            out["sweep_id"] = sweep_id
            path = "/".join([p for p in (spec.tracking.entity, project) if p] + [sweep_id])
            echo(f"Created W&B sweep {sweep_id}. Start agents (on any machine) with:")
            echo(f"  wandb agent {path}")
            return out
    else:
        why = ("not logged in to W&B (no WANDB_API_KEY, no netrc entry)" if not logged_in
               else f"W&B mode is {mode}" if mode != "online" else "--no_create")
        echo(f"Sweep not created ({why}). To create and run it:")
        if not logged_in:
            echo("  wandb login")
    echo(f"  wandb sweep {' '.join(scope)} {_display(yaml_path)}")
    echo(f"  wandb agent {(spec.tracking.entity + '/') if spec.tracking.entity else '<entity>/'}{project}/<sweep_id>"
         "    # the id printed by `wandb sweep`")
    return out


# -------------------------------------------------------------------- agent
def parse_agent_args(argv: Sequence[str]) -> dict[str, Any]:
    """``--name=value`` arguments (what ``wandb agent`` passes by default) as a dict."""
    out: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}: expected --name=value")
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            k, v = a[2:], args[i + 1]
            i += 1
        else:
            k, v = a[2:], "true"
        out[k.replace("-", "_")] = yaml.safe_load(v)
        i += 1
    return out


def agent_main(sae_type: str, *, spec_path: Optional[str] = None, overrides: Optional[dict] = None,
               argv: Optional[Sequence[str]] = None) -> int:
    """One W&B sweep run: ``wandb.init()``, train the chosen config with ``saesweep.run``, log it.
    ``--help`` prints what it does and which parameters it takes; Ctrl-C exits 130 quietly."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(f"usage: {Path(sys.argv[0]).name} [--PARAM=VALUE ...]\n\n"
              f"One W&B sweep run of a saesweep {sae_type} SAE: `wandb agent SWEEP_ID` starts it with the\n"
              f"parameters the sweep chose; by hand it trains one trial (offline unless logged in).\n"
              f"Parameters: {', '.join(p for p in sweepable() if p in ('lr', 'dict_size_ratio', 'sparsity_coeff') or p in _own(sae_type))}")
        return 0
    try:
        return _agent(sae_type, spec_path, overrides or {}, args)
    except ConfigError as e:
        print(f"saesweep agent: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saesweep agent: interrupted", file=sys.stderr)
        return 130


def _own(sae_type: str) -> list[str]:
    from saesweep import saes

    try:
        return list(saes.declaration(sae_type).hyperparams)
    except ValueError:
        return []


def _agent(sae_type: str, spec_path: Optional[str], overrides: dict, argv: list[str]) -> int:
    import wandb

    from saesweep.config.sweep import load_spec
    from saesweep.sweep.search import search_space
    from saesweep.sweep.worker import Heartbeat, open_sweep
    from saesweep.tracking.wandb import WandbTracker, resolve_mode
    from saesweep.training.run import run as run_experiment

    spec = load_spec(spec_path, **overrides)
    if sae_type not in spec.grids:
        raise ConfigError(f"sae_type {sae_type}: not in the spec's grids ({', '.join(spec.grids)})")
    given = parse_agent_args(argv)
    in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    tracking = spec.tracking
    wandb_dir = os.environ.get("WANDB_DIR") or str(spec.sweep_dir)
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if not in_sweep:  # under an agent the sweep decides the project and entity
        kwargs.update(project=tracking.project, entity=tracking.entity)
    run = wandb.init(config=given, mode=cast(Any, resolve_mode(tracking.mode)), dir=wandb_dir, job_type=sae_type,
                     group=tracking.group or f"{spec.name}-{sae_type}", tags=[sae_type],
                     settings=wandb.Settings(console="off"), **kwargs)
    chosen = dict(run.config)
    if chosen.get("sae_type", sae_type) != sae_type:
        run.finish(exit_code=2)
        raise ConfigError(f"this agent program trains sae_type {sae_type}, the sweep asked for {chosen['sae_type']}")
    params = {k: v for k, v in chosen.items() if k in sweepable()}
    ignored = sorted(k for k in chosen if k not in sweepable() and k != "sae_type" and not k.startswith("_"))
    if ignored:
        print(f"saesweep agent: ignoring parameters that are not sweepable: {', '.join(ignored)}", file=sys.stderr)
    try:
        cfg = spec.base_config(sae_type, **params)
    except ConfigError:
        run.finish(exit_code=2)
        raise
    run.name = cfg.trial_id
    run.config.update({"trial_id": cfg.trial_id, "sweep": spec.name, "experiment": cfg.to_dict()}, allow_val_change=True)
    tracker = WandbTracker(spec)
    tracker.attach(cfg, run)
    print(f"saesweep agent: training {cfg.trial_id} ({', '.join(f'{k}={v}' for k, v in params.items())})")
    # the run is a trial of the spec's saesweep sweep too, so `status`, `results` and `report` show it
    store = open_sweep(spec)
    space = search_space(spec, sae_type)
    worker = f"wandb:{run.id}"
    claim = store.add_running(cfg, params, {k: space[k] for k in params if k in space}, worker)
    store.hold_lease(worker)
    beat = Heartbeat(store, [claim], worker, spec.execution.heartbeat_s)
    beat.start()
    try:
        result = run_experiment(cfg, on_log=tracker.log)
    except BaseException:
        store.fail(claim, "the W&B agent run stopped", retry=False)
        raise
    finally:
        beat.stop()
        store.release_lease(worker)
    extra = {"run_dir": str(Path(result.run_dir).resolve()), "worker": worker, "wandb_run": run.id}
    if result.ok:
        store.complete(claim, result.metrics, objectives=spec.search.objectives, extra=extra)
    else:
        store.fail(claim, result.reason or result.status, retry=False, extra=extra)
    tracker.finish(claim, result)
    if not result.ok:
        print(f"saesweep agent: {cfg.trial_id} {result.status}: {result.reason}", file=sys.stderr)
        return 1
    shown = ", ".join(f"{k}={result.metrics[k]:.4g}" for k in ("fvu", "l0", "dead_fraction") if k in result.metrics)
    print(f"saesweep agent: {cfg.trial_id}: {shown} -> {result.run_dir}")
    return 0
