"""Training: recovery of known features, packs equal single runs, divergence, resume."""

import json
import math

import pytest
import torch

from saesweep.packing import pack_key
import saesweep
from saesweep import saes
from saesweep.data import open_source
from saesweep.metrics.recovery import world_recovery
from saesweep.training.trainer import build_sae, lr_factor, sparsity_factor, train_pack


def test_relu_recovers_true_features(tiny_cfg):
    # easy: 24 independent true features in 16 dimensions, ~1 active per token, 64 latents
    cfg = tiny_cfg(sparsity_coeff=0.2, source={"world": "toy", "n_features": 24, "sparsity": 0.04},
                   train={"tokens": 400_000})
    r = saesweep.run(cfg)
    assert r.ok
    assert r.metrics["decoder_frac_cos90"] >= 0.9
    assert r.metrics["decoder_mmcs"] > 0.95 and r.metrics["fvu"] < 0.1
    assert 0.6 < r.metrics["feature_f1"] <= r.metrics["probe_f1"] + 0.05, r.metrics


def test_a_degenerate_sae_scores_low_on_feature_f1_though_its_decoder_points_right(tiny_cfg):
    # the realistic world: a good SAE against one whose penalty silences nearly every latent
    base = dict(source={"n_features": 48, "sparsity": 0.05}, train={"tokens": 300_000})
    good, silent = saesweep.run_pack([tiny_cfg(sparsity_coeff=c, **base) for c in (1.0, 30.0)])
    assert good.ok and silent.ok
    g, s = good.metrics, silent.metrics
    assert s["l0"] < 1 or s["fvu"] > 0.9
    assert g["feature_f1"] > 0.25 and s["feature_f1"] < 0.05
    assert s["feature_f1"] < s["decoder_mmcs"] / 2  # the decoder-only figure would not have told


