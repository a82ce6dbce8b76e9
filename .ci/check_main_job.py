"""Assert the outcome of the README's main job from the files it wrote (no saesweep code):
every trial of the spec complete, the best feature_f1 at least MIN_F1, baselines.json present.

    python .ci/check_main_job.py SWEEP_FOLDER EXPECTED_TRIALS
"""

import json
import sys
from pathlib import Path

MIN_F1 = 0.6


def main(folder: str, expected: str) -> int:
    trials = sorted(p for p in (Path(folder) / "trials").iterdir() if p.is_dir())
    problems = []
    if len(trials) != int(expected):
        problems.append(f"{len(trials)} trial folders, expected {expected}")
    f1 = []
    for t in trials:
        if not (t / "complete.json").exists() or not (t / "metrics.json").exists():
            problems.append(f"{t.name}: not complete (no complete.json / metrics.json)")
            continue
        f1.append(json.loads((t / "metrics.json").read_text())["metrics"].get("feature_f1", 0.0))
    best = max(f1, default=0.0)
    if best < MIN_F1:
        problems.append(f"best feature_f1 {best:.3f} < {MIN_F1}")
    base = Path(folder) / "baselines.json"
    if not base.exists() or not json.loads(base.read_text()).get("rows"):
        problems.append("no baselines.json with rows")
    for p in problems:
        print(f"main job: {p}")
    if not problems:
        print(f"main job: {len(trials)} trials complete, best feature_f1 {best:.3f}, baselines.json present")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
