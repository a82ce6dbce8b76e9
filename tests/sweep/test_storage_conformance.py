"""One suite over every storage backend: the contract of :mod:`saesweep.sweep.storages.base`.

Each check runs on the journal file, SQLite and PostgreSQL (when the server binaries are
there; CI installs them): exactly-once claims, leases and their reaping, requeue and retries,
the sweep lock, and what a lost connection does.
"""

from __future__ import annotations

import threading
import time

import pytest
from optuna.exceptions import StorageInternalError
from pg import postgres_server, postgres_url  # noqa: F401  (fixtures)
from sweep_helpers import TINY_BASE, lost_connection

from saesweep.config.sweep import expand, parse_spec
from saesweep.sweep.storages import BACKENDS, backend_for
from saesweep.sweep.store import SweepStore
from saesweep.sweep.worker import open_sweep, queue_trials

KINDS = ["journal", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=KINDS)
def url(request, tmp_path):
    if request.param == "journal":
        return str(tmp_path / "sweep.journal")
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sweep.db'}"
    return request.getfixturevalue("postgres_url")


def _sweep(tmp_path, url, n):
    grids = {"relu": {"lr": [1e-4 * (i + 1) for i in range(n)], "dict_size_ratio": [2.0], "sparsity_coeff": [0.1]}}
    spec = parse_spec({"name": "c", "base": TINY_BASE, "sae_types": ["relu"], "grids": grids, "storage": url,
                       "output_dir": str(tmp_path / "runs"), "execution": {"pack_size": 1, "lease_s": 30}})
    store = open_sweep(spec)
    queue_trials(store, spec, expand(spec))
    return spec, store


def test_every_url_has_one_backend_and_each_states_its_contract():
    urls = {"journal": "runs/s/sweep.journal", "sqlite": "sqlite:///s.db", "postgresql": "postgresql://h/db",
            "memory": ":memory:"}
    assert sorted(cls.kind for cls in BACKENDS) == sorted(urls)
    for kind, u in urls.items():
        cls = backend_for(u)
        assert cls.kind == kind and [c for c in BACKENDS if c.accepts(u)][0] is cls
        assert isinstance(cls.concurrent_workers, bool) and isinstance(cls.server_clock, bool)
    assert backend_for("postgresql://h/db").secret_env == "PGPASSWORD"
    from saesweep.sweep.storages import split_secret

    assert split_secret("postgresql://u:s3cret@h/db") == ("postgresql://u@h/db", {"PGPASSWORD": "s3cret"})
    assert split_secret("postgresql://u@h/db") == ("postgresql://u@h/db", {})
    assert split_secret("runs/s/sweep.journal") == ("runs/s/sweep.journal", {})  # a path holds no secret
    assert not backend_for("sqlite:///s.db").concurrent_workers


def test_claims_are_exactly_once(tmp_path, url):
    spec, store = _sweep(tmp_path, url, 24)
    concurrent = store.backend.concurrent_workers
    got: list[str] = []
    guard = threading.Lock()

    def claimer(k):
        s = SweepStore(url, spec.name, create=False)
        while True:
            claims = s.claim(f"w{k}", max_members=3)
            if not claims:
                return
            with guard:
                got.extend(c.trial_id for c in claims)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(6 if concurrent else 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(got) == sorted(c.trial_id for c in expand(spec))
    assert store.counts()["running"] == 24 and store.counts()["waiting"] == 0


def test_an_expired_lease_is_reaped_once_and_the_late_result_discarded(tmp_path, url):
    spec, store = _sweep(tmp_path, url, 2)
    claim = store.claim("zombie")[0]
    live = store.claim("alive")[0]
    other = SweepStore(url, spec.name, create=False)
    time.sleep(1.2)
    store.heartbeat([live], "alive")
    assert other.reap_expired(lease_s=1.0) == [claim.trial_id]  # the beating one stays
    assert other.reap_expired(lease_s=1.0) == []
    assert store.complete(claim, {"fvu": 0.1}, objectives=["fvu"]) is False
    assert store.counts()["waiting"] == 1 and store.counts()["running"] == 1


def test_a_failed_attempt_is_requeued_until_its_retries_run_out(tmp_path, url):
    spec, store = _sweep(tmp_path, url, 1)
    first = store.claim("w")[0]
    assert store.fail(first, "boom", retry=True, max_retries=1) == (True, True)
    assert store.fail(first, "boom", retry=True, max_retries=1) == (False, False)  # recorded once
    second = store.claim("w")[0]
    assert second.trial_id == first.trial_id and second.attempt == 2
    assert store.fail(second, "boom again", retry=True, max_retries=1) == (True, False)
    assert store.claim("w") == [] and store.counts()["failed"] == 1 and store.counts()["waiting"] == 0
    assert store.complete(second, {"fvu": 0.1}, objectives=["fvu"]) is False  # finished: stays failed


def test_the_sweep_lock_excludes(tmp_path, url):
    spec, store = _sweep(tmp_path, url, 1)
    other = SweepStore(url, spec.name, create=False)
    inside, overlaps = [], []

    def hold(s):
        for _ in range(3):
            with s.lock():
                inside.append(1)
                overlaps.append(len(inside))
                time.sleep(0.02)
                inside.pop()

    threads = [threading.Thread(target=hold, args=(s,)) for s in (store, other)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert overlaps and max(overlaps) == 1


def test_only_a_lost_connection_is_waited_out(tmp_path, url):
    spec, store = _sweep(tmp_path, url, 1)
    assert not store.backend.is_retryable(ValueError("bad value"))
    assert not store.backend.is_retryable(StorageInternalError("a constraint failed"))
    if store.backend.kind == "postgresql":
        assert store.backend.is_retryable(lost_connection())


@pytest.mark.postgres
def test_a_cut_connection_is_replaced_before_the_next_call(tmp_path, postgres_url):  # noqa: F811
    from sqlalchemy import create_engine, text

    spec, store = _sweep(tmp_path, postgres_url, 2)
    claim = store.claim("w")[0]
    # the server drops every session of the store's pool, as a restart or a failover would
    admin = create_engine(postgres_url)
    with admin.connect() as c:
        c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = 'saesweep' AND pid <> pg_backend_pid()"))
    admin.dispose()
    assert store.complete(claim, {"fvu": 0.1}, objectives=["fvu"]) is True
    assert store.counts()["complete"] == 1 and store.now() > 0