@pytest.mark.parametrize("sae_type", ["hard_concrete", "gated", "gated_hard_concrete"])
def test_every_type_trains_to_a_sensible_fvu(tiny_cfg, sae_type):
    r = saesweep.run(tiny_cfg(sae_type=sae_type, train={"tokens": 200_000}))
    assert r.ok, r.reason
    m = r.metrics
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
    assert m["fvu"] < 0.5 and 0 < m["l0"] < 64
    log = [json.loads(line) for line in (r.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    # every auxiliary term is logged by its name, and they add up to the logged aux
    names = saes.get(sae_type).aux_terms
    assert all(sum(rec[n] for n in names) == pytest.approx(rec["aux"], rel=1e-5, abs=1e-7) for rec in log)
    assert ("gate_aux" in log[0]) == sae_type.startswith("gated")


def test_run_folder_contents(tiny_cfg):
    r = saesweep.run(tiny_cfg())
    names = {p.name for p in r.run_dir.iterdir()}
    assert {"config.yaml", "metrics.json", "train_log.jsonl", "sae_weights.safetensors", "cfg.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    rec = json.loads((r.run_dir / "metrics.json").read_text())
    for k in ("mse", "fvu", "explained_variance", "l0", "l1", "dead_fraction", "feature_f1", "absorption", "decoder_frac_cos90", "tokens_per_s", "train_time_s", "device"):
        assert k in rec["metrics"], k
    assert saesweep.load_config(r.run_dir / "config.yaml") == r.config


def test_deterministic_for_a_seed(tiny_cfg):
    a = saesweep.run(tiny_cfg())
    b = saesweep.run(tiny_cfg())
    assert a.metrics["fvu"] == b.metrics["fvu"] and a.metrics["l0"] == b.metrics["l0"]
    c = saesweep.run(tiny_cfg(train={"seed": 1}))
    assert c.metrics["fvu"] != a.metrics["fvu"]


@pytest.mark.parametrize("sae_type", ["relu", "hard_concrete"])
def test_pack_members_match_their_single_runs(tiny_cfg, sae_type):
    cfgs = [tiny_cfg(sae_type=sae_type, lr=lr, sparsity_coeff=s, train={"tokens": 30_000})
            for lr, s in [(1e-3, 0.1), (3e-3, 0.3), (1e-2, 0.03)]]
    assert len({pack_key(c) for c in cfgs}) == 1
    data = open_source(cfgs[0])
    pack = train_pack(cfgs, data, show_progress=False)
    for i, c in enumerate(cfgs):
        single = train_pack([c], data, show_progress=False)
        for name, p in single.sae.named_parameters():
            torch.testing.assert_close(getattr(pack.sae, name)[i], p[0], rtol=2e-4, atol=2e-5, msg=name)
        assert pack.members[i].log[-1]["loss"] == pytest.approx(single.members[0].log[-1]["loss"], rel=1e-4)


def test_a_diverging_member_is_stopped_and_the_others_untouched(tiny_cfg):
    ok1, bad, ok2 = (tiny_cfg(lr=lr, train={"tokens": 20_000, "grad_clip": None}) for lr in (1e-3, 1e30, 3e-3))
    data = open_source(ok1)
    pack = train_pack([ok1, bad, ok2], data, show_progress=False)
    assert pack.members[1].status == "diverged" and "step" in pack.members[1].reason
    assert [m.status for m in (pack.members[0], pack.members[2])] == ["complete", "complete"]
    assert pack.alive == [0, 2]
    alone = train_pack([ok2], data, show_progress=False)
    torch.testing.assert_close(pack.sae.W_enc[1], alone.sae.W_enc[0], rtol=2e-4, atol=2e-5)
    results = saesweep.run_pack([ok1, bad, ok2], data=data)
    assert [r.status for r in results] == ["complete", "failed", "complete"]
    assert (results[1].run_dir / "failure.json").exists() and not (results[1].run_dir / "metrics.json").exists()


def test_checkpoint_resume_equals_uninterrupted(tiny_cfg, tmp_path, stop_after):
    cfgs = [tiny_cfg(sae_type="hard_concrete", lr=lr, train={"tokens": 40_000}) for lr in (1e-3, 3e-3)]
    data = open_source(cfgs[0])
    full = train_pack(cfgs, data, show_progress=False)
    ckpt = tmp_path / "pack.safetensors"
    part = train_pack(cfgs, data, show_progress=False, checkpoint=ckpt, should_stop=stop_after(30))
    assert part.steps == 30 and all(m.status == "running" for m in part.members) and ckpt.exists()
    # resume a subset: member 1 alone continues from the shared checkpoint
    resumed = train_pack(cfgs[1:], data, show_progress=False, checkpoint=ckpt)
    assert resumed.resumed_from == 30 and resumed.members[0].status == "complete"
    for name, p in resumed.sae.named_parameters():
        torch.testing.assert_close(p[0], getattr(full.sae, name)[1], rtol=1e-5, atol=1e-6, msg=name)
    assert [r["step"] for r in resumed.members[0].log] == [r["step"] for r in full.members[1].log]


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_a_damaged_checkpoint_is_discarded_and_training_starts_over(tiny_cfg, tmp_path, damage, stop_after):
    cfgs = [tiny_cfg(lr=lr, train={"tokens": 20_000}) for lr in (1e-3, 3e-3)]
    data = open_source(cfgs[0])
    ckpt = tmp_path / "pack.safetensors"
    train_pack(cfgs, data, show_progress=False, checkpoint=ckpt, should_stop=stop_after(10))
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"\xff" * 64 + blob[64:])
    with pytest.warns(UserWarning, match="damaged.*start from step 0"):
        again = train_pack(cfgs, data, show_progress=False, checkpoint=ckpt)
    assert again.resumed_from == 0 and [m.status for m in again.members] == ["complete", "complete"]
    assert again.members[0].log[0]["step"] < 10


def _safetensors_layout(blob: bytes) -> tuple[int, dict]:
    import json
    import struct

    n = struct.unpack("<Q", blob[:8])[0]
    return 8 + n, json.loads(blob[8:8 + n])


def _corrupt_but_parseable(blob: bytes, how: str) -> bytes:
    """Damage a safetensors file so that it still parses: flipped bytes inside a tensor, a NaN
    written over a float, or two same-sized tensors' offsets swapped in the header."""
    import json
    import struct

    start, header = _safetensors_layout(blob)
    data = bytearray(blob)
    name = next(k for k in header if k.endswith("W_enc"))
    a, b = header[name]["data_offsets"]
    if how == "flipped bytes":
        for i in range(start + a + 8, start + a + 16):
            data[i] ^= 0x5A
    elif how == "nan":
        data[start + a:start + a + 4] = struct.pack("<f", float("nan"))
    else:  # swapped offsets: the header is valid JSON with valid offsets
        other = next(k for k, v in header.items() if k not in (name, "__metadata__") and v["dtype"] == header[name]["dtype"]
                     and v["shape"] == header[name]["shape"])
        header[name]["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], [a, b]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (start - 8 - len(text))
        assert len(text) == start - 8
        data[8:start] = text
    return bytes(data)


@pytest.mark.parametrize("how", ["flipped bytes", "nan", "swapped offsets"])
def test_a_corrupt_checkpoint_that_still_parses_is_caught_by_its_checksum(tiny_cfg, tmp_path, how, stop_after):
    """Never a divergence, never a silent result: a warning naming the file, and the trials
    start again from step 0."""
    cfgs = [tiny_cfg(sae_type="gated", lr=lr, train={"tokens": 20_000}) for lr in (1e-3, 3e-3)]
    data = open_source(cfgs[0])
    ckpt = tmp_path / "pack.safetensors"
    train_pack(cfgs, data, show_progress=False, checkpoint=ckpt, should_stop=stop_after(10))
    ckpt.write_bytes(_corrupt_but_parseable(ckpt.read_bytes(), how))
    with pytest.warns(UserWarning, match=f"checkpoint {ckpt} is corrupt.*start from step 0"):
        again = train_pack(cfgs, data, show_progress=False, checkpoint=ckpt)
    assert again.resumed_from == 0 and [m.status for m in again.members] == ["complete", "complete"]


def test_exported_weights_that_do_not_match_their_checksum_are_refused(tiny_cfg):
    from saesweep.export import load_sae
    from saesweep.io import CorruptFile, verify_tensors

    (r,) = saesweep.run_pack([tiny_cfg(train={"tokens": 4096})])
    weights = r.run_dir / "sae_weights.safetensors"
    assert verify_tensors(weights) is None
    load_sae(r.run_dir)
    weights.write_bytes(_corrupt_but_parseable(weights.read_bytes(), "flipped bytes"))
    assert "checksum" in verify_tensors(weights)
    with pytest.raises(CorruptFile, match="sae_weights.safetensors"):
        load_sae(r.run_dir)


def test_the_checkpoint_interval_keeps_writes_near_one_percent_of_training(tiny_cfg, tmp_path, monkeypatch):
    """Writes that take 20 ms space checkpoints 2 s apart (20 ms is 1 % of 2 s); writes that take
    nothing come at the floor; neither comes later than the ceiling."""
    from saesweep.training import trainer

    cfgs = [tiny_cfg(train={"tokens": 400_000})]
    data = open_source(cfgs[0])
    clock = {"t": 0.0}
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock["t"])

    real, real_lr = trainer._save_checkpoint, trainer.lr_factor

    def run(write_s: float, floor: float, ceiling: float) -> list[float]:
        writes = []

        def timed_save(*a, **kw):
            writes.append(clock["t"])
            real(*a, **kw)
            clock["t"] += write_s

        def tick(*a, **kw):  # every step: 5 ms of training
            clock["t"] += 0.005
            return real_lr(*a, **kw)

        monkeypatch.setattr(trainer, "_save_checkpoint", timed_save)
        monkeypatch.setattr(trainer, "lr_factor", tick)
        train_pack(cfgs, data, show_progress=False, checkpoint=tmp_path / f"{write_s}.safetensors",
                   checkpoint_every_s=ceiling, checkpoint_min_s=floor)
        return [b - a for a, b in zip(writes, writes[1:])]

    spaced = run(0.02, floor=0.05, ceiling=10.0)
    assert spaced and all(1.9 <= g - 0.02 <= 2.2 for g in spaced), spaced
    quick = run(0.0, floor=0.05, ceiling=10.0)
    assert len(quick) > 5 * len(spaced) and all(g <= 0.1 for g in quick)
    slow = run(0.5, floor=0.05, ceiling=1.0)
    assert slow and all(g - 0.5 <= 1.1 for g in slow)


def test_schedules():
    class T:
        lr_warmup_frac, lr_decay, min_lr_factor, sparsity_warmup_frac = 0.1, "cosine", 0.1, 0.5

    assert lr_factor(0, 100, T) == pytest.approx(0.1)
    assert lr_factor(9, 100, T) == pytest.approx(1.0)
    assert lr_factor(10, 100, T) == pytest.approx(1.0)
    assert lr_factor(100, 100, T) == pytest.approx(0.1)
    T.lr_decay = "linear"
    assert lr_factor(55, 100, T) == pytest.approx(1 - 0.9 * 0.5)
    assert sparsity_factor(0, 100, T) == pytest.approx(1 / 50) and sparsity_factor(60, 100, T) == 1.0


def test_bfloat16_trains(tiny_cfg):
    r = saesweep.run(tiny_cfg(train={"dtype": "bfloat16", "tokens": 200_000}))
    assert r.ok and r.metrics["fvu"] < 0.3 and r.metrics["dtype"] == "bfloat16"


def test_recovery_comes_from_training_not_from_the_initialisation(tiny_cfg):
    # the ground-truth dictionary and the SAE's decoder are both seeded by 0 here: they must
    # still be different draws, or every decoder row matches a true feature before a single step
    cfg = tiny_cfg(source={"n_features": 24, "sparsity": 0.04})
    data = open_source(cfg)
    sae = build_sae([cfg], data.d_in, torch.device("cpu"))

    assert world_recovery(sae, data)[0]["decoder_frac_cos90"] < 0.2


def test_a_members_tokens_per_s_is_its_own_rate_and_the_pack_rate_is_named(tiny_cfg):
    cfgs = [tiny_cfg(sparsity_coeff=s, train={"tokens": 20_000}) for s in (0.03, 0.1, 0.3, 1.0)]
    results = saesweep.run_pack(cfgs)
    for r in results:
        m = r.metrics
        assert m["pack_size"] == 4
        assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["train_time_s"])
        assert m["pack_tokens_per_s"] == pytest.approx(4 * m["tokens_per_s"])
