"""``saesweep train``: one SAE from one config YAML."""

from __future__ import annotations

import argparse
import sys

from saesweep.cli.common import EXIT_FAILED, EXIT_OK, flag, parse_overrides, set_flag


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment config YAML")
    flag(p, "device", help="override train.device (auto, cpu, cuda, cuda:N, mps)")
    flag(p, "output_dir", help="override output_dir")
    set_flag(p)


def cmd_train(args: argparse.Namespace) -> int:
    from saesweep.config.experiment import load_config
    from saesweep.training.run import run

    cfg = load_config(args.config)
    updates = parse_overrides(args.set)
    if args.output_dir:
        updates["output_dir"] = args.output_dir
    if args.device:
        updates["train.device"] = args.device
    if updates:
        cfg = cfg.with_updates(**updates)
    if cfg.source.kind == "hf":  # before anything is built or written
        from saesweep.data.budget import plan_activations
        from saesweep.data.hf import check_source, hook_width

        model_config = check_source(cfg.source)
        cfg.d_sae(hook_width(cfg.source, model_config))
        plan = plan_activations(cfg, model_config=model_config)  # refuses what the disk cannot hold
        print(f"activations: {plan.describe()}", file=sys.stderr)
    from saesweep.devices import detect
    from saesweep.sweep.planning import check_fits
    from saesweep.training.preflight import check_runtime

    check_fits([cfg], detect(with_free=False))  # the memory plan of `saesweep sweep`: nothing written yet
    check_runtime([cfg])
    result = run(cfg)
    if not result.ok:
        print(f"{result.trial_id}: failed: {result.reason}", file=sys.stderr)
        return EXIT_FAILED
    m = result.metrics
    shown = ", ".join(f"{k}={m[k]:.4g}" for k in ("feature_f1", "fvu", "l0", "dead_fraction", "ce_loss_score", "absorption") if k in m)
    print(f"{result.trial_id}: {shown}\n  -> {result.run_dir}")
    return EXIT_OK
