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

        self.failures, self.calls = failures, 0
        self.backend = PostgresBackend("postgresql://h/db", None, None)

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
    assert capsys.readouterr().err.count("database unreachable") == 2  # one line per attempt, no traceback
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
