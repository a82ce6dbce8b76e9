"""Subcommands that read a sweep: status, results, baseline (and the sweep reference every
reading command takes)."""

from __future__ import annotations

import sys
from pathlib import Path

from saesweep.cli.common import EXIT_OK, csv_list, flag, positive_floats
from saesweep.errors import ConfigError
from saesweep.io import atomic_write_text, ensure_folder


def sweep_ref_args(p):
    p.add_argument("sweep", help="sweep name (under --output_dir), sweep folder, or name with --storage")
    flag(p, "storage", help="storage URL (default: the sweep folder's journal)")
    flag(p, "output_dir", default="runs", help="where sweeps keep their results (default: runs)")


def open_existing(args):
    """(store, sweep folder) for a sweep named on the command line, opened read-only."""
    from saesweep.sweep.store import SweepStore

    ref = Path(args.sweep)
    if args.storage:
        store = SweepStore(args.storage, args.sweep, create=False, read_only=True)
        return store, Path(args.output_dir) / args.sweep
    for folder in (ref, Path(args.output_dir) / args.sweep):
        journal = folder / "sweep.journal"
        if journal.exists():
            import optuna

            from saesweep.sweep.storages import open_backend

            names = [s.study_name for s in optuna.get_all_study_summaries(
                open_backend(str(journal), create=False, read_only=True).storage)]
            name = folder.name if folder.name in names else (names[0] if names else folder.name)
            return SweepStore(str(journal), name, create=False, read_only=True), folder
    raise ConfigError(f"sweep {args.sweep!r}: no sweep folder with a sweep.journal at {ref} or {Path(args.output_dir) / args.sweep}; "
                      "give --storage for a database")


def cmd_status(args) -> int:
    from collections import Counter, defaultdict

    store, folder = open_existing(args)
    recs = store.records()
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in recs:
        by_type[r.sae_type][r.state] += 1
    total = Counter(r.state for r in recs)
    print(f"Sweep '{store.name}' ({len(recs)} trials)  [{folder}]")
    print(f"  {'type':<22}{'complete':>9}{'running':>9}{'waiting':>9}{'failed':>8}")
    for t, c in by_type.items():
        print(f"  {t:<22}{c['complete']:>9}{c['running']:>9}{c['waiting']:>9}{c['failed']:>8}")
    print(f"  {'all':<22}{total['complete']:>9}{total['running']:>9}{total['waiting']:>9}{total['failed']:>8}")
    from saesweep.sweep.store import count_line, failure_line, tally

    print(f"  {count_line(tally(recs))}")
    why = failure_line(recs)
    if why:
        print(f"  {why}")
    durations = [r.duration_s for r in recs if r.state == "complete" and r.duration_s]
    left = total["waiting"] + total["running"]
    if durations and left:
        # a trial's duration is its pack's: packs of pack_size run side by side on the slots
        info = store.info
        pack = int(((info.get("spec") or {}).get("execution") or {}).get("pack_size") or 1)
        slots = max(1, len(info.get("slots") or []) or 1)
        mean = sum(durations) / len(durations)
        packs = -(-left // pack)
        print(f"  mean trial (pack) time {mean:.1f}s; {left} trials left in about {packs} pack(s) of up to {pack} "
              f"on {slots} slot(s): about {mean * -(-packs // slots):.0f}s")
    print_failed(recs)
    ckpt_dir = Path(store.info.get("checkpoint_dir", folder / "checkpoints"))
    held = list(ckpt_dir.glob("*.safetensors")) if ckpt_dir.is_dir() else []
    if held:
        size = sum(f.stat().st_size for f in held)
        print(f"  checkpoints of interrupted packs: {len(held)} file(s), {size / 2**20:.1f} MiB in {ckpt_dir} "
              "(resumed by the next run, removed when the sweep completes)")
    from saesweep.sweep.display import per_slot_totals, print_worker_table

    print_worker_table(per_slot_totals(store))
    print_frontier(recs, folder, objective=(store.info.get("objectives") or ["fvu"])[0])
    return EXIT_OK


def print_failed(recs) -> None:
    for r in recs:
        if r.state == "failed":
            print(f"  failed {r.trial_id} after {r.attempts} attempt(s): {r.reason}")


def print_frontier(recs, folder, *, baselines: bool = True, objective: str = "fvu") -> None:
    """The sweep's summary: matched L0s, frontiers, misses, degenerate SAEs, the trial to pick
    per type, and (``baselines``) the baselines saved in its folder."""
    from saesweep.metrics import baselines as base
    from saesweep.reporting.pick import pick_lines
    from saesweep.reporting.table import degenerate_lines, frontier_lines, results_table

    from saesweep.reporting.matched import matched_lines, missed_lines

    df = results_table(recs)
    lines = matched_lines(df) + frontier_lines(df)
    if lines:
        saved = base.lines(base.read(folder)) if baselines else []
        print("\n".join(lines + missed_lines(df) + degenerate_lines(df) + pick_lines(df, objective) + saved))
        print(f"Next: saesweep results {folder}   (CSV + Parquet)   saesweep report {folder}   (plots)")
    sys.stdout.flush()


def results_args(p):
    sweep_ref_args(p)
    flag(p, "output", help="file path without extension (default: <sweep folder>/results)")


def cmd_results(args) -> int:
    from saesweep.reporting.table import results_table, write_table

    store, folder = open_existing(args)
    df = results_table(store)
    stem = Path(args.output) if args.output else folder / "results"
    ensure_folder(stem.parent, "--output" if args.output else "the sweep folder")
    try:
        paths = write_table(df, stem)
    except OSError as e:  # a full disk, a read-only file system: no partial file is left
        raise ConfigError(f"{'--output ' + str(args.output) if args.output else stem}: cannot write ({e.strerror})") from None
    print(f"{len(df)} trials -> " + ", ".join(str(p) for p in paths))
    from saesweep.metrics.baselines import lines, read

    rows = read(folder)
    if rows:
        import pandas as pd

        out = stem.with_name(stem.name + "_baselines.csv")
        table = pd.DataFrame(rows)
        lead = [c for c in ("baseline", "target_l0", "l0", "fvu", "feature_f1") if c in table]
        atomic_write_text(out, table[lead + sorted(set(table) - set(lead))].to_csv(index=False))
        print("\n".join(lines(rows)) + f"\n  -> {out}")
    return EXIT_OK


def baseline_args(p):
    from saesweep.metric_registry import BASELINES as KINDS

    sweep_ref_args(p)
    flag(p, "l0", type=positive_floats, help="comma-separated L0s to compare at (default: three spread over the "
         "trials' L0s)")
    flag(p, "kinds", type=csv_list, help=f"comma-separated baselines (default: all: {', '.join(KINDS)})")


def cmd_baseline(args) -> int:
    from saesweep.metrics.baselines import FILE, KINDS, for_sweep, lines

    kinds = args.kinds or list(KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"--kinds: unknown baseline {bad[0]!r}; choose from {', '.join(KINDS)}")
    store, folder = open_existing(args)
    rows = for_sweep(store.records(), folder, args.l0, kinds, progress=print)
    if not rows:
        raise ConfigError(f"sweep {args.sweep!r}: no complete trial to take the source and width from; "
                          "run the sweep first")
    print("\n".join(lines(rows)))
    print(f"-> {folder / FILE}   (saesweep results and saesweep report show them beside the trials)")
    return EXIT_OK
