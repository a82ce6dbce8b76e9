"""The report in a real browser (headless Chromium, through the DevTools protocol): its plots
load, a click on a column header sorts the trials table, and a degenerate-SAE warning shows.
Marked ``browser``; CI installs Debian's chromium, and there a missing browser is a failure."""

import os

import optuna
import pytest
from cdp import Browser, find_chromium
from optuna.distributions import CategoricalDistribution

from saesweep.reporting.html import build_report
from saesweep.sweep.store import COMPLETE, SweepStore

pytestmark = pytest.mark.browser

SHAPE = {"d_in": 64, "d_sae": 512}
TRIALS = [  # (trial id, l0, fvu, dead fraction): one dense, one mostly dead, three fine
    ("relu-dense", 300.0, 0.01, 0.0),
    ("relu-dead", 5.0, 0.30, 0.8),
    ("relu-b", 8.0, 0.10, 0.02),
    ("relu-c", 20.0, 0.06, 0.01),
    ("relu-d", 12.0, 0.08, 0.0),
]


@pytest.fixture
def chromium():
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium for the browser test (.ci/run installs it)")
        pytest.skip("no chromium on this machine")
    return binary


def report(tmp_path):
    store = SweepStore(str(tmp_path / "b" / "sweep.journal"), "b", directions=["minimize"])
    store.set_info(objectives=["fvu"], spec={"search": {"method": "grid"}})
    lr = CategoricalDistribution([1e-3, 3e-3])
    for i, (tid, l0, fvu, dead) in enumerate(TRIALS):
        store.study.add_trial(optuna.trial.create_trial(
            state=COMPLETE, values=[fvu], params={"lr": [1e-3, 3e-3][i % 2]}, distributions={"lr": lr},
            user_attrs={"trial_id": tid, "sae_type": "relu", "attempt": 1, "device": "cpu", "run_dir": f"/runs/{tid}",
                        "metrics": {"l0": l0, "fvu": fvu, "dead_fraction": dead, "tokens_per_s": 1000.0 + i, **SHAPE}}))
    return build_report(store, tmp_path / "report").html


def test_report_in_a_real_browser(chromium, tmp_path):
    page = report(tmp_path)
    b = Browser(chromium, tmp_path / "profile")
    try:
        s = b.open(page.resolve().as_uri())
        images = b.eval(s, "[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        assert len(images) >= 2 and all(images), images  # every plot decoded
        warning = b.eval(s, "(() => {const e = document.getElementById('degenerate');"
                            " return e && e.offsetParent !== null && e.getBoundingClientRect().height > 0"
                            " ? e.innerText : null})()")
        assert warning and "degenerate" in warning and "relu-dense" in warning and "relu-dead" in warning
        column = """(() => {
            const th = [...document.querySelectorAll('#trials table.sortable th')].find(h => h.textContent.trim() === 'l0');
            const table = th.closest('table'), idx = [...th.parentNode.children].indexOf(th);
            return [...table.tBodies[0].rows].map(r => parseFloat(r.cells[idx].textContent));
        })()"""
        click = ("[...document.querySelectorAll('#trials table.sortable th')].find(h => h.textContent.trim() === 'l0')"
                 ".click()")
        before = b.eval(s, column)
        assert sorted(before) == sorted(t[1] for t in TRIALS)
        b.eval(s, click)
        assert b.eval(s, column) == sorted(before)
        b.eval(s, click)
        assert b.eval(s, column) == sorted(before, reverse=True)
    finally:
        b.close()


def matched_report(tmp_path):
    """The report of examples/matched-l0.yaml's trials (every registered type at each target),
    with metrics made up: the relu trial at L0 8 missed its target."""
    from saesweep.config.sweep import expand, load_spec

    from pathlib import Path

    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "matched-l0.yaml")
    store = SweepStore(str(tmp_path / "m" / "sweep.journal"), "m", directions=["minimize"])
    store.set_info(objectives=["fvu"], spec={"search": {"method": "grid"}})
    dist = CategoricalDistribution([8.0, 16.0, 32.0])
    for i, cfg in enumerate(expand(spec)):
        t = cfg.target_l0
        l0 = 6.0 if (cfg.sae_type, t) == ("relu", 8.0) else t * (1 + 0.01 * (i % 3))
        fvu = 0.3 / t + 0.001 * i
        store.study.add_trial(optuna.trial.create_trial(
            state=COMPLETE, values=[fvu], params={"target_l0": t}, distributions={"target_l0": dist},
            user_attrs={"trial_id": cfg.trial_id, "sae_type": cfg.sae_type, "attempt": 1, "device": "cpu",
                        "run_dir": f"/runs/{cfg.trial_id}",
                        "metrics": {"l0": l0, "fvu": fvu, "dead_fraction": 0.0, "target_l0": t,
                                    "l0_error": l0 / t - 1, **SHAPE}}))
    return build_report(store, tmp_path / "report").html, len(spec.sae_types)


