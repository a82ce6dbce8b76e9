#!/usr/bin/env python
"""The README's main job, timed: `saesweep sweep --spec examples/demo.yaml` into a fresh folder,
its wall time split into training, evaluation, random baselines and the rest (start-up, the
data, queueing, summaries), from the run's own files and the time its output lines appear.

    .venv/bin/python benchmarks/main_job.py              # once
    .venv/bin/python benchmarks/main_job.py --repeats 3  # the median of three runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(spec: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "saesweep", "sweep", "--spec", str(spec), "--output_dir", tmp]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: dict[str, float] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            for key in ("Done in", "Baselines at"):
                if line.startswith(key) and key not in seen:
                    seen[key] = time.perf_counter() - t0
        if proc.wait() != 0:
            raise SystemExit(f"the main job failed (exit {proc.returncode})")
        wall = time.perf_counter() - t0
        train = evaluation = 0.0
        for m in Path(tmp).glob("*/trials/*/metrics.json"):
            metrics = json.loads(m.read_text())["metrics"]
            n = max(1, int(metrics.get("pack_size", 1)))  # a pack's time is shared by its members
            train += metrics["train_time_s"] / n
            evaluation += metrics["eval_time_s"] / n
        baselines = wall - seen.get("Baselines at", wall)
        return {"wall_s": wall, "train_s": train, "eval_s": evaluation, "baselines_s": baselines,
                "other_s": wall - train - evaluation - baselines, "baselines_share_of_training": baselines / train}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(REPO / "examples" / "demo.yaml"))
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    runs = [one_run(Path(args.spec)) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"main job ({args.spec}), median of {len(runs)} run(s):")
    for k in ("wall_s", "train_s", "eval_s", "baselines_s", "other_s"):
        print(f"  {k[:-2]:<10} {med[k]:7.1f} s  ({med[k] / med['wall_s']:.0%} of the wall)")
    print(f"  baselines are {med['baselines_share_of_training']:.0%} of the training time")
    print(json.dumps({"runs": runs, "median": med}))


if __name__ == "__main__":
    main()
