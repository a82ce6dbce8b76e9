#!/usr/bin/env bash
# Create .venv and install saesweep into it (editable).
#   bash scripts/setup.sh          # the package with every optional integration
#   bash scripts/setup.sh --test   # ... plus the test tools (pytest, sae-lens)
#   bash scripts/setup.sh --bench  # ... plus the benchmark peer (sae-lens)
# Machines without an NVIDIA GPU get the CPU build of torch (constraints/cpu.txt); machines
# with one keep pip's default CUDA build. Elsewhere than this project's machines, a CPU-only
# install may need PyTorch's CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras="all"
case "${1:-}" in
  --test) extras="all,test,bench" ;;
  --bench) extras="all,bench" ;;
  "") ;;
  *) echo "setup.sh: unknown option ${1}; use --test, --bench or nothing" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true

constraints=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing the CUDA build of torch"
else
  echo "no NVIDIA GPU: installing the CPU build of torch (constraints/cpu.txt)"
  constraints=(-c constraints/cpu.txt)
fi
.venv/bin/python -m pip install -q "${constraints[@]}" -e ".[${extras}]" 2>&1 | grep -v "is ignored" || true
# W&B's sweep-config schema and validator (what `wandb[sweeps]` adds). Its metadata pins
# numpy<2, which would downgrade numpy under torch; the parts saesweep uses work with numpy 2.
.venv/bin/python -m pip install -q --no-deps "sweeps>=0.2" 2>&1 | grep -v "is ignored" || true
.venv/bin/saesweep --version
