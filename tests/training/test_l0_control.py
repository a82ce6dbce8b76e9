"""target_l0: the controller reaches its target, per member, across a resume; bad targets refused."""

import json
import math

import pytest
import torch

from saesweep.packing import pack_key
import saesweep
from saesweep.config.experiment import ConfigError, parse_config
from saesweep.data import open_source
from saesweep.training.l0_control import KI, KP, QUAD_HIGH, QUAD_LOW, L0Controller
from saesweep.training.trainer import train_pack


def _target_cfg(tiny_cfg, target, **kw):
    cfg = tiny_cfg(**kw).to_dict()
    cfg.pop("sparsity_coeff", None)
    cfg.pop("k", None)
    return parse_config({**cfg, "target_l0": target})


def test_one_pi_step_moves_log_c_by_the_gains_times_the_root_of_the_lr_factor():
    ctl = L0Controller([4.0, None], total_steps=100, warmup_frac=0.0, hold_frac=0.2, device=torch.device("cpu"))
    coeff = torch.tensor([0.1, 0.3])
    ctl.update(coeff, torch.tensor([8.0, 50.0]), lr_factor=1.0, step=0)  # first measurement: no derivative yet
    assert coeff[0].item() == pytest.approx(0.1 * math.exp(KI * math.log(2)), rel=1e-5)
    assert coeff[1].item() == pytest.approx(0.3)  # no target: untouched
    ctl.update(coeff, torch.tensor([8.0, 50.0]), lr_factor=0.25, step=5)  # the EMA is still log 8
    assert coeff[0].item() == pytest.approx(0.1 * math.exp(1.5 * KI * math.log(2)), rel=1e-5)
    assert ctl.due(0) and not ctl.due(1) and not ctl.due(80)  # the last 20 % holds the coefficient


def test_the_pi_rule_waits_while_the_l0_is_on_its_way_to_the_target():
    ctl = L0Controller([4.0], total_steps=100, warmup_frac=0.0, hold_frac=0.2, device=torch.device("cpu"))
    coeff = torch.tensor([0.1])
    ctl.update(coeff, torch.tensor([8.0]), lr_factor=1.0, step=0)
    c1 = coeff.item()
    # the L0 falls towards 4, fast enough to get there in the 14 measurements left: no push
    ctl.update(coeff, torch.tensor([2.0]), lr_factor=1.0, step=10)
    assert coeff.item() == pytest.approx(c1)
    # the same fall with one measurement left would not arrive in time: the PI step applies
    late = L0Controller([4.0], total_steps=100, warmup_frac=0.0, hold_frac=0.2, device=torch.device("cpu"))
    coeff = torch.tensor([0.1])
    late.update(coeff, torch.tensor([8.0]), lr_factor=1.0, step=0)
    late.update(coeff, torch.tensor([6.0]), lr_factor=1.0, step=78)
    ema = math.log(8) + 0.3 * (math.log(6) - math.log(8))
    err, prev = ema - math.log(4), math.log(2)
    assert coeff.item() == pytest.approx(c1 * math.exp(KI * err + KP * (err - prev)), rel=1e-5)


def test_the_quadratic_rule_sets_the_penalty_gradient_within_its_bounds():
    ctl = L0Controller([10.0, 10.0, 10.0, None], total_steps=100, warmup_frac=0.0, hold_frac=0.2,
                       device=torch.device("cpu"), rule="quadratic", stiffness=[0.5, 0.5, 0.5, 0.5])
    coeff = torch.tensor([0.5, 0.5, 0.5, 0.2])
    ctl.update(coeff, torch.tensor([12.0, 9.0, 1000.0, 3.0]), lr_factor=0.5, step=0)
    pull = torch.tensor([2 * (1.2 - 1), 2 * (0.9 - 1), QUAD_HIGH])  # far above: the push stops growing
    assert coeff[:3].tolist() == pytest.approx((0.5 * pull).tolist(), rel=1e-5)
    assert coeff[3].item() == pytest.approx(0.2)  # no target: untouched
    ctl.update(coeff, torch.tensor([0.0, 10.0, 12.0, 3.0]), lr_factor=1.0, step=5)
    # the rule has no memory: the same L0 gives the same coefficient
    assert coeff[:3].tolist() == pytest.approx([0.5 * QUAD_LOW, 0.0, 0.5 * 0.4], abs=1e-6)
    assert coeff[0].item() < 0  # far below the target: negative, reopening latents
    assert ctl.due(95)  # the quadratic penalty is stationary by itself: no hold


