"""Activation storage that fits the job: 16-bit caches, streaming through a shuffling buffer,
and the disk budget checked before any work."""

from __future__ import annotations

import contextlib
import itertools
import json

import numpy as np
import pytest
import torch
from fixtures_lm import *  # noqa: F401,F403

from saesweep.packing import pack_key
import saesweep
from saesweep.config.experiment import ConfigError, HFSource
from saesweep.data import budget, cache, lm_activations


def test_bfloat16_encoding_rounds_to_nearest_even():
    one = np.float32(1.0)
    halfway = np.float32(1 + 2**-8)  # exactly between bf16 1.0 and 1 + 2^-7: ties go to the even 1.0
    above = np.float32(1 + 2**-8 + 2**-10)  # just above the tie: rounds up
    x = np.array([[one, halfway, above, -2.5]], np.float32)
    bits = cache.encode(x, "bfloat16")
    assert bits.dtype == np.uint16 and bits.tolist() == [[0x3F80, 0x3F80, 0x3F81, 0xC020]]
    assert cache.decode(bits, "bfloat16").tolist() == [[1.0, 1.0, 1 + 2**-7, -2.5]]


@pytest.mark.parametrize("dtype,bits", [("bfloat16", 8), ("float16", 11)])
def test_16_bit_round_trip_keeps_the_format_s_precision(dtype, bits):
    x = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32) * 30
    y = cache.decode(cache.encode(x, dtype), dtype)
    assert y.dtype == np.float32
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-bits + 1e-7)


def test_float16_refuses_activations_beyond_its_range():
    with pytest.raises(ValueError, match="cache_dtype: float16 cannot hold"):
        cache.encode(np.array([[1e5]], np.float32), "float16")


def test_auto_dtype_follows_the_size_of_the_job():
    src = HFSource()
    assert budget.resolve_dtype(src, 1_000_000, 64) == "float32"  # 256 MB in float32
    assert budget.resolve_dtype(src, 100_000_000, 768) == "bfloat16"  # 307 GB in float32
    assert budget.resolve_dtype(src.model_copy(update={"cache_dtype": "float16"}), 10, 8) == "float16"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_cache_halves_the_bytes_and_keeps_the_activations(tiny_lm, tiny_text_jsonl, make_cfg, dtype):
    full = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, cache_dtype="float32"), progress=False)
    half = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, cache_dtype=dtype), progress=False)
    assert full.entry.key != half.entry.key and half.entry.manifest["dtype"] == dtype
    shard = lambda e: sum(s["bytes"] for s in e.manifest["train"]["shards"])  # noqa: E731
    assert shard(half.entry) < 0.51 * shard(full.entry)
    idx = np.arange(full.entry.train_tokens)
    a, b = full.entry.gather(idx), half.entry.gather(idx)
    tol = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
    assert np.all(np.abs(a - b) <= np.abs(a) * tol + 1e-6)
    # held-out activations stay float32: the same values
    held = full.entry.manifest["heldout"]["tokens"]
    assert np.array_equal(full.entry.heldout_activations(held), half.entry.heldout_activations(held))
    assert half.scale == pytest.approx(full.scale, rel=1e-3)
    assert cache.verify_entry(half.entry.path)


def test_16_bit_cache_and_delivery_fields_keep_the_trial_id(tiny_lm, tiny_text_jsonl, make_cfg):
    a = make_cfg(tiny_lm, tiny_text_jsonl)
    b = make_cfg(tiny_lm, tiny_text_jsonl, cache_dtype="bfloat16", streaming=True, stream_buffer_tokens=4096)
    assert a.trial_id == b.trial_id
    assert pack_key(a) != pack_key(b)  # one pack trains on one stream


def _stream_cfg(make_cfg, tiny_lm, tiny_text_jsonl, **kw):
    return make_cfg(tiny_lm, tiny_text_jsonl, streaming=True, stream_buffer_tokens=1024, **kw)