def test_the_matched_l0_example_report_in_a_real_browser(chromium, tmp_path):
    page, n_types = matched_report(tmp_path)
    b = Browser(chromium, tmp_path / "profile")
    try:
        s = b.open(page.resolve().as_uri())
        table = b.eval(s, """(() => {const h = document.getElementById('matched'); if (!h) return null;
            let e = h.nextElementSibling; while (e && e.tagName !== 'TABLE') e = e.nextElementSibling;
            return e && e.offsetParent !== null ? [...e.tBodies[0].rows].map(r => [r.cells[0].innerText,
                r.cells[1].innerText, r.className]) : null})()""")
        assert table is not None and len(table) == 3 * n_types
        assert {r[0] for r in table} == {"8", "16", "32"}
        assert sum(r[2] == "front" for r in table) == 3  # the best per target highlighted
        first_at_32 = next(r for r in table if r[0] == "32")
        assert first_at_32[2] == "front" and "relu" in first_at_32[1]  # lowest FVU at 32 (made up: relu's)
        missed = b.eval(s, "(() => {const e = document.getElementById('missed'); return e ? e.innerText : null})()")
        assert missed and "target 8" in missed and "-25%" in missed
        images = b.eval(s, "[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        assert all(images)
    finally:
        b.close()


def test_report_fits_1280_px_and_starts_with_a_pick(chromium, tmp_path):
    """At 1280 px nothing is cut off: the page does not overflow sideways, and a table wider than
    its place scrolls inside it. The pick names a non-degenerate trial."""
    store = SweepStore(str(tmp_path / "w" / "sweep.journal"), "w", directions=["minimize"])
    store.set_info(objectives=["fvu"], spec={"search": {"method": "grid"}})
    lr = CategoricalDistribution([1e-3, 3e-3])
    many = {f"extra_metric_{i}": 0.5 + i for i in range(12)}  # a wide trials table
    for i, (tid, l0, fvu, dead) in enumerate(TRIALS):
        store.study.add_trial(optuna.trial.create_trial(
            state=COMPLETE, values=[fvu], params={"lr": [1e-3, 3e-3][i % 2]}, distributions={"lr": lr},
            user_attrs={"trial_id": tid, "sae_type": "relu", "attempt": 1, "device": "cpu", "run_dir": f"/runs/{tid}",
                        "reason": "x" * 3000,
                        "metrics": {"l0": l0, "fvu": fvu, "dead_fraction": dead, "cossim": 0.9, "l2_ratio": 1.0,
                                    "explained_variance": 1 - fvu, "mse": fvu, "l1": 3.0, **many, **SHAPE}}))
    page = build_report(store, tmp_path / "report").html
    b = Browser(chromium, tmp_path / "profile")
    try:
        s = b.open(page.resolve().as_uri())
        b.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                      "mobile": False}, session=s)
        assert b.eval(s, "window.innerWidth") == 1280
        assert b.eval(s, "document.documentElement.scrollWidth") <= 1280  # no sideways page overflow
        cut = b.eval(s, """[...document.querySelectorAll('table')].filter(t => {
            const r = t.getBoundingClientRect(), style = getComputedStyle(t);
            const scrolls = ['auto', 'scroll'].includes(style.overflowX);
            return r.right > window.innerWidth || (t.scrollWidth > t.clientWidth + 1 && !scrolls);
        }).length""")
        assert cut == 0
        wide = b.eval(s, "[...document.querySelectorAll('table')].some(t => t.scrollWidth > t.clientWidth + 1)")
        assert wide  # the check above saw a table that needs its scroll
        pick = b.eval(s, "document.getElementById('pick').innerText")
        assert "relu-dense" not in pick and "relu-dead" not in pick
        assert any(t in pick for t in ("relu-b", "relu-c", "relu-d")) and "saesweep.load_sae(" in pick
    finally:
        b.close()
