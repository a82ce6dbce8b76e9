#!/usr/bin/env bash
# GPU readiness in one run (under 8 minutes on one GPU): device detection, a stacked pack of 16
# against a loop of 16 at d 768 / m 24576 in fp32 and bf16, two workers sharing the GPU, a pack
# split on a real out-of-memory error, then the quick speed benchmark on the GPU.
#   bash benchmarks/gpu_check.sh            # from the repository root; sets up .venv if needed
# Its output goes into benchmarks/README.md ("GPU check").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh --bench >/dev/null
py=.venv/bin/python
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
timeout 240 "$py" benchmarks/gpu_check.py --device "${DEVICE:-cuda}" "$@"
echo "gpu_check.py exit $?"
echo "== benchmarks/run.py --quick --device cuda"
timeout 200 "$py" benchmarks/run.py --quick --device "${DEVICE:-cuda}" \
  --out "${TMPDIR:-/tmp}/gpu_check_run.json"
echo "run.py exit $?"
