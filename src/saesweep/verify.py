"""Check every file saesweep wrote under a run folder or a sweep folder.

What each kind of file must be:

* ``*.safetensors`` (exported weights, pack checkpoints): readable, and its tensors match the
  checksum written in its metadata;
* ``complete.json``: names the run's trial and the digest of the ``metrics.json`` beside it;
* other ``*.json`` (``metrics.json``, ``cfg.json``, ``failure.json``...): JSON;
* ``*.jsonl`` (``train_log.jsonl``): one JSON value per line;
* ``*.yaml``: YAML;
* ``*.journal`` (the sweep's journal): every complete line a record, no partial final line (the
  next write drops one with a warning; it is reported here so that it is seen).

Anything else (lock files, PNGs, Parquet) is not checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from saesweep.io import sha256_file, verify_tensors


@dataclass(frozen=True)
class Problem:
    path: Path
    what: str


def _check_json(path: Path) -> Optional[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"not JSON ({type(e).__name__})"
    if path.name == "complete.json":
        metrics = path.with_name("metrics.json")
        if not isinstance(data, dict) or not metrics.exists():
            return "a completion marker without its metrics.json"
        if data.get("metrics_sha256") != sha256_file(metrics):
            return "metrics.json changed after the run completed (its digest does not match)"
    return None


def _check_jsonl(path: Path) -> Optional[str]:
    try:
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if line.strip():
                json.loads(line)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"line {n} is not JSON ({type(e).__name__})"
    return None


def _check_yaml(path: Path) -> Optional[str]:
    import yaml

    try:
        yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return f"not YAML ({type(e).__name__})"
    return None


def _check_journal(path: Path) -> Optional[str]:
    from saesweep.sweep.storages.journal import journal_record

    data = path.read_bytes()
    bad = [n for n, line in enumerate(data.split(b"\n")[:-1], 1) if journal_record(line) is None]
    problems = []
    if bad:
        problems.append(f"line(s) {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''} are not records "
                        "(skipped when read)")
    if data and not data.endswith(b"\n"):
        torn = len(data) - data.rfind(b"\n") - 1
        problems.append(f"a partial final record of {torn} bytes (dropped at the next write)")
    return "; ".join(problems) or None


CHECKS = {".safetensors": verify_tensors, ".json": _check_json, ".jsonl": _check_jsonl, ".yaml": _check_yaml,
          ".journal": _check_journal}


def files_to_check(root: Path) -> Iterator[Path]:
    """The files under ``root`` (or ``root`` itself) that :data:`CHECKS` knows, in path order."""
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in paths:
        if p.suffix in CHECKS and not p.name.startswith("."):
            yield p


def stray_temporary_files(root: Path) -> list[Path]:
    """Temporary files of atomic writes (``.NAME.XXXX.tmp``) left by a process that was killed
    mid-write: never read, safe to delete."""
    if root.is_file():
        return []
    return sorted(p for p in root.rglob("*.tmp") if p.is_file())


def verify(root: str | Path) -> tuple[int, list[Problem]]:
    """(files checked, problems found) under ``root``; stray temporary files are problems too."""
    root = Path(root)
    checked, problems = 0, []
    for path in files_to_check(root):
        checked += 1
        what = CHECKS[path.suffix](path)
        if what:
            problems.append(Problem(path, what))
    for path in stray_temporary_files(root):
        problems.append(Problem(path, "a stray temporary file of a write that was cut off (never read; safe to "
                                      "delete)"))
    return checked, problems
