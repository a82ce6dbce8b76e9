"""Sampled search (random / TPE / multi-objective) and pruning on the sweep store."""

from __future__ import annotations

import math
import threading

import pytest
from sweep_helpers import TINY_BASE

from saesweep.config.sweep import expand, parse_spec
from saesweep.sweep.search import ask_trials, intermediate_metric
from saesweep.sweep.store import SweepStore
from saesweep.sweep.worker import Worker, open_sweep, queue_trials

RANGES = {"lr": {"low": 1e-5, "high": 1e-1, "log": True}, "sparsity_coeff": {"low": 1e-3, "high": 1.0, "log": True},
          "dict_size_ratio": [2.0, 4.0, 8.0]}


def sampled_spec(tmp_path, method="tpe", n_trials=30, seed=0, name=None, grids=None, **fields):
    grids = grids or {"relu": RANGES}
    return parse_spec({"name": name or f"{method}-{seed}", "base": TINY_BASE, "sae_types": list(grids), "grids": grids,
                       "output_dir": str(tmp_path / "runs"),
                       "search": {"method": method, "n_trials": n_trials, "seed": seed, **fields.pop("search", {})},
                       **fields})


def quadratic(p: dict) -> float:
    """A known synthetic objective over the same spaces (minimum 0 at lr 1e-3, sparsity 0.03, ratio 4)."""
    return ((math.log10(p["lr"]) + 3) ** 2 + (math.log10(p["sparsity_coeff"]) + 1.5) ** 2
            + 0.3 * (math.log2(p["dict_size_ratio"]) - 2) ** 2)


def drive(store: SweepStore, spec, objective, worker="w", pack=4) -> list:
    """What a worker does, with ``objective`` in place of training: claim or ask, then complete."""
    done = []
    while True:
        claims = store.claim(worker, pack) or ask_trials(store, spec, worker, pack)
        if not claims:
            return done
        for c in claims:
            values = objective(c.params)
            metrics = values if isinstance(values, dict) else {spec.search.objectives[0]: values}
            assert store.complete(c, metrics, objectives=spec.search.objectives)
            done.append(c)


def best(store: SweepStore) -> float:
    return min(t.value for t in store.trials() if t.value is not None)


@pytest.mark.parametrize("method", ["random", "tpe"])
def test_budget_runs_exactly_n_distinct_trials(tmp_path, method):
    spec = sampled_spec(tmp_path, method, n_trials=13)
    store = open_sweep(spec)
    done = drive(store, spec, quadratic)
    assert len(done) == 13
    assert len({c.trial_id for c in done}) == 13
    assert store.counts()["complete"] == 13
    assert ask_trials(store, spec, "w", 4) == []  # the budget is spent
    for t in store.trials():  # recorded like queued trials: config, pack key, attempt, search space
        ua = t.user_attrs
        assert ua["attempt"] == 1 and ua["sae_type"] == "relu" and ua["config"]["lr"] == t.params["lr"]
        assert set(t.distributions) == set(RANGES)


def test_budget_holds_with_two_workers(tmp_path):
    spec = sampled_spec(tmp_path, "tpe", n_trials=17)
    open_sweep(spec)
    got: list = []

    def worker(k):
        s = SweepStore(spec.storage_url, spec.name, create=False)
        got.extend(drive(s, spec, quadratic, worker=f"w{k}", pack=3))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(got) == 17 and len({c.trial_id for c in got}) == 17
    assert SweepStore(spec.storage_url, spec.name, create=False).counts()["complete"] == 17


def test_budget_is_per_type_and_a_finite_space_stops_when_exhausted(tmp_path):
    grids = {"relu": RANGES, "gated": {"lr": [1e-3, 3e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1, 0.3],
                                       "aux_coeff": [0.1]}}
    spec = sampled_spec(tmp_path, "random", n_trials=6, grids=grids)
    store = open_sweep(spec)
    done = drive(store, spec, quadratic)
    by_type = {t: sum(1 for c in done if c.config.sae_type == t) for t in grids}
    assert by_type == {"relu": 6, "gated": 4}  # gated has only 4 distinct configs


def test_same_seed_same_trials(tmp_path):
    runs = []
    for folder in ("a", "b"):
        spec = sampled_spec(tmp_path / folder, "tpe", n_trials=14, seed=7)
        store = open_sweep(spec)
        runs.append([c.trial_id for c in drive(store, spec, quadratic)])
    assert runs[0] == runs[1]
    other = sampled_spec(tmp_path / "c", "tpe", n_trials=14, seed=8)
    assert [c.trial_id for c in drive(open_sweep(other), other, quadratic)] != runs[0]