@pytest.mark.parametrize("sae_type", ["jumprelu", "gated_hard_concrete"])
def test_the_quadratic_rule_reaches_each_members_target(tiny_cfg, sae_type):
    # the synthetic world's reconstruction pulls harder than real activations': a stiffer
    # penalty than the default keeps the quadratic rule's offset small
    targets = (3.0, 8.0)
    cfgs = [_target_cfg(tiny_cfg, t, sae_type=sae_type, train={"tokens": 300_000}).with_updates(initial_coeff=1.0)
            for t in targets]
    for t, r in zip(targets, saesweep.run_pack(cfgs)):
        assert r.ok, r.reason
        assert abs(r.metrics["l0_error"]) < 0.2, (t, r.metrics["l0"])


@pytest.mark.parametrize("sae_type", ["relu", "gated", "hard_concrete"])
def test_the_controller_reaches_each_members_target_on_the_synthetic_source(tiny_cfg, sae_type):
    # a pack of two members with different targets, each steering its own coefficient
    targets = (3.0, 8.0)
    cfgs = [_target_cfg(tiny_cfg, t, sae_type=sae_type, train={"tokens": 300_000}) for t in targets]
    if sae_type == "hard_concrete":  # its default start suits real activations, 100x below this world's
        cfgs = [c.with_updates(initial_coeff=0.1) for c in cfgs]
    results = saesweep.run_pack(cfgs)
    for t, r in zip(targets, results):
        assert r.ok, r.reason
        m = r.metrics
        assert m["target_l0"] == t and m["l0_error"] == pytest.approx(m["l0"] / t - 1)
        assert abs(m["l0_error"]) < 0.15, (t, m["l0"])
        log = [json.loads(line) for line in (r.run_dir / "train_log.jsonl").read_text().splitlines()]
        traj = [rec["sparsity_coeff"] for rec in log]
        assert m["final_sparsity_coeff"] == pytest.approx(traj[-1])
        assert len(set(traj)) > 3  # the coefficient moved ...
        held = [rec["sparsity_coeff"] for rec in log if rec["step"] >= 0.8 * log[-1]["step"] + 1]
        assert len(set(held)) == 1  # ... and stayed put for the final part
    c3, c8 = (r.metrics["final_sparsity_coeff"] for r in results)
    assert c3 > c8  # the sparser target needed the larger coefficient


def test_a_member_without_a_target_keeps_its_coefficient(tiny_cfg):
    fixed = tiny_cfg(sparsity_coeff=0.1, train={"tokens": 60_000})
    steered = _target_cfg(tiny_cfg, 4.0, train={"tokens": 60_000})
    data = open_source(fixed)
    res = train_pack([fixed, steered], data, show_progress=False)
    assert res.sae.sparsity_coeff[0].item() == pytest.approx(0.1)
    assert res.sae.sparsity_coeff[1].item() != pytest.approx(0.1)
    assert "sparsity_coeff" not in res.members[0].log[-1] and "sparsity_coeff" in res.members[1].log[-1]


@pytest.mark.parametrize("sae_type", ["relu", "jumprelu"])  # one per rule
def test_resume_keeps_the_controllers_state(tiny_cfg, tmp_path, sae_type, stop_after):
    cfgs = [_target_cfg(tiny_cfg, t, sae_type=sae_type, train={"tokens": 60_000}) for t in (3.0, 6.0)]
    data = open_source(cfgs[0])
    full = train_pack(cfgs, data, show_progress=False)
    ckpt = tmp_path / "pack.safetensors"
    part = train_pack(cfgs, data, show_progress=False, checkpoint=ckpt, should_stop=stop_after(40))
    assert part.steps == 40
    resumed = train_pack(cfgs[1:], data, show_progress=False, checkpoint=ckpt)  # member 1 alone
    assert resumed.resumed_from == 40
    # the coefficient, its moving average and the weights continue as if never interrupted
    assert resumed.sae.sparsity_coeff[0].item() == pytest.approx(full.sae.sparsity_coeff[1].item(), rel=1e-5)
    assert [r["sparsity_coeff"] for r in resumed.members[0].log] == pytest.approx(
        [r["sparsity_coeff"] for r in full.members[1].log], rel=1e-5)
    torch.testing.assert_close(resumed.sae.W_enc[0], full.sae.W_enc[1], rtol=1e-5, atol=1e-6)


