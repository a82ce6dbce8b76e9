"""The metric registry names what trials really report, and everything reads it from there."""

import pytest

from saesweep.config.experiment import ConfigError
from saesweep.config.sweep import parse_spec
from saesweep import metric_registry as registry
from saesweep.training.run import run


def test_every_registered_metric_is_computed_where_it_says(tmp_path):
    # trained to a target L0, so that the target metrics (target_l0, l0_error...) are there too
    r = run({"sae_type": "relu", "target_l0": 4, "source": {"kind": "synthetic", "d_in": 8, "n_features": 16},
             "train": {"tokens": 2048, "batch_size": 256}, "eval": {"tokens": 1024}, "output_dir": str(tmp_path)},
            show_progress=False)
    for name, m in registry.METRICS.items():
        # LM sources only (tests/metrics/test_downstream.py); thresholded TopK types only (tests/saes/test_batchtopk.py)
        if m.computed_in not in ("saesweep.metrics.downstream", "saesweep.saes.batchtopk"):
            assert name in r.metrics, f"{name} is registered as computed in {m.computed_in} but no trial has it"
    unregistered = set(r.metrics) - set(registry.METRICS)
    assert not unregistered, f"computed but not registered in metric_registry.py: {sorted(unregistered)}"


def test_an_objective_names_the_training_value_pruning_follows():
    for m in registry.METRICS.values():
        assert (m.intermediate in registry.TRAIN_LOG_VALUES) == (m.direction is not None), m.name
    with pytest.raises(ValueError, match="'new_score' is an objective: its intermediate must be one of"):
        registry.Metric("new_score", "maximize", "a score", "somewhere")


def test_objectives_come_from_the_registry():
    assert registry.direction("ce_loss_score") == "maximize" and registry.direction("l0") == "minimize"
    with pytest.raises(ValueError, match="choose from"):
        registry.direction("tokens_per_s")  # a run statistic, not an objective
    spec = parse_spec({"name": "s", "search": {"method": "random", "n_trials": 2, "objectives": ["kl_div_score"]}})
    assert spec.search.directions == ["maximize"]
    with pytest.raises(ConfigError, match="search.objectives.*unknown metric 'bogus'"):
        parse_spec({"name": "s", "search": {"objectives": ["bogus"]}})
