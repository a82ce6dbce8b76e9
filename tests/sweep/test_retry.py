"""A worker's store calls ride out lost database connections, however Optuna wraps them."""

import pytest
from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import OperationalError
from sweep_helpers import lost_connection

from saesweep.sweep import worker
from saesweep.sweep.storages.postgresql import is_connection_error as _is_connection_error
from saesweep.sweep.worker import RetryingStore


class FlakyStore:
    def __init__(self, failures: list[BaseException]) -> None:
        from saesweep.sweep.storages.postgresql import PostgresBackend

        self.failures, self.calls, self.outages_noted = failures, 0, 0
        self.backend = PostgresBackend("postgresql://h/db", None, None)

    def note_outage_end(self) -> None:
        self.outages_noted += 1

    def complete(self, trial: int) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return f"done {trial}"


def test_a_wrapped_lost_connection_is_recognised():
    assert _is_connection_error(lost_connection())
    assert _is_connection_error(OperationalError("SELECT 1", {}, Exception("gone")))
    assert not _is_connection_error(StorageInternalError("a constraint failed"))
    assert not _is_connection_error(ValueError("bad value"))


def test_store_calls_are_retried_through_an_outage_and_other_errors_are_not(monkeypatch, capsys):
    waits = []
    monkeypatch.setattr(worker.time, "sleep", waits.append)
    store = FlakyStore([lost_connection(), lost_connection()])
    assert RetryingStore(store, give_up_s=600).complete(7) == "done 7"
    assert store.calls == 3 and waits == [1.0, 2.0]
    err = capsys.readouterr().err
    assert err.count("database unreachable") == 1 and err.count("reachable again") == 1  # one line each, no traceback
    assert "Traceback" not in err and store.outages_noted == 1
    store = FlakyStore([ValueError("bad value")])
    with pytest.raises(ValueError):
        RetryingStore(store, give_up_s=600).complete(7)
    assert store.calls == 1


def test_a_storage_url_no_backend_takes_is_refused_by_name():
    from saesweep.config.experiment import ConfigError
    from saesweep.sweep.storages import open_backend

    with pytest.raises(ConfigError, match="unknown scheme"):
        open_backend("redis://h/0")
    with pytest.raises(ConfigError, match="--storage: empty"):
        open_backend("")


def test_an_outage_longer_than_the_budget_ends_the_call_with_the_error(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(worker.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr("tenacity.time.monotonic", lambda: clock[0])
    store = FlakyStore([lost_connection() for _ in range(100)])
    with pytest.raises(StorageInternalError):
        RetryingStore(store, give_up_s=60).complete(7)
    assert 55 <= clock[0] <= 75 and store.calls < 15
    assert capsys.readouterr().err.count("database unreachable") == 1
