"""The activation cache shared by several hosts on one folder: concurrent builders on hosts of
different names (with and without file locks that reach across hosts), `cache_mode: wait`,
stale temp folders, and `saesweep cache warm`."""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import socket
import time

import numpy as np
import pytest
import torch

from saesweep.config.experiment import ConfigError
from saesweep.data import cache, cache_build, lm, lm_activations

CLONE_NEWUTS = 0x04000000


def become_host(name: str) -> bool:
    """Give this (forked) process a hostname of its own: a UTS namespace, as on another machine."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUTS) != 0:
        return False
    socket.sethostname(name)
    return True


def can_make_hosts() -> bool:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(become_host("probe") and socket.gethostname() == "probe"))
    p.start()
    p.join(30)
    return p.exitcode == 0 and q.get(timeout=5)


def digest(entry) -> str:
    h = hashlib.sha256(entry.gather(np.arange(entry.train_tokens)).tobytes())
    h.update(entry.heldout_activations(entry.manifest["heldout"]["tokens"]).tobytes())
    return h.hexdigest()


def _host_builds(name, cfg_json, ready, queue, no_locks):
    """A builder on host ``name``: opens the entry; with ``no_locks``, as if flock did not reach
    the other host (NFS mounted nolock): both build, and both reach the publishing step together."""
    torch.set_num_threads(1)
    from saesweep.config.experiment import parse_config

    named = become_host(name)
    loads = []
    real_load = lm.load_lm
    lm.load_lm = lambda *a, **k: (loads.append(1), real_load(*a, **k))[1]
    if no_locks:
        import contextlib

        cache_build.file_lock = lambda *a, **k: contextlib.nullcontext()
        real_publish = cache_build._publish

        def publish_together(*a, **k):
            ready.wait(60)  # both temp folders are complete and present: now both publish
            return real_publish(*a, **k)

        cache_build._publish = publish_together
    else:
        ready.wait(60)
    acts = lm_activations.open_hf(parse_config(json.loads(cfg_json)))
    queue.put((name, named and socket.gethostname() == name, acts.entry.built, len(loads), digest(acts.entry)))


@pytest.mark.parametrize("no_locks", [False, True], ids=["flock", "no-cross-host-locks"])
def test_two_hosts_start_together_on_one_cache(tiny_lm, tiny_text_jsonl, make_cfg, no_locks):
    cfg = make_cfg(tiny_lm, tiny_text_jsonl)
    ctx = mp.get_context("fork")
    ready, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_host_builds, args=(name, json.dumps(cfg.to_dict()), ready, queue, no_locks))
             for name in ("host-a", "host-b")]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    names, renamed, built, loads, digests = zip(*results)
    assert all(renamed) or not can_make_hosts()
    assert sorted(built) == [False, True]  # one entry is the one in place; the other process reads it
    assert len(set(digests)) == 1  # both read identical activations
    if no_locks:
        assert loads == (1, 1)  # without a lock both computed, and one result was discarded
    else:
        assert sorted(loads) == [0, 1]  # with the lock one host computed, the other waited and read
    adir = cache.cache_root(cfg.cache_dir) / "activations"
    assert len(cache.list_entries(cfg.cache_dir)) == 1
    assert not list(adir.glob(".tmp-*")) and not list(adir.glob(".old-*"))  # nothing left behind
    assert cache.verify_entry(adir / cache.entry_key(cfg.source))


def test_stale_temp_folders_only_of_dead_builds_are_removed(tmp_path, monkeypatch):
    adir = tmp_path / "activations"
    adir.mkdir()
    key = "0123456789abcdef0123"
    me = cache.host_name()
    dead = 2**22 + 12345  # above the default pid_max: no such process
    live_other = adir / f".tmp-{key}-otherhost-{os.getpid()}-abc"  # another host's build, active
    dead_mine = adir / f".tmp-{key}-{me}-{dead}-def"  # this host's build, its process gone
    old_other = adir / f".tmp-{key}-otherhost-{dead}-ghi"  # another host's, untouched for hours
    live_mine = adir / f".tmp-{key}-{me}-{os.getpid()}-jkl"  # this process's own build
    for d in (live_other, dead_mine, old_other, live_mine):
        d.mkdir()
        (d / "train-00000.npy").write_bytes(b"x")
    hours_ago = time.time() - 3 * cache.STALE_S
    for f in (old_other, old_other / "train-00000.npy"):
        os.utime(f, (hours_ago, hours_ago))
    recent_old = adir / f".old-{key}-{int(time.time())}-aaaa"  # a replaced entry, still read by someone
    expired_old = adir / f".old-{key}-{int(time.time() - 2 * cache_build.OLD_GRACE_S)}-bbbb"
    recent_old.mkdir()
    expired_old.mkdir()
    cache_build._clear_stale(adir, key)
    assert live_other.exists() and live_mine.exists() and recent_old.exists()
    assert not dead_mine.exists() and not old_other.exists() and not expired_old.exists()
    assert set(cache_build._builds_in_progress(adir, key)) == {f"otherhost (pid {os.getpid()})", f"{me} (pid {os.getpid()})"}


def _waiter(cfg_json, queue):
    torch.set_num_threads(1)
    from saesweep.config.experiment import parse_config

    loads = []
    real_load = lm.load_lm
    lm.load_lm = lambda *a, **k: (loads.append(1), real_load(*a, **k))[1]
    os.environ["SAESWEEP_CACHE_WAIT_POLL_S"] = "0.1"
    t0 = time.time()
    acts = lm_activations.open_hf(parse_config(json.loads(cfg_json)))
    queue.put((acts.entry.built, len(loads), digest(acts.entry), time.time() - t0))


def test_wait_mode_reads_what_another_host_builds(tiny_lm, tiny_text_jsonl, make_cfg):
    cfg = make_cfg(tiny_lm, tiny_text_jsonl)
    waiting = cfg.with_updates(cache_mode="wait")
    assert waiting.trial_id == cfg.trial_id  # how the cache is filled is not part of the experiment
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_waiter, args=(json.dumps(waiting.to_dict()), queue))
    p.start()
    time.sleep(1.5)
    assert p.is_alive() and queue.empty()  # waiting: it did not build
    built = lm_activations.open_hf(cfg)  # the "other host" builds
    w_built, w_loads, w_digest, waited = queue.get(timeout=60)
    p.join(30)
    assert p.exitcode == 0
    assert built.entry.built and not w_built and w_loads == 0  # the waiter never ran the LM
    assert w_digest == digest(built.entry) and waited >= 1.5


def test_wait_mode_times_out_with_a_clear_message(tiny_lm, tiny_text_jsonl, make_cfg, monkeypatch):
    cfg = make_cfg(tiny_lm, tiny_text_jsonl, cache_dir=None).with_updates(cache_mode="wait")
    monkeypatch.setenv("SAESWEEP_CACHE_WAIT_S", "0.3")
    monkeypatch.setenv("SAESWEEP_CACHE_WAIT_POLL_S", "0.05")
    loads = []
    monkeypatch.setattr(lm, "load_lm", lambda *a, **k: loads.append(1))
    key = cache.entry_key(cfg.source)
    with pytest.raises(ConfigError) as e:
        lm_activations.open_hf(cfg)
    msg = str(e.value)
    assert "cache_mode wait" in msg and key in msg and "nobody is building it" in msg and "saesweep cache warm" in msg
    assert not loads and not list((cache.cache_root(cfg.cache_dir) / "activations").glob(".tmp-*"))
    # with a build in progress elsewhere, the message says where
    busy = cache.cache_root(cfg.cache_dir) / "activations" / f".tmp-{key}-gpu_node_7-{os.getpid()}-x"
    busy.mkdir()
    with pytest.raises(ConfigError, match=rf"in progress on gpu_node_7 \(pid {os.getpid()}\)"):
        lm_activations.open_hf(cfg)


def test_cache_warm_command_then_wait_mode(tmp_path, tiny_lm, tiny_text_jsonl, make_cfg, capsys):
    from saesweep.cli import main

    cfg = make_cfg(tiny_lm, tiny_text_jsonl, cache_dir=tmp_path / "shared")
    path = tmp_path / "exp.yaml"
    path.write_text(cfg.with_updates(cache_mode="wait").to_yaml())  # the hosts' config: wait
    assert main(["cache", "warm", "--config", str(path), "--device", "cpu"]) == 0  # warm builds regardless
    out = capsys.readouterr().out
    key = cache.entry_key(cfg.source)
    assert f"{key}  built" in out
    assert main(["cache", "warm", "--config", str(path), "--device", "cpu"]) == 0
    assert f"{key}  already cached" in capsys.readouterr().out
    acts = lm_activations.open_hf(cfg.with_updates(cache_mode="wait"))
    assert not acts.entry.built and acts.entry.key == key
    # a sweep spec: every entry its trials need, with the largest token counts among them
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"name": "w", "sae_types": ["relu"], "grids": {"relu": {"lr": [1e-3, 2e-3]}},
                                "base": {**{k: v for k, v in cfg.to_dict().items() if k in ("source", "eval")},
                                         "train": {"tokens": 3000, "batch_size": 64},
                                         "cache_dir": str(tmp_path / "shared")}}))
    assert main(["cache", "warm", "--spec", str(spec), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{key}  built" in out  # grown to the sweep's 3000 training tokens
    assert [e["tokens"] for e in cache.list_entries(tmp_path / "shared")] == [3000]
    synthetic = tmp_path / "syn.yaml"
    synthetic.write_text("sae_type: relu\n")
    assert main(["cache", "warm", "--config", str(synthetic)]) == 0
    assert "nothing to warm" in capsys.readouterr().out
