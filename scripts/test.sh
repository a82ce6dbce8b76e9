#!/usr/bin/env bash
# Set up (if needed), lint (ruff), type-check (mypy), build the docs (mkdocs --strict) and run the
# test suite: what CI runs. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the long end-to-end checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --test
export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-1000000000000}
.venv/bin/ruff check --quiet src tests benchmarks scripts
.venv/bin/mypy --no-error-summary src/saesweep
.venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
exec .venv/bin/python -m pytest -q "$@"
