"""The sweep report (Pareto frontier, importance, devices, trials), importance JSON, the dashboard."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from sweep_helpers import env, saesweep, write_spec

from saesweep.reporting.frontier import frontier_ids, pareto_mask
from saesweep.reporting.html import build_report
from saesweep.reporting.importance import param_importances
from saesweep.sweep.store import COMPLETE, FAIL, PRUNED, SweepStore

LR = CategoricalDistribution([1e-3, 3e-3, 1e-2])
SC = CategoricalDistribution([0.01, 0.03, 0.1, 0.3, 1.0])

# (trial id, sae_type, l0, fvu, ce_loss_score); the frontier is worked out by hand below
POINTS = [
    ("relu-A", "relu", 10, 0.30, 0.70),
    ("relu-B", "relu", 20, 0.10, 0.90),
    ("relu-C", "relu", 40, 0.05, 0.95),
    ("relu-D", "relu", 30, 0.20, 0.80),  # dominated by B (sparser and better)
    ("relu-E", "relu", 20, 0.12, 0.97),  # same L0 as B, worse FVU; best CE-recovered at L0 20
    ("gated-F", "gated", 15, 0.15, 0.85),
    ("gated-G", "gated", 50, 0.04, 0.96),
    ("gated-H", "gated", 12, 0.50, 0.60),  # dominated by A overall, but gated's sparsest
    ("gated-I", "gated", 60, 0.04, 0.99),  # same FVU as G at a higher L0
]
FRONTIER_FVU = ["relu-A", "gated-F", "relu-B", "relu-C", "gated-G"]
FRONTIER_FVU_BY_TYPE = {"relu": ["relu-A", "relu-B", "relu-C"], "gated": ["gated-H", "gated-F", "gated-G"]}
# L0 down, CE-recovered up: A(10,.70), F(15,.85), E(20,.97), I(60,.99)
FRONTIER_CE = ["relu-A", "gated-F", "relu-E", "gated-I"]


def add(store: SweepStore, tid: str, sae_type: str, metrics: dict, *, state=COMPLETE, params=None, device="cuda:0"):
    params = params or {"lr": 1e-3, "sparsity_coeff": 0.1}
    store.study.add_trial(optuna.trial.create_trial(
        state=state, values=[metrics["fvu"]] if state == COMPLETE else None, params=params,
        distributions={"lr": LR, "sparsity_coeff": SC},
        user_attrs={"trial_id": tid, "sae_type": sae_type, "attempt": 1, "metrics": metrics if state == COMPLETE else {},
                    "device": device, "run_dir": f"/runs/{tid}"}))


@pytest.fixture
def handmade(tmp_path) -> SweepStore:
    store = SweepStore(str(tmp_path / "hand" / "sweep.journal"), "hand", directions=["minimize"])
    store.set_info(objectives=["fvu"], spec={"search": {"method": "grid"}})
    for i, (tid, t, l0, fvu, ce) in enumerate(POINTS):
        add(store, tid, t, {"l0": l0, "fvu": fvu, "ce_loss_score": ce, "tokens_per_s": 1000.0 * (i + 1)},
            device="cuda:0" if i % 2 else "cuda:1")
    add(store, "relu-failed", "relu", {}, state=FAIL)
    add(store, "relu-pruned", "relu", {}, state=PRUNED)
    for k, (slot, done, tps) in enumerate([("cuda:0", 5, 250_000.0), ("cuda:1", 4, 180_000.0), ("cpu", 1, 9_000.0)]):
        store.set_info(**{f"worker:w{k}": {"slot": slot, "trials_done": done, "trials_failed": int(slot == "cpu"),
                                           "tokens": tps * 10, "busy_s": 10.0, "wall_s": 12.0}})
    return store


def test_pareto_mask_by_hand():
    pts = np.array([[1, 5], [2, 3], [2, 3], [3, 4], [4, 1], [np.nan, 0], [5, 1]])
    assert pareto_mask(pts, ["minimize", "minimize"]).tolist() == [True, True, True, False, True, False, False]
    assert pareto_mask(pts, ["minimize", "maximize"]).tolist() == [True, False, False, False, False, False, False]


def test_frontier_of_handmade_trials(handmade):
    from saesweep.reporting.table import results_table

    df = results_table(handmade)
    assert frontier_ids(df, "l0", "fvu") == FRONTIER_FVU
    assert frontier_ids(df, "l0", "fvu", by_type=True) == FRONTIER_FVU_BY_TYPE
    assert frontier_ids(df, "l0", "ce_loss_score") == FRONTIER_CE


def test_report_renders_with_the_frontier(handmade, tmp_path):
    rep = build_report(handmade, tmp_path / "report")
    f = rep.frontier["l0_fvu"]
    assert f["all"] == FRONTIER_FVU and f["by_type"] == FRONTIER_FVU_BY_TYPE
    assert rep.frontier["l0_ce_loss_score"]["all"] == FRONTIER_CE
    assert json.loads((tmp_path / "report" / "frontier.json").read_text())["l0_fvu"]["all"] == FRONTIER_FVU
    names = sorted(p.name for p in rep.pngs)
    assert names == ["devices.png", "frontier_l0_ce_loss_score.png", "frontier_l0_fvu.png", "importance.png"]
    for p in rep.pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    page = rep.html.read_text()
    # self-contained: the images are inside; importance, insufficient for every type, says why instead
    assert page.count("data:image/png;base64,") == 3
    assert "Not computed for any type" in page and "importance needs at least 8" in page
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # and nothing is fetched
    assert "<script>" in page and "sortable" in page
    for tid, *_ in POINTS:
        assert tid in page
    assert "relu-failed" in page and "pruned" in page
    assert page.count("class=\"front\"") == len(FRONTIER_FVU)  # frontier rows highlighted
    assert "cuda:1" in page and "250,000" in page  # per-device stats


def importance_store(tmp_path) -> SweepStore:
    """relu: fvu depends on sparsity_coeff strongly and on lr weakly; gated: too few trials."""
    store = SweepStore(str(tmp_path / "imp.journal"), "imp", directions=["minimize"])
    store.set_info(objectives=["fvu"])
    rng = np.random.default_rng(0)
    for lr in LR.choices:
        for sc in SC.choices:
            fvu = 0.5 - 0.1 * np.log10(sc) + 0.002 * np.log10(lr) + rng.normal(0, 1e-4)
            add(store, f"relu-{lr}-{sc}", "relu", {"fvu": float(fvu), "l0": 10 / sc},
                params={"lr": lr, "sparsity_coeff": sc})
    for i in range(3):
        add(store, f"gated-{i}", "gated", {"fvu": 0.1 * i, "l0": 5.0}, params={"lr": LR.choices[i], "sparsity_coeff": 0.1})
    return store


def test_report_of_an_empty_or_failed_sweep(tmp_path):
    store = SweepStore(str(tmp_path / "e" / "sweep.journal"), "e", directions=["minimize"])
    rep = build_report(store, tmp_path / "r1")
    assert rep.pngs == [] and rep.frontier == {} and "No trials" in rep.html.read_text()
    add(store, "relu-x", "relu", {}, state=FAIL)
    rep = build_report(store, tmp_path / "r2")
    assert rep.frontier == {} and rep.importance["by_type"]["relu"]["status"] == "insufficient"
    assert "relu-x" in rep.html.read_text()


@pytest.mark.parametrize("evaluator", ["ped-anova", "fanova"])
def test_importance_per_type_as_json(tmp_path, evaluator):
    if evaluator == "fanova":
        pytest.importorskip("sklearn")
    store = importance_store(tmp_path)
    imp = param_importances(store, "fvu", evaluator=evaluator)
    relu = imp["by_type"]["relu"]
    assert relu["status"] == "ok" and relu["n_trials"] == 15
    assert relu["importances"]["sparsity_coeff"] > relu["importances"]["lr"]
    assert sum(relu["importances"].values()) == pytest.approx(1.0)
    gated = imp["by_type"]["gated"]
    assert gated["status"] == "insufficient" and "at least 8" in gated["reason"]
    assert imp["metric"] == "fvu" and imp["evaluator"] == evaluator
    json.dumps(imp)  # plain JSON


def test_importance_needs_two_varying_parameters(tmp_path):
    store = SweepStore(str(tmp_path / "one.journal"), "one", directions=["minimize"])
    for i, sc in enumerate(SC.choices * 2):
        add(store, f"relu-{i}", "relu", {"fvu": sc, "l0": 1 / sc}, params={"lr": 1e-3, "sparsity_coeff": sc})
    r = param_importances(store, "fvu", evaluator="ped-anova")["by_type"]["relu"]
    assert r["status"] == "insufficient" and r["params"] == ["sparsity_coeff"] and "at least 2" in r["reason"]
    from saesweep.config.experiment import ConfigError

    with pytest.raises(ConfigError, match="--metric accuracy"):
        param_importances(store, "accuracy")


def test_report_and_importance_cli_on_a_real_sweep(tmp_path):
    grids = {"relu": {"lr": [1e-3, 3e-3], "dict_size_ratio": [2.0], "sparsity_coeff": [0.01, 0.1, 0.3]}}
    path = write_spec(tmp_path, name="rs", sae_types=["relu"], grids=grids, execution={"pack_size": 8})
    saesweep("sweep", "--spec", path, cwd=tmp_path, check=True)
    out = saesweep("report", "rs", cwd=tmp_path, check=True)
    folder = tmp_path / "runs" / "rs" / "report"
    assert "report.html" in out.stdout and (folder / "report.html").exists()
    for name in ("frontier_l0_fvu.png", "importance.png", "devices.png", "importance.json", "frontier.json"):
        assert (folder / name).exists(), name
    imp = json.loads((folder / "importance.json").read_text())
    assert imp["by_type"]["relu"]["status"] == "insufficient"  # 6 trials
    front = json.loads((folder / "frontier.json").read_text())["l0_fvu"]["all"]
    from saesweep.reporting.table import degenerate_trials, results_table

    flagged = {t for t, _ in degenerate_trials(results_table(SweepStore(str(tmp_path / "runs" / "rs" / "sweep.journal"),
                                                                        "rs", create=False)))}
    assert len(front) <= 6 and not set(front) & flagged  # degenerate SAEs are off the frontier
    saesweep("report", "rs", "--show_degenerate", cwd=tmp_path, check=True)
    front = json.loads((folder / "frontier.json").read_text())["l0_fvu"]["all"]
    assert 1 <= len(front) <= 6
    out = saesweep("importance", "rs", "--metric", "l0", "--evaluator", "ped-anova", cwd=tmp_path, check=True)
    assert json.loads(out.stdout)["metric"] == "l0"
    bad = saesweep("report", "rs", "--metric", "accuracy", cwd=tmp_path)
    assert bad.returncode == 2 and "--metric accuracy" in bad.stderr


def test_dashboard_serves_the_sweep_on_loopback(handmade, tmp_path):
    pytest.importorskip("optuna_dashboard")
    proc = subprocess.Popen([sys.executable, "-m", "saesweep", "dashboard", str(tmp_path / "hand"), "--port", "0"],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/dashboard/", line)
        assert m, line
        base = f"http://127.0.0.1:{m.group(1)}"
        deadline = time.time() + 30
        while True:
            try:
                page = urllib.request.urlopen(base + "/dashboard/", timeout=5).read().decode()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        assert "<html" in page.lower()
        studies = json.loads(urllib.request.urlopen(base + "/api/studies", timeout=10).read())
        assert [s["study_name"] for s in studies["study_summaries"]] == ["hand"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_degenerate_saes_are_named_in_the_summary_and_the_report(tmp_path):
    from saesweep.reporting.table import (
        degenerate_lines,
        degenerate_reason,
        results_table,
    )

    store = SweepStore(str(tmp_path / "deg" / "sweep.journal"), "deg", directions=["minimize"])
    store.set_info(objectives=["fvu"], spec={"search": {"method": "grid"}})
    shape = {"d_in": 64, "d_sae": 512}
    add(store, "relu-dense", "relu", {"l0": 300.0, "fvu": 0.01, "dead_fraction": 0.0, **shape})
    add(store, "relu-dead", "relu", {"l0": 5.0, "fvu": 0.3, "dead_fraction": 0.8, **shape})
    add(store, "relu-wide", "relu", {"l0": 70.0, "fvu": 0.05, "dead_fraction": 0.0, **shape})  # L0 > d_in
    add(store, "relu-good", "relu", {"l0": 8.0, "fvu": 0.1, "dead_fraction": 0.02, **shape})
    df = results_table(store)
    reasons = {r["trial_id"]: degenerate_reason(r) for _, r in df.iterrows()}
    assert reasons == {"relu-dense": "dense: L0 300 > half of 512 features", "relu-dead": "80% of features dead",
                       "relu-wide": "dense: L0 70 > d_in 64", "relu-good": ""}
    lines = degenerate_lines(df)
    assert lines[0].startswith("warning: 3 of 4 complete trials trained degenerate SAEs")
    assert {ln.split(":")[0].strip() for ln in lines[1:]} == {"relu-dense", "relu-dead", "relu-wide"}
    rep = build_report(store, tmp_path / "report")
    page = rep.html.read_text()
    assert 'id="degenerate"' in page and "3 complete trial(s) trained degenerate SAEs" in page
    assert "relu-dense" in page.split('id="degenerate"')[1].split("</div>")[0]
    # nothing to warn about: no block
    ok = SweepStore(str(tmp_path / "ok" / "sweep.journal"), "ok", directions=["minimize"])
    ok.set_info(objectives=["fvu"], spec={"search": {"method": "grid"}})
    add(ok, "relu-good", "relu", {"l0": 8.0, "fvu": 0.1, "dead_fraction": 0.02, **shape})
    assert degenerate_lines(results_table(ok)) == []
    assert 'id="degenerate"' not in build_report(ok, tmp_path / "report-ok").html.read_text()


def test_text_from_the_store_is_escaped_in_the_page(handmade, tmp_path):
    """A title, a failure reason or a device name is text, never markup."""
    hostile = "<img src=x onerror=alert(1)>"
    handmade.study.add_trial(optuna.trial.create_trial(
        state=FAIL, params={"lr": 1e-3, "sparsity_coeff": 0.1}, distributions={"lr": LR, "sparsity_coeff": SC},
        user_attrs={"trial_id": "relu-bad", "sae_type": "relu", "attempt": 1, "metrics": {}, "device": hostile,
                    "reason": hostile, "run_dir": "/runs/relu-bad"}))
    page = build_report(handmade, tmp_path / "report", title=f"t {hostile}").html.read_text()
    assert hostile not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<title>saesweep report: t &lt;img" in page
