"""Reading W&B's offline ``.wandb`` run files back (what the tests check a run logged)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator


def read_run_file(path: str | os.PathLike) -> dict[str, Any]:
    """Config, history rows and final summary of a run's ``.wandb`` file (e.g. an offline run).

    The file is W&B's transaction log: a LevelDB-style log of ``wandb_internal.Record``
    protobufs (wandb's own message types). Returns ``{"run_id", "project", "group", "name",
    "config": {...}, "history": [{...}, ...], "summary": {...}, "exit_code"}``.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.wandb"))
        if not files:
            raise FileNotFoundError(f"no .wandb file in {path}")
        path = files[0]
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None}
    for rec in _records(path.read_bytes()):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(run_id=r.run_id, project=r.project, group=r.run_group, name=r.display_name,
                       job_type=r.job_type, tags=list(r.tags))
            _apply(out["config"], r.config.update)
        elif kind == "config":
            _apply(out["config"], rec.config.update)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply(row, rec.history.item)
            out["history"].append(row)
        elif kind == "summary":
            _apply(out["summary"], rec.summary.update)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def _apply(target: dict, items) -> None:
    for it in items:
        key = it.key or "/".join(it.nested_key)
        if key.startswith("_wandb"):
            continue
        try:
            target[key] = json.loads(it.value_json)
        except ValueError:
            target[key] = it.value_json


def _records(data: bytes) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    header, block = 7, 32768
    ident, magic, version = struct.unpack("<4sHB", data[:header])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a W&B transaction log (.wandb) file")
    pos, buf = header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        pos += header
        if kind == 0 and length == 0:
            break
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec
