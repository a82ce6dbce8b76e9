#!/usr/bin/env bash
# The user's install and main job, from a fresh copy of the repository: the README's first
# command exactly as written (`bash scripts/setup.sh` alone: no test extras, no test venv, an
# empty saesweep cache), then
#   (a) every module of the package imports and every import is a declared dependency,
#   (b) pip check (the one known complaint: setup.sh installs W&B's `sweeps` schema package
#       without its dependency pins on purpose),
#   (c) the main job's outcome, read from the files it wrote.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/saesweep"
cd "$work/saesweep"
export SAESWEEP_CACHE="$work/cache"
first=$(awk '/^```bash$/{inside=1; next} inside{print; exit}' README.md | sed 's/[[:space:]]*#.*$//')
echo "user install: running the README's first command: $first"
start=$(date +%s)
if ! bash -c "$first" > "$work/main_job.log" 2>&1; then
  tail -n 40 "$work/main_job.log"
  echo "user install: the README's first command failed"
  exit 1
fi
echo "user install: the first command took $(( $(date +%s) - start )) s (setup included)"
grep -E "^(Done in|Pick|  (relu|gated): )" "$work/main_job.log" || true
.venv/bin/python scripts/check_install.py
if ! check=$(.venv/bin/python -m pip check 2>&1); then
  other=$(printf '%s\n' "$check" | grep -v '^sweeps ' || true)
  if [ -n "$other" ]; then
    printf '%s\n' "$other"
    echo "user install: pip check failed"
    exit 1
  fi
fi
echo "user install: pip check passes (besides the sweeps schema package's pins)"
expected=$(.venv/bin/saesweep grid --spec examples/demo.yaml --format json | .venv/bin/python -c \
  "import json, sys; print(sum(t['count'] for t in json.load(sys.stdin).values()))")
.venv/bin/python "$repo/.ci/check_main_job.py" runs/demo "$expected"
