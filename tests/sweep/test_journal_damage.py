"""A damaged sweep journal costs at most its last record: a torn tail (a write cut off, a full
disk) is dropped with a warning, a line that is not a record is skipped, and the next run goes on
without repair."""

from __future__ import annotations

import contextlib
import errno
import os
import warnings
from pathlib import Path

import pytest
from sweep_helpers import lr_sweep, small_filesystem

from saesweep.config.sweep import expand
from saesweep.sweep.store import SweepStore
from saesweep.sweep.worker import Worker, open_sweep, queue_trials


def spec_of(folder, n=3):
    return lr_sweep(folder, "j", n, pack_size=1)


def test_a_torn_final_line_is_dropped_and_the_sweep_goes_on(tmp_path):
    spec = spec_of(tmp_path)
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    journal = Path(spec.storage_url)
    data = journal.read_bytes()
    journal.write_bytes(data[:-25])  # the last record cut mid-line
    lines_before = data[:-25].count(b"\n")
    with pytest.warns(UserWarning, match="dropped a partial final record"):
        store = SweepStore(spec.storage_url, spec.name, create=False)
    assert journal.read_bytes().endswith(b"\n") and journal.read_bytes().count(b"\n") == lines_before
    queue_trials(store, spec, expand(spec))  # the record lost is written again
    Worker(store, spec.execution).run()
    assert {r.state for r in SweepStore(spec.storage_url, spec.name, create=False).records()} == {"complete"}


def test_a_line_that_is_not_a_record_is_skipped_while_workers_run(tmp_path):
    spec = spec_of(tmp_path)
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec)[:1])
    with open(spec.storage_url, "ab") as fh:
        fh.write(b"this is not json\n{\"also\": \"not a record\"}\n")
    with pytest.warns(UserWarning, match="line .* is not a record"):
        queue_trials(store, spec, expand(spec))  # the same open store reads the garbage and writes on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Worker(store, spec.execution).run()
        recs = SweepStore(spec.storage_url, spec.name, create=False).records()
    assert len(recs) == 3 and {r.state for r in recs} == {"complete"}


def _fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of ``folder`` up to ``leave`` bytes free; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_full_disk_leaves_no_torn_line_and_the_next_run_goes_on(tmp_path, monkeypatch):
    with small_filesystem("2m") as fs:
        if fs is None:  # no mount here: the write fails part-way, as on a full disk
            folder = tmp_path
            real = os.pwrite

            def pwrite(fd, data, offset):
                if len(data) > 200:
                    real(fd, bytes(data[:100]), offset)
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(fd, data, offset)
        else:
            folder = fs
        spec = spec_of(folder, n=40)
        store = open_sweep(spec)
        journal = Path(spec.storage_url)
        before = journal.read_bytes()
        if fs is None:
            monkeypatch.setattr(os, "pwrite", pwrite)
        else:
            filler = _fill(fs, leave=2048)
        with pytest.raises(OSError) as e:
            queue_trials(store, spec, expand(spec))
        assert e.value.errno == errno.ENOSPC
        after = journal.read_bytes()
        assert after.endswith(b"\n") and after.startswith(before)  # whole records only
        if fs is None:
            monkeypatch.undo()
        else:
            filler.unlink()
        store = SweepStore(spec.storage_url, spec.name, create=False)
        queue_trials(store, spec, expand(spec)[:2])
        assert store.counts()["waiting"] >= 2
        Worker(store, spec.execution).run()
        assert {r.state for r in store.records()} == {"complete"}