def test_tpe_beats_random_on_a_synthetic_objective(tmp_path):
    """Same seeds, same budget: TPE finds a better point than random search on every seed."""
    results = {}
    for method in ("random", "tpe"):
        results[method] = []
        for seed in range(4):
            spec = sampled_spec(tmp_path, method, n_trials=30, seed=seed)
            store = open_sweep(spec)
            assert len(drive(store, spec, quadratic)) == 30
            results[method].append(best(store))
    rnd, tpe = results["random"], results["tpe"]
    assert all(t <= r + 1e-12 for t, r in zip(tpe, rnd)), results
    assert sum(tpe) < 0.5 * sum(rnd), results


def test_multi_objective_tpe_gives_a_pareto_set(tmp_path):
    spec = sampled_spec(tmp_path, "tpe", n_trials=20, search={"objectives": ["l0", "fvu"]})
    store = open_sweep(spec)
    assert [d.name.lower() for d in store.study.directions] == ["minimize", "minimize"]

    def two(p):  # sparser (higher coefficient) costs fidelity
        s = math.log10(p["sparsity_coeff"])
        return {"l0": 10 ** (-s), "fvu": 0.01 * 10 ** s + (math.log10(p["lr"]) + 3) ** 2}

    assert len(drive(store, spec, two)) == 20
    front = store.study.best_trials
    assert 2 <= len(front) <= 20
    for a in front:  # nothing in the sweep dominates a frontier trial
        for b in store.trials():
            assert not (b.values[0] <= a.values[0] and b.values[1] <= a.values[1] and b.values != a.values)


def test_intermediate_metric_follows_the_objective():
    assert intermediate_metric("fvu") == "mse"
    assert intermediate_metric("explained_variance") == "mse"
    assert intermediate_metric("l0") == "l0"


def test_median_pruner_stops_bad_trials(tmp_path):
    """A real (tiny) sweep: five good learning rates finish, the hopeless ones are pruned."""
    base = {**TINY_BASE, "train": {"tokens": 40 * 256, "batch_size": 256, "log_every": 4, "lr_warmup_frac": 0.0}}
    spec = parse_spec({"name": "p", "base": base, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"),
                       "grids": {"relu": {"lr": [3e-3, 4e-3, 5e-3, 6e-3, 8e-3, 1e-7, 2e-7], "dict_size_ratio": [2.0],
                                          "sparsity_coeff": [0.01]}},
                       "search": {"pruner": "median"}, "execution": {"pack_size": 1}})
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    Worker(store, spec.execution).run()
    states = {r.params["lr"]: r.state for r in store.records()}
    assert [states[lr] for lr in (3e-3, 4e-3, 5e-3, 6e-3, 8e-3)] == ["complete"] * 5
    assert states[1e-7] == states[2e-7] == "pruned", states
    pruned = [t for t in store.trials() if t.state.name == "PRUNED"]
    assert all(t.intermediate_values and max(t.intermediate_values) < 39 for t in pruned)
    assert all("pruned at step" in t.user_attrs["reason"] for t in pruned)


def test_asha_prunes_through_the_engine(tmp_path):
    base = {**TINY_BASE, "train": {"tokens": 40 * 256, "batch_size": 256, "log_every": 2, "lr_warmup_frac": 0.0}}
    spec = parse_spec({"name": "a", "base": base, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"),
                       "grids": {"relu": {"lr": [5e-3, 6e-3, 1e-7, 2e-7, 3e-7, 4e-7], "dict_size_ratio": [2.0],
                                          "sparsity_coeff": [0.01]}},
                       "search": {"pruner": "asha"}, "execution": {"pack_size": 1}})
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    Worker(store, spec.execution).run()
    states = {r.params["lr"]: r.state for r in store.records()}
    assert states[5e-3] == "complete"
    assert sum(1 for s in states.values() if s == "pruned") >= 3, states
    assert any(k.startswith("completed_rung") for t in store.trials() for k in t.system_attrs)


def test_sampled_sweep_through_the_cli(tmp_path):
    """`saesweep sweep` with a TPE spec trains exactly the budget per type."""
    from sweep_helpers import saesweep, write_spec

    path = write_spec(tmp_path, name="s", sae_types=["relu"],
                      grids={"relu": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "dict_size_ratio": [2.0, 4.0],
                                      "sparsity_coeff": [0.01, 0.1]}},
                      search={"method": "tpe", "n_trials": 5, "seed": 3}, execution={"pack_size": 4})
    out = saesweep("sweep", "--spec", path, cwd=tmp_path, check=True)
    assert "5 complete" in out.stdout
    store = SweepStore(str(tmp_path / "runs" / "s" / "sweep.journal"), "s", create=False)
    assert store.counts()["complete"] == 5
