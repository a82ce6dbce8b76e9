#!/usr/bin/env bash
# Approach 2: a sweep from the shell.
#   ./scripts/run_simple_sweep.sh SAE_TYPE [PARALLEL_JOBS]
# The grid is the sweep spec's (`saesweep grid` shows it; edit it in a saesweep.yaml or with
# --spec), never a copy in this script. Extra arguments go to `saesweep sweep`, e.g.
#   ./scripts/run_simple_sweep.sh relu 2 --set train.tokens=500000
set -euo pipefail

usage() { echo "usage: $0 SAE_TYPE [PARALLEL_JOBS] [saesweep sweep flags...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
sae_type=$1; shift
jobs=${1:-1}; [ $# -ge 1 ] && shift
case "$jobs" in ''|*[!0-9]*|0) echo "$0: PARALLEL_JOBS must be a positive whole number, got '$jobs'" >&2; exit 2;; esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if command -v saesweep >/dev/null 2>&1; then
  saesweep=(saesweep)
elif [ -x "$here/../.venv/bin/saesweep" ]; then
  saesweep=("$here/../.venv/bin/saesweep")
else
  saesweep=(python -m saesweep)
fi

echo "Running the $sae_type sweep with $jobs parallel job(s)"
exec "${saesweep[@]}" sweep --sae_types "$sae_type" --max_parallel "$jobs" "$@"
