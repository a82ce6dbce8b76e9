"""The launcher contract, the same checks on every launcher: a dry run describes and starts
nothing; start runs workers that empty the queue, each trial once; wait gives 0."""

from __future__ import annotations

import pytest
from sweep_helpers import complete_count_by_trial, write_spec

from saesweep.config.sweep import expand, load_spec
from saesweep.sweep.launcher import Launched, Launcher
from saesweep.sweep.local import LocalLauncher
from saesweep.sweep.planning import plan_workers
from saesweep.sweep.slurm import LaunchOptions, SlurmLauncher
from saesweep.sweep.worker import open_sweep, queue_trials


def local_launcher(spec, tmp_path) -> Launcher:
    return LocalLauncher(spec.execution, plan_workers("cpu:0,cpu:1"), show_progress=False, echo=lambda *a: None)


def submitit_launcher(spec, tmp_path) -> Launcher:
    pytest.importorskip("submitit")
    opts = LaunchOptions(storage=spec.storage_url, sweep=spec.name, cluster="local", array=2, time_min=20,
                         devices="cpu", folder=str(tmp_path / "logs" / "%j"))
    return SlurmLauncher(opts)


@pytest.mark.parametrize("make", [local_launcher, submitit_launcher], ids=["local", "submitit-local"])
def test_every_launcher_describes_starts_and_waits(tmp_path, make):
    spec = load_spec(write_spec(tmp_path, name="lch", sae_types=["relu"], output_dir=str(tmp_path / "runs"),
                                grids={"relu": {"lr": [1e-3, 2e-3, 3e-3, 4e-3], "dict_size_ratio": [2.0],
                                                "sparsity_coeff": [0.1]}},
                                execution={"pack_size": 1, "lease_s": 30, "heartbeat_s": 0.5}))
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    launcher = make(spec, tmp_path)

    lines = launcher.describe(spec.storage_url, spec.name)
    assert lines and "lch" in lines[0] and launcher.where.split()[0] in lines[0]
    assert store.counts()["waiting"] == 4 and not (tmp_path / "logs").exists()  # nothing started

    launched = launcher.start(store)
    assert isinstance(launched, Launched) and launched.ids
    assert launched.wait() == 0
    done = complete_count_by_trial(store)
    assert len(done) == 4 and set(done.values()) == {1}
