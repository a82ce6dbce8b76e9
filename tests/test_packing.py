"""Packing: which trials train together, what one claim takes, and a change of the packing rule
regrouping the queue without a failed attempt."""

from __future__ import annotations

import pytest
from sweep_helpers import TINY_BASE

from saesweep import packing
from saesweep.config.experiment import parse_config
from saesweep.config.sweep import expand, parse_spec
from saesweep.sweep.store import SweepStore
from saesweep.sweep.worker import queue_trials


def spec_of(tmp_path, lrs=(1e-3, 2e-3, 3e-3, 4e-3)):
    return parse_spec({"name": "pk", "base": TINY_BASE, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"),
                       "grids": {"relu": {"lr": list(lrs), "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}}})


def test_members_may_differ_in_per_member_fields_only():
    a = parse_config({"sae_type": "hard_concrete", "lr": 1e-3, "initial_beta": 0.5})
    b = parse_config({"sae_type": "hard_concrete", "lr": 3e-3, "initial_beta": 1.0, "sparsity_coeff": 0.3})
    c = parse_config({"sae_type": "hard_concrete", "input_dependent_gates": False})  # per_member=False
    d = parse_config({"sae_type": "hard_concrete", "dict_size_ratio": 8.0})
    assert packing.pack_key(a) == packing.pack_key(b)
    assert len({packing.pack_key(x) for x in (a, c, d)}) == 3
    assert "initial_beta" in packing.per_member_fields(a) and "input_dependent_gates" not in packing.per_member_fields(a)
    packing.check_pack([a, b])
    with pytest.raises(ValueError, match="share everything but lr, sparsity_coeff"):
        packing.check_pack([a, d])
    assert list(packing.groups([a, c, b])) == [packing.pack_key(a), packing.pack_key(c)]


def test_a_claim_takes_resuming_trials_first_then_a_share_of_the_first_group():
    key = {"a1": "A", "a2": "A", "a3": "A", "a4": "A", "b1": "B", "r1": "A", "r2": "A"}
    ckpt = {"r1": "x.safetensors", "r2": "x.safetensors"}
    choose = lambda queue, n, share=1: packing.choose_claim(queue, key.get, ckpt.get, n, share)  # noqa: E731
    assert choose(["a1", "b1", "r1", "a2", "r2"], 4) == ["r1", "r2"]
    assert choose(["b1", "a1", "a2"], 4) == ["b1"]
    assert choose(["a1", "b1", "a2", "a3", "a4"], 3) == ["a1", "a2", "a3"]
    assert choose(["a1", "a2", "a3", "a4"], 4, share=2) == ["a1", "a2"]
    assert choose([], 4) == []


def test_the_checkpoint_name_is_the_members_not_their_order():
    assert packing.checkpoint_name(["t2", "t1"]) == packing.checkpoint_name(["t1", "t2"])
    assert packing.checkpoint_name(["t1"]) != packing.checkpoint_name(["t1", "t2"])
    assert packing.checkpoint_name(["t1"]).endswith(".safetensors")


@pytest.mark.parametrize("rule", ["old", "current"])
def test_trials_queued_under_another_rule_are_regrouped_when_claimed(tmp_path, monkeypatch, rule):
    """Four trials that differ only in lr, queued with four different stored keys: under an older
    rule the keys are derived again at the claim and one claim takes all four; under the current
    rule the stored keys are trusted (so this test can tell the two apart)."""
    spec = spec_of(tmp_path)
    store = SweepStore(spec.storage_url, spec.name)
    stored_rule = packing.PACK_RULE - 1 if rule == "old" else packing.PACK_RULE
    monkeypatch.setattr(packing, "stored_attrs", lambda cfg: {"pack_key": f"relu-{cfg.lr}", "pack_rule": stored_rule})
    queue_trials(store, spec, expand(spec))
    monkeypatch.undo()
    claims = store.claim("w", max_members=4)
    assert len(claims) == (4 if rule == "old" else 1)
    assert store.counts()["failed"] == 0


def test_a_trial_queued_before_keys_had_a_rule_is_claimed_by_its_config(tmp_path, monkeypatch):
    spec = spec_of(tmp_path, lrs=(1e-3, 2e-3))
    store = SweepStore(spec.storage_url, spec.name)
    monkeypatch.setattr(packing, "stored_attrs", lambda cfg: {"pack_key": f"stale-{cfg.lr}"})
    queue_trials(store, spec, expand(spec))
    monkeypatch.undo()
    assert all("pack_rule" not in t.user_attrs for t in store.trials())
    assert len(store.claim("w", max_members=4)) == 2