def test_streaming_serves_every_training_token_once_and_resumes(tiny_lm, tiny_text_jsonl, make_cfg, monkeypatch,
                                                                tmp_path):
    monkeypatch.setattr(cache, "NORM_TOKENS", 300)  # so the cached prefix is smaller than the data
    cached = lm_activations.open_hf(make_cfg(tiny_lm, tiny_text_jsonl, cache_dir=tmp_path / "full"), progress=False)
    cfg = _stream_cfg(make_cfg, tiny_lm, tiny_text_jsonl)
    streamed = lm_activations.open_hf(cfg, progress=False)
    assert isinstance(streamed, lm_activations.StreamedHFActivations)
    assert streamed.entry.train_tokens < cfg.train.tokens  # only the prefix is stored
    n, bs = cfg.train.tokens, cfg.train.batch_size
    steps = cfg.train.steps
    got = torch.cat(list(itertools.islice(streamed.train_batches(bs, seed=3), steps)))
    assert streamed.lm_tokens <= n + 15  # the LM ran once over the training rows
    want = torch.from_numpy(cached.entry.gather(np.arange(n))) * streamed.scale
    # every training token exactly once (as a multiset of rows), in a shuffled order
    key = lambda t: t[torch.from_numpy(np.lexsort(t.numpy().T[::-1]))]  # noqa: E731
    torch.testing.assert_close(key(got[:n]), key(want))
    assert not torch.equal(got[:n], want)
    # batch k onwards is the same after a resume at k, and a resumed stream skips the LM
    k = steps - 5
    again = lm_activations.open_hf(cfg, progress=False)
    resumed = torch.cat(list(itertools.islice(again.train_batches(bs, seed=3, start=k), 5)))
    torch.testing.assert_close(resumed, got[k * bs:])
    assert again.lm_tokens <= 1024 + 15  # only the last window ran through the LM


