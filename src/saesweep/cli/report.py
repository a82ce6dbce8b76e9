"""Analysis and W&B subcommands: report, importance, dashboard, wandb-sweep, verify."""

from __future__ import annotations

import json
from pathlib import Path

from saesweep.cli.common import EXIT_OK, flag, parse_overrides, positive_floats, set_flag
from saesweep.cli.results import sweep_ref_args
from saesweep.errors import ConfigError
from saesweep.reporting.importance import EVALUATORS


# ------------------------------------------------------------------------ report
def report_args(p) -> None:
    sweep_ref_args(p)
    flag(p, "out", help="folder for report.html and the PNGs (default: <sweep folder>/report)")
    flag(p, "metric", help="metric for hyperparameter importance (default: the sweep's first objective)")
    flag(p, "evaluator", default="auto", choices=EVALUATORS,
         help="importance evaluator (default auto: fanova with scikit-learn, else ped-anova)")
    flag(p, "at_l0", type=positive_floats,
         help="comma-separated L0s: pick the best trial of each type near each (by the sweep's objective)")
    flag(p, "show_degenerate", action="store_true",
         help="keep degenerate SAEs (dense, far too sparse, mostly dead) on the frontiers")


def cmd_report(args) -> int:
    from saesweep.cli.results import open_existing
    from saesweep.reporting.html import build_report

    from saesweep.io import ensure_folder
    from saesweep import metric_registry as metrics
    from saesweep.metrics.baselines import read

    if args.metric is not None and args.metric not in metrics.objectives():  # before anything is written
        raise ConfigError(f"--metric {args.metric}: choose from {', '.join(metrics.objectives())}")
    store, folder = open_existing(args)
    out = Path(args.out) if args.out else folder / "report"
    ensure_folder(out, "--out")

    from saesweep.metrics.baselines import FILE

    rep = build_report(store, out, metric=args.metric, evaluator=args.evaluator,
                       baselines=read(folder) if (folder / FILE).exists() else None,
                       at_l0=args.at_l0 or (), degenerate=args.show_degenerate)
    front = rep.frontier.get("l0_fvu", {}).get("all", [])
    print(f"Report of sweep '{store.name}': {rep.html}")
    for p in rep.pngs:
        print(f"  {p}")
    print(f"  {out / 'importance.json'}  (importance of each parameter for {rep.importance['metric']}, "
          f"{rep.importance['evaluator']})")
    if front:
        print(f"  {len(front)} trials on the L0-FVU Pareto frontier: {', '.join(front[:6])}{' ...' if len(front) > 6 else ''}")
    for p in rep.picks:
        what = p.get("note") or f"{p['trial_id']} (L0 {p['l0']:.2f}, FVU {p['fvu']:.4f}): {p['why']}"
        print(f"  pick {p['series']} @ {p['choice']}: {what}")
    return EXIT_OK


# -------------------------------------------------------------------- importance
def importance_args(p) -> None:
    sweep_ref_args(p)
    flag(p, "metric", help="metric to explain (default: the sweep's first objective)")
    flag(p, "evaluator", default="auto", choices=EVALUATORS)
    flag(p, "output", help="also write the JSON to this file")


def cmd_importance(args) -> int:
    from saesweep.cli.results import open_existing
    from saesweep.io import atomic_write_json
    from saesweep.reporting.importance import param_importances

    store, _ = open_existing(args)
    imp = param_importances(store, args.metric, evaluator=args.evaluator)
    if args.output:
        atomic_write_json(args.output, imp)
    print(json.dumps(imp, indent=2))
    return EXIT_OK


# --------------------------------------------------------------------- dashboard
def dashboard_args(p) -> None:
    sweep_ref_args(p)
    flag(p, "host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    flag(p, "port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")


def cmd_dashboard(args) -> int:
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from saesweep.cli.results import open_existing

    try:
        from optuna_dashboard import wsgi
    except ImportError:
        raise ConfigError("the dashboard needs optuna-dashboard (pip install 'saesweep[dashboard]')") from None
    store, _ = open_existing(args)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *a) -> None:  # no line per request
            pass

    try:
        server = make_server(args.host, args.port, wsgi(store.storage), handler_class=Quiet)
    except OSError as e:
        raise ConfigError(f"--port {args.port}: cannot listen on {args.host} ({e.strerror})") from None
    host, port = server.server_address[:2]
    print(f"optuna-dashboard for sweep '{store.name}': http://{host}:{port}/dashboard/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


# ------------------------------------------------------------------- wandb-sweep
def wandb_sweep_args(p) -> None:
    flag(p, "sae_type", required=True, help="the SAE type whose grid the W&B sweep searches (relu, gated, ...)")
    flag(p, "project", help="W&B project (default: the spec's tracking.project)")
    flag(p, "entity", help="W&B entity (default: the spec's tracking.entity, else your default entity)")
    flag(p, "create_agent_script", action="store_true",
         help="write the agent program <agent_dir>/sweep_agent_<type>.py that `wandb agent` runs")
    flag(p, "agent_dir", default="scripts", help="folder of the agent program and the sweep YAML (default: scripts)")
    flag(p, "output", help="sweep YAML path (default: <agent_dir>/wandb_sweep_<type>.yaml)")
    flag(p, "method", choices=["grid", "random", "bayes"], help="W&B search method (default: from the spec's search)")
    flag(p, "metric", help="metric W&B optimises (default: the spec's first objective)")
    flag(p, "spec", help="sweep spec YAML (default: ./saesweep.yaml if present, else the default grids)")
    flag(p, "name", help="sweep name (default: the spec's)")
    flag(p, "no_create", action="store_true", help="only write the files; do not create the sweep on W&B")
    set_flag(p, "base config field for every run")


def cmd_wandb_sweep(args) -> int:
    from saesweep import saes
    from saesweep.config.sweep import load_spec

    if args.sae_type not in saes.names():
        raise ConfigError(f"--sae_type {args.sae_type}: choose from {', '.join(saes.names())}")
    from saesweep.sweep.wandb_agent import setup

    overrides = {f"base.{k}": v for k, v in parse_overrides(args.set).items()}
    if args.project:
        overrides["tracking.project"] = args.project
    if args.entity:
        overrides["tracking.entity"] = args.entity
    if args.name:
        overrides["name"] = args.name
    spec = load_spec(args.spec, **overrides)
    spec_path = args.spec or ("saesweep.yaml" if Path("saesweep.yaml").exists() else None)
    setup(spec, args.sae_type, spec_path=spec_path, overrides=overrides, method=args.method, metric=args.metric,
          agent_dir=args.agent_dir, output=args.output, create_agent_script=args.create_agent_script,
          create=False if args.no_create else None)
    return EXIT_OK



def verify_args(p) -> None:
    p.add_argument("path", metavar="RUN_OR_SWEEP", help="a run folder (runs/<sweep>/<trial>) or a sweep folder "
                   "(runs/<sweep>): every weight file, checkpoint, metrics file, log and journal under it")


def cmd_verify(args) -> int:
    from saesweep.verify import verify

    root = Path(args.path)
    if not root.exists():
        raise ConfigError(f"verify: no such file or folder: {args.path}")
    checked, problems = verify(root)
    for p in problems:
        print(f"DAMAGED {p.path}: {p.what}")
    print(f"checked {checked} file(s) under {root}: " + (f"{len(problems)} damaged" if problems else "all intact"))
    return 1 if problems else EXIT_OK
