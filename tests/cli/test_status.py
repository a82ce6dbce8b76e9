"""`saesweep status`: the time left counts packs and slots; the frontier counts finished trials."""

import re
import time

from sweep_helpers import TINY_BASE

from saesweep.cli import main
from saesweep.config.sweep import expand, parse_spec
from saesweep.sweep.worker import open_sweep, queue_trials


def test_time_left_counts_packs_and_slots_and_frontier_only_complete(tmp_path, capsys):
    spec = parse_spec({"name": "st", "base": TINY_BASE, "sae_types": ["relu"], "output_dir": str(tmp_path / "runs"),
                       "grids": {"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 7e-3, 8e-3],
                                          "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}},
                       "execution": {"pack_size": 3}})
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    store.set_info(slots=["cpu:0", "cpu:1"])
    first = store.claim("w", max_members=2)
    time.sleep(0.2)
    for i, c in enumerate(first):
        store.complete(c, {"fvu": 0.1 * (i + 1), "l0": 5.0 - i, "mse": 0.1}, objectives=["fvu"])
    store.claim("w", max_members=1)  # one running, five waiting
    assert main(["status", str(tmp_path / "runs" / "st")]) == 0
    out = capsys.readouterr().out
    m = re.search(r"mean trial \(pack\) time ([\d.]+)s; 6 trials left in about 2 pack\(s\) of up to 3 on 2 slot\(s\): "
                  r"about (\d+)s", out)
    assert m, out
    assert abs(float(m.group(2)) - float(m.group(1))) <= 1  # 2 packs on 2 slots: one pack's time
    assert "2 of 2 complete trials on the frontier" in out