def test_a_streamed_pack_trains_every_member_like_the_cached_run(tiny_lm, tiny_text_jsonl, make_cfg, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(cache, "NORM_TOKENS", 300)
    base = dict(train={"tokens": 6000, "batch_size": 64, "dtype": "float32"})
    coeffs = (0.03, 0.1, 0.3)
    cached = [make_cfg(tiny_lm, tiny_text_jsonl, cache_dir=tmp_path / "full", **base).with_updates(sparsity_coeff=c,
              output_dir=str(tmp_path / "cached")) for c in coeffs]
    streamed = [_stream_cfg(make_cfg, tiny_lm, tiny_text_jsonl, **base).with_updates(
                sparsity_coeff=c, output_dir=str(tmp_path / "streamed")) for c in coeffs]
    a = saesweep.run_pack(cached)
    b = saesweep.run_pack(streamed)
    assert all(r.ok for r in a + b)
    for x, y in zip(a, b):
        assert y.metrics["fvu"] == pytest.approx(x.metrics["fvu"], rel=0.15, abs=0.02)
        assert y.metrics["l0"] == pytest.approx(x.metrics["l0"], rel=0.15, abs=0.5)
    rec = json.loads((b[0].run_dir / "metrics.json").read_text())
    assert rec["source"]["streamed"] is True


def test_a_cache_that_does_not_fit_is_refused_with_the_numbers(tiny_lm, tiny_text_jsonl, make_cfg, monkeypatch):
    cfg = make_cfg(tiny_lm, tiny_text_jsonl, streaming=False, cache_max_gb=1e-6)
    with pytest.raises(ConfigError) as e:
        budget.plan_activations(cfg)
    msg = str(e.value)
    assert "needs 0.000" in msg and "cache_max_gb allows 1e-06 GB" in msg
    assert "source.cache_dtype: bfloat16" in msg and "source.streaming: true" in msg and "fewer train.tokens" in msg
    assert not (cache.cache_root(cfg.cache_dir) / "activations").exists()  # nothing written
    # streaming: auto streams what the budget cannot cache
    monkeypatch.setattr(cache, "NORM_TOKENS", 150)
    auto = make_cfg(tiny_lm, tiny_text_jsonl, cache_max_gb=1e-4)
    plan = budget.plan_activations(auto)
    assert plan.stream and plan.new_bytes <= 1e5 < plan.full_bytes


def test_the_sweep_refuses_before_any_work_when_the_disk_is_too_small(tiny_lm, tiny_text_jsonl, tmp_path,
                                                                      monkeypatch, capsys):
    from saesweep.cli.app import main

    monkeypatch.setattr(budget, "free_bytes", lambda path: 10_000)
    out = tmp_path / "runs"
    rc = main(["sweep", "--sae_types", "relu", "--limit", "2", "--output_dir", str(out),
               "--set", "source.kind=hf", "--set", f"source.model={tiny_lm}", "--set", f"source.dataset={tiny_text_jsonl}",
               "--set", "source.context_length=16", "--set", "source.hook=blocks.1.hook_resid_pre", "--set", "source.eval_split=null", "--set", "source.streaming=false",
               "--set", "train.tokens=2000", "--set", "eval.tokens=300", "--set", "eval.ce_tokens=200",
               "--set", f"cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "free disk allows 1e-05 GB" in err and "options:" in err
    assert not out.exists() and not (tmp_path / "cache").exists()


@contextlib.contextmanager
def _train_on_a_small_disk(size, tiny_lm, dataset, make_cfg, tmp_path, monkeypatch, capsys):
    """``saesweep train`` with its cache on a tmpfs of ``size`` whose free-space check passed
    (something else filled the disk after it); yields (exit code, stderr, the filesystem)."""
    import yaml
    from sweep_helpers import small_filesystem

    from saesweep.cli.app import main

    with small_filesystem(size) as fs:
        if fs is None:
            pytest.skip("needs a small filesystem: a tmpfs mount (root on Linux)")
        cfg = make_cfg(tiny_lm, dataset, cache_dir=fs / "cache", streaming=False, train={"tokens": 20_000})
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        monkeypatch.setattr(budget, "free_bytes", lambda path: 10**12)
        rc = main(["train", str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "runs")])
        yield rc, capsys.readouterr().err.strip(), fs


def test_a_disk_that_fills_during_the_cache_build_stops_cleanly_with_no_partial_entry(
        tiny_lm, tiny_text_jsonl, make_cfg, tmp_path, monkeypatch, capsys):
    """The build's plain file writes fail with ENOSPC, one line says so, and no entry, complete or
    partial, is left."""
    with _train_on_a_small_disk("1m", tiny_lm, tiny_text_jsonl, make_cfg, tmp_path, monkeypatch, capsys) as (rc, err, fs):
        assert rc == 1 and "disk full" in err and "Traceback" not in err, err
        assert cache.list_entries(fs / "cache") == []
        assert "train-00000.npy" in err  # it was the build that ran out, not the dataset copy
        leftovers = [p for p in (fs / "cache" / "activations").rglob("*") if p.is_file() and p.suffix != ".lock"]
        assert leftovers == [], leftovers


def test_a_disk_that_fills_while_datasets_converts_the_data_is_one_line(tiny_lm, make_cfg, tmp_path, monkeypatch,
                                                                        capsys):
    """The dataset's own conversion (datasets writing its Arrow copy) runs out of disk: one line
    naming the full disk, no traceback."""
    import json

    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(20_000):
            f.write(json.dumps({"text": f"the little cat {i} saw a big red ball and then ran to the park"}) + "\n")
    with _train_on_a_small_disk("256k", tiny_lm, big, make_cfg, tmp_path, monkeypatch, capsys) as (rc, err, _):
        assert rc == 1 and "Traceback" not in err, err
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("activations:")]  # the plan
        assert len(lines) == 1 and "disk full" in lines[0], err
