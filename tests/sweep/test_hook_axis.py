"""Layers as a sweep axis: ``source.hook`` in a grid expands into per-hook trials and packs, the
activations of every hook come from one pass of the language model, and the frontier is drawn
per type and hook."""

from __future__ import annotations

import pytest
import yaml

from saesweep.packing import pack_key
from saesweep.config.experiment import ConfigError
from saesweep.config.sweep import expand, parse_spec
from saesweep.data import lm

HOOKS = ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]


def hf_base(tiny_lm, tiny_text_jsonl, tmp_path) -> dict:
    return {
        "dict_size_ratio": 2,
        "source": {"kind": "hf", "model": str(tiny_lm), "dataset": str(tiny_text_jsonl), "context_length": 16,
                   "hook": HOOKS[0], "eval_split": None, "lm_batch_size": 8},
        "train": {"tokens": 2000, "batch_size": 64, "dtype": "float32"},
        "eval": {"tokens": 300, "ce_tokens": 200},
        "cache_dir": str(tmp_path / "cache"),
    }


def test_a_hook_axis_expands_into_per_hook_trials_and_packs(tiny_lm, tiny_text_jsonl, tmp_path):
    spec = parse_spec({"base": hf_base(tiny_lm, tiny_text_jsonl, tmp_path), "sae_types": ["relu"],
                       "grids": {"relu": {"source.hook": HOOKS, "sparsity_coeff": [0.1, 0.3]}},
                       "output_dir": str(tmp_path / "runs")})
    configs = expand(spec)
    assert [c.source.hook for c in configs] == [HOOKS[0], HOOKS[0], HOOKS[1], HOOKS[1]]
    assert len({c.trial_id for c in configs}) == 4
    # members of a pack share a hook: two packs of two
    assert len({pack_key(c) for c in configs}) == 2
    assert {pack_key(c) for c in configs[:2]} != {pack_key(c) for c in configs[2:]}
    assert spec.hooks() == HOOKS


@pytest.mark.parametrize("grid,message", [
    ({"source.hook": ["blocks.1.attn"]}, "source.hook"),
    ({"sourc.hook": [HOOKS[0]]}, "grids.relu.sourc.hook: not a parameter of relu"),
])
def test_a_bad_hook_axis_is_refused_by_name(grid, message, tiny_lm, tiny_text_jsonl, tmp_path):
    with pytest.raises(ConfigError, match=message):
        parse_spec({"base": hf_base(tiny_lm, tiny_text_jsonl, tmp_path), "sae_types": ["relu"], "grids": {"relu": grid}})


def test_a_two_hook_sweep_runs_the_language_model_over_the_data_once(tiny_lm, tiny_text_jsonl, tmp_path, monkeypatch,
                                                                      capsys):
    from saesweep.cli.app import main
    from saesweep.reporting.table import results_table
    from saesweep.sweep.store import SweepStore

    passes: list[tuple[int, tuple]] = []  # (rows, layers) of every forward pass that captures activations
    real = lm.HookedLM.capture_layers

    def counting(self, ids, layers):
        passes.append((ids.shape[0], tuple(sorted(set(layers)))))
        return real(self, ids, layers)

    monkeypatch.setattr(lm.HookedLM, "capture_layers", counting)
    spec = {"name": "layers", "base": hf_base(tiny_lm, tiny_text_jsonl, tmp_path), "sae_types": ["relu"],
            "grids": {"relu": {"source.hook": HOOKS, "sparsity_coeff": [0.1, 0.3]}},
            "output_dir": str(tmp_path / "runs"), "execution": {"max_parallel": 1, "devices": "cpu"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", "--spec", str(path)]) == 0
    out = capsys.readouterr().out

    # one pass over the held-out and training rows, capturing both layers at once
    cfg = expand(parse_spec(spec))[0]
    train_rows, heldout_rows = lm.needed_rows(cfg)
    assert sum(n for n, _ in passes) == train_rows + heldout_rows
    assert {layers for _, layers in passes} == {(0, 2)}

    store = SweepStore(str(tmp_path / "runs" / "layers" / "sweep.journal"), "layers", create=False)
    df = results_table(store)
    assert (df["state"] == "complete").all() and len(df) == 4
    assert set(df["series"]) == {f"relu @ {h}" for h in HOOKS}
    assert f"relu @ {HOOKS[0]}" in out and f"relu @ {HOOKS[1]}" in out  # the end-of-sweep frontier
    # the two hooks' activations differ (the pass did not write one layer twice)
    assert df.groupby("series")["fvu"].mean().nunique() == 2

    # the report draws a frontier per hook: the overall one never compares across layers
    from saesweep.reporting.frontier import frontier_ids
    from saesweep.reporting.html import build_report

    rep = build_report(store, tmp_path / "report")
    assert set(rep.frontier["l0_fvu"]["by_type"]) == {f"relu @ {h}" for h in HOOKS}
    per_hook = {h: frontier_ids(df[df["source.hook"] == h], "l0", "fvu") for h in HOOKS}
    assert rep.frontier["l0_fvu"]["all"] == per_hook[HOOKS[0]] + per_hook[HOOKS[1]]
