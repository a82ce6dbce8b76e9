"""The activation cache: reuse, growth, concurrent first use, crash safety, checksums, order."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
import torch
from fixtures_lm import *  # noqa: F401,F403  (until tests/conftest.py imports it)

from saesweep.config.experiment import ConfigError
from saesweep.data import cache, cache_build, lm, lm_activations


@pytest.fixture
def lm_loads(monkeypatch):
    """Counts how often the language model is loaded."""
    calls = []
    real = lm.load_lm

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(lm, "load_lm", counting)
    return calls


def digest(entry) -> str:
    h = hashlib.sha256(entry.gather(np.arange(entry.train_tokens)).tobytes())
    h.update(entry.heldout_activations(entry.manifest["heldout"]["tokens"]).tobytes())
    h.update(entry.heldout_token_ids(entry.heldout_rows).tobytes())
    return h.hexdigest()


def test_built_once_then_reused(tiny_lm, tiny_text_jsonl, make_cfg, lm_loads):
    cfg = make_cfg(tiny_lm, tiny_text_jsonl)
    first = lm_activations.open_hf(cfg)
    assert first.entry.built and len(lm_loads) == 1
    second = lm_activations.open_hf(cfg)
    assert not second.entry.built and len(lm_loads) == 1  # the LM did not run again
    assert digest(first.entry) == digest(second.entry)
    # the same hook under its other name, and other batch sizes, share the entry
    alias = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, hook="blocks.0.hook_resid_post", lm_batch_size=3))
    assert not alias.entry.built and alias.entry.key == first.entry.key and len(lm_loads) == 1
    # a different layer is a different entry
    other = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, hook="blocks.2.hook_resid_pre"))
    assert other.entry.built and other.entry.key != first.entry.key
    m = json.loads((first.entry.path / "manifest.json").read_text())
    assert m["train"]["tokens"] >= 2000 and m["d_in"] == 32 and m["dtype"] == "float32"
    x = first.entry.gather(np.arange(0, m["stats"]["tokens"])).astype(np.float64) * m["stats"]["scale"]
    assert m["stats"]["tokens"] == m["train"]["tokens"] and (x**2).sum(1).mean() == pytest.approx(32)
    np.testing.assert_allclose(m["stats"]["mean"], x.mean(0) / m["stats"]["scale"], rtol=1e-6, atol=1e-6)
    assert m["key_fields"]["layer"] == 1 and m["created"] and m["saesweep_version"]


def test_larger_request_extends_smaller_reuses(tiny_lm, tiny_text_jsonl, make_cfg, lm_loads, monkeypatch):
    monkeypatch.setattr(cache_build, "SHARD_BYTES", 10 * 15 * 32 * 4)  # 10 rows of 15 tokens per shard
    small = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, train={"tokens": 1000}))
    assert small.entry.built and len(small.entry.manifest["train"]["shards"]) == 7
    before = small.entry.gather(np.arange(0, 1000))
    big = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, train={"tokens": 3000}, eval={"tokens": 450}))
    assert big.entry.built and big.entry.train_tokens >= 3000 and len(lm_loads) == 2
    assert big.entry.manifest["reused_shards"] == 6  # full shards were relinked, not recomputed
    np.testing.assert_array_equal(big.entry.gather(np.arange(0, 1000)), before)  # prefix-stable
    # held-out rows grew from the end: the old ones are still a prefix
    np.testing.assert_array_equal(big.entry.heldout_activations(300), small.entry.heldout_activations(300))
    again = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, train={"tokens": 500}))
    assert not again.entry.built and len(lm_loads) == 2
    # statistics depend on the requested tokens only, not on what the cache happens to hold
    assert again.scale == pytest.approx(
        float(np.sqrt(1 / (big.entry.gather(np.arange(0, 500)).astype(np.float64) ** 2).sum(1).mean()))
    )
    assert small.scale == pytest.approx(lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, train={"tokens": 1000})).scale)
    assert cache.verify_entry(again.entry.path)


def _open_in_child(cfg_json, barrier, queue):
    torch.set_num_threads(1)  # forked children must not reuse the parent's OpenMP pool
    from saesweep.config.experiment import parse_config

    barrier.wait()
    acts = lm_activations.open_hf(parse_config(json.loads(cfg_json)))
    queue.put((acts.entry.built, digest(acts.entry)))


def test_two_processes_one_builds(tiny_lm, tiny_text_jsonl, make_cfg):
    cfg = make_cfg(tiny_lm, tiny_text_jsonl)
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(json.dumps(cfg.to_dict()), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(built for built, _ in results) == [False, True]  # exactly one built
    assert results[0][1] == results[1][1]  # both read identical data
    assert len(cache.list_entries(cfg.cache_dir)) == 1


def _killed_builder(cfg_json):
    torch.set_num_threads(1)
    from saesweep.config.experiment import parse_config

    def die(self):  # killed right after the first shard is written
        os.kill(os.getpid(), signal.SIGKILL)

    cache_build._Writer._close = die
    lm_activations.open_hf(parse_config(json.loads(cfg_json)))


def test_killed_build_is_ignored(tiny_lm, tiny_text_jsonl, make_cfg, lm_loads):
    cfg = make_cfg(tiny_lm, tiny_text_jsonl)
    p = mp.get_context("fork").Process(target=_killed_builder, args=(json.dumps(cfg.to_dict()),))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == -signal.SIGKILL
    adir = cache.cache_root(cfg.cache_dir) / "activations"
    key = cache.entry_key(cfg.source)
    stale = list(adir.glob(f".tmp-{key}-*"))
    assert stale and not (adir / key).exists()  # a half-built temp folder was left behind
    # make it look as complete as possible: a manifest inside the temp folder changes nothing
    (stale[0] / "manifest.json").write_text("{}")
    assert cache.list_entries(cfg.cache_dir) == []
    acts = lm_activations.open_hf(cfg)
    assert acts.entry.built and not list(adir.glob(f".tmp-{key}-*"))  # rebuilt; leftovers removed
    # an entry folder without its manifest (or with a truncated shard) is not an entry either
    os.remove(acts.entry.path / "manifest.json")
    assert lm_activations.open_hf(cfg).entry.built
    shard = lm_activations.open_hf(cfg).entry.path / "train-00000.npy"
    with open(shard, "r+b") as fh:
        fh.truncate(1000)
    assert lm_activations.open_hf(cfg).entry.built


def test_checksums_detect_corruption(tiny_lm, tiny_text_jsonl, make_cfg):
    acts = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl))
    path = acts.entry.path
    assert cache.verify_entry(path)
    acts.close()
    shard = path / acts.entry.manifest["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    assert not cache.verify_entry(path)
    assert not cache.verify_entry(path.parent / "no-such-entry")


def test_shuffled_order(tiny_lm, tiny_text_jsonl, make_cfg):
    acts = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, train={"tokens": 1000}))
    take = lambda it, k: [next(it) for _ in range(k)]  # noqa: E731
    a = take(acts.train_batches(96, seed=1), 25)  # 2.4 epochs of 1000 tokens
    b = take(acts.train_batches(96, seed=1), 25)
    c = take(acts.train_batches(96, seed=2), 25)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    late = take(acts.train_batches(96, seed=1, start=7), 18)
    assert all(torch.equal(x, y) for x, y in zip(a[7:], late))
    # each epoch is a permutation of the first train.tokens cached activations; epochs differ
    idx = np.concatenate(take(acts.batch_indices(96, seed=1), 25))
    assert sorted(idx[:1000]) == list(range(1000)) and sorted(idx[1000:2000]) == list(range(1000))
    assert not np.array_equal(idx[:1000], idx[1000:2000])
    np.testing.assert_array_equal(a[3].numpy(), acts.entry.gather(idx[288:384]) * np.float32(acts.scale))


def test_list_and_remove(tiny_lm, tiny_text_jsonl, tiny_tokens_parquet, make_cfg):
    cfg = make_cfg(tiny_lm, tiny_text_jsonl)
    k1 = lm_activations.open_hf(cfg).entry.key
    k2 = lm_activations.open_hf(make_cfg(tiny_lm, tiny_tokens_parquet)).entry.key
    entries = {e["key"]: e for e in cache.list_entries(cfg.cache_dir)}
    assert set(entries) == {k1, k2}
    e = entries[k1]
    assert e["model"] == str(tiny_lm) and e["dataset"] == str(tiny_text_jsonl)
    assert e["hook"] == "blocks.1.hook_resid_pre"
    assert e["tokens"] >= 2000 and e["size_bytes"] > 2000 * 32 * 4 and e["created"]
    with pytest.raises(ConfigError, match="not in the cache"):
        cache.remove_entries(cfg.cache_dir, [k1, "ffffffff"])
    assert len(cache.list_entries(cfg.cache_dir)) == 2  # nothing removed on a bad key
    assert cache.remove_entries(cfg.cache_dir, [k1[:8]]) == [k1]
    assert [e["key"] for e in cache.list_entries(cfg.cache_dir)] == [k2]
    assert cache.remove_entries(cfg.cache_dir, "all") == [k2]
    assert cache.list_entries(cfg.cache_dir) == []


def test_progress_bar_and_open_entry(tiny_lm, tiny_text_jsonl, make_cfg, capsys):
    cfg = make_cfg(tiny_lm, tiny_text_jsonl)
    root = cache.cache_root(cfg.cache_dir)
    entry = cache_build.open_entry(cfg.source, root, train_rows=10, heldout_rows=4, progress=True)
    assert entry.built and entry.train_tokens == 150 and entry.heldout_rows == 4
    assert "rows" in capsys.readouterr().err  # the rich bar went to stderr
    entry = cache_build.open_entry(cfg.source, root, train_rows=5, heldout_rows=2, progress=True)
    assert not entry.built and capsys.readouterr().err == ""


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SAESWEEP_CACHE", str(tmp_path / "env"))
    assert cache.cache_root() == tmp_path / "env"
    assert cache.cache_root(tmp_path / "cfg") == tmp_path / "cfg"
    monkeypatch.delenv("SAESWEEP_CACHE")
    assert cache.cache_root().name == "saesweep"