def test_topk_types_take_k_from_the_target(tiny_cfg):
    for t in ("topk", "batchtopk", "matryoshka"):
        cfg = _target_cfg(tiny_cfg, 6.4, sae_type=t)
        assert cfg.k == 6 and cfg.target_l0 == 6.4 and not cfg.steers_coeff
        assert parse_config(cfg.to_dict()) == cfg  # as a stored trial is read back


@pytest.mark.parametrize("bad, field", [
    ({"sparsity_coeff": 0.1, "target_l0": 8}, "'sparsity_coeff' and 'target_l0'"),
    ({"sae_type": "topk", "k": 8, "target_l0": 8}, "'k' and 'target_l0'"),
    ({"target_l0": 0.5}, "target_l0: 0.5 is below 1"),
    ({"target_l0": 2000}, "target_l0: 2000 is above the dictionary size 1024"),
    ({"initial_coeff": 0.1}, "'initial_coeff'"),
])
def test_conflicting_or_unreachable_targets_are_refused_by_name(bad, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        parse_config(bad)


def test_target_fields_leave_the_ids_of_other_trials_alone():
    plain = parse_config({})
    assert "target_l0" not in plain.to_dict() and "target_l0_hold_frac" not in plain.to_dict()["train"]
    assert parse_config({"target_l0": 16}).trial_id != parse_config({"target_l0": 32}).trial_id
    assert pack_key(parse_config({"target_l0": 16})) == pack_key(parse_config({"target_l0": 32}))


def test_a_frontier_search_spreads_targets_over_the_l0_range():
    from saesweep.config.sweep import expand, parse_spec

    spec = parse_spec({"sae_types": ["relu", "topk"], "search": {"method": "frontier", "n_trials": 3, "l0_range": [4, 64]},
                       "grids": {"relu": {"lr": [1e-3]}, "topk": {"lr": [1e-3], "k": [8]}}})
    cfgs = expand(spec)
    assert [c.target_l0 for c in cfgs] == [4.0, 16.0, 64.0] * 2
    assert [c.k for c in cfgs if c.sae_type == "topk"] == [4, 16, 64]
    with pytest.raises(ConfigError, match="l0_range"):
        parse_spec({"search": {"method": "grid", "l0_range": [4, 64]}})


def test_a_grid_may_sweep_the_controllers_start_with_its_targets():
    from saesweep.config.sweep import expand, parse_spec

    spec = parse_spec({"sae_types": ["jumprelu"],
                       "grids": {"jumprelu": {"target_l0": [8, 16], "initial_coeff": [0.3, 1.0]}}})
    assert sorted((c.target_l0, c.initial_coeff) for c in expand(spec)) == [(8, 0.3), (8, 1.0), (16, 0.3), (16, 1.0)]
    with pytest.raises(ConfigError, match="initial_coeff"):  # without a target it means nothing
        parse_spec({"sae_types": ["jumprelu"], "grids": {"jumprelu": {"initial_coeff": [0.3]}}})


def test_the_summary_lists_every_type_per_target_and_names_a_missed_target():
    import pandas as pd

    from saesweep.reporting.matched import matched_lines, missed_lines

    df = pd.DataFrame([
        {"trial_id": "relu-a", "sae_type": "relu", "state": "complete", "target_l0": 8.0, "l0": 8.2, "fvu": 0.10},
        {"trial_id": "gated-a", "sae_type": "gated", "state": "complete", "target_l0": 8.0, "l0": 6.5, "fvu": 0.05},
        {"trial_id": "relu-b", "sae_type": "relu", "state": "complete", "target_l0": 16.0, "l0": 16.1, "fvu": 0.06},
    ]).assign(l0_error=lambda d: d["l0"] / d["target_l0"] - 1)
    text = "\n".join(matched_lines(df))
    assert text.index("L0 8") < text.index("gated") < text.index("relu") < text.index("L0 16")
    assert text.count("<- best") == 2
    missed = "\n".join(missed_lines(df))
    assert "gated-a" in missed and "relu-a" not in missed and "-19%" in missed
