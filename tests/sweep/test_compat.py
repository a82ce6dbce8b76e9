"""A sweep started before the package was reorganised resumes after it: its journal, trial ids,
pack keys and run folders are read as they are, and finished trials are not run again."""

import json
import shutil
from pathlib import Path

from sweep_helpers import complete_count_by_trial, saesweep

from saesweep.packing import pack_key
from saesweep.config.sweep import expand, load_spec
from saesweep.sweep.store import SweepStore

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_sweep"


def test_a_sweep_from_the_old_layout_resumes(tmp_path):
    here = tmp_path / "legacy"
    shutil.copytree(LEGACY, here)
    # the synthetic source's default world is now the realistic one: the old sweep names its world
    spec_file = here / "saesweep.yaml"
    spec_file.write_text(spec_file.read_text().replace("sparsity: 0.1}", "sparsity: 0.1, world: toy}"))
    journal = here / "runs" / "legacy" / "sweep.journal"
    old = SweepStore(str(journal), "legacy", create=False)
    old_done = complete_count_by_trial(old)
    assert len(old_done) == 2
    spec = load_spec(here / "saesweep.yaml", output_dir=str(here / "runs"))
    ids = {c.trial_id for c in expand(spec)}
    assert set(old_done) <= ids  # the trial ids of the old code are the ids of today's configs
    keys = {t.user_attrs["trial_id"]: t.user_attrs["pack_key"] for t in old.trials()}
    assert all(keys[c.trial_id] == pack_key(c) for c in expand(spec) if c.trial_id in keys)
    before = {t: (here / "runs" / "legacy" / "trials" / t / "metrics.json").read_bytes() for t in old_done}

    proc = saesweep("sweep", cwd=here, check=True)
    assert "4 complete, 0 failed" in proc.stdout
    done = complete_count_by_trial(SweepStore(str(journal), "legacy", create=False))
    assert set(done) == ids and set(done.values()) == {1}  # the old trials were not run again
    for t, blob in before.items():
        assert (here / "runs" / "legacy" / "trials" / t / "metrics.json").read_bytes() == blob
    status = saesweep("status", "runs/legacy", cwd=here, check=True)
    assert "Sweep 'legacy' (4 trials)" in status.stdout
    assert all(json.loads(blob)["metrics"]["l0"] > 0 for blob in before.values())
