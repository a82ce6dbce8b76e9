"""The storages a sweep can live in, opened from a URL (:func:`open_storage`): Optuna's journal
file (one host, or a shared filesystem with working locks), PostgreSQL (many hosts; its
connections tuned to fail fast when a host or the network goes away) and SQLite (one worker);
and the sweep-wide lock each offers (:class:`SweepLock`)."""

from __future__ import annotations

import contextlib
import json
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna

from saesweep.config.experiment import ConfigError
from saesweep.io import ensure_folder, file_lock
from saesweep.sweep.urls import redact, redact_text


class SweepLock:
    """A sweep-wide mutex for rare multi-step updates (populating, budgeted sampling).

    Journal / SQLite: an ``flock`` beside the file. PostgreSQL: ``pg_advisory_xact_lock`` held
    by a transaction on its own connection for as long as the block runs. A holder that
    vanishes releases it when the server drops its session: a dead host or a cut network
    within about half a minute (TCP keepalives and ``tcp_user_timeout``, see
    :func:`open_storage`); a process that hangs with its connection open after
    ``LOCK_IDLE_S`` (``idle_in_transaction_session_timeout``). Waiting for the lock has no
    statement timeout: a long populate (minutes for a large grid over a slow link) is waited for.
    """

    LOCK_IDLE_S = 1800

    def __init__(self, kind: str, path: Optional[Path], storage: Any, name: str) -> None:
        """``kind``, ``path`` and ``storage`` as :func:`open_storage` returns them; ``name``: the sweep's."""
        self.kind, self.path, self.storage, self.name = kind, path, storage, name

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        kind = self.kind
        if kind in ("journal", "sqlite"):
            with file_lock(str(self.path) + ".saesweep-lock"):
                yield
        elif kind == "postgresql":
            engine = self.storage.engine
            key = zlib.crc32(f"saesweep:{self.name}".encode()) & 0x7FFFFFFF
            from sqlalchemy import text

            with engine.connect() as conn, conn.begin():
                conn.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = '{int(self.LOCK_IDLE_S)}s'"))
                conn.execute(text("SET LOCAL statement_timeout = 0"))
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
                yield
        elif kind == "memory":  # one process: nothing to exclude
            yield
        else:
            raise ValueError(f"no sweep lock for storage kind {kind!r}; known: journal, sqlite, postgresql, memory")


#: libpq settings of every PostgreSQL connection (a key given in the URL's query wins):
#: connecting gives up after 10 s; an idle connection to a vanished server is detected by TCP
#: keepalives in about 25 s, and a request whose data goes unacknowledged (a cut network)
#: fails after ``tcp_user_timeout`` (libpq 12 or later), so a worker never hangs on a dead
#: connection.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "application_name": "saesweep",
}


#: the server side of each session, set when it opens (one by one: a setting this server does
#: not know, an older PostgreSQL's, is skipped): the server drops the session of a vanished
#: client as fast (its row and advisory locks go with it), no statement runs for more than five
#: minutes, and a session idle inside a transaction is ended after one.
PG_SESSION_SETTINGS = {
    "tcp_keepalives_idle": 10,
    "tcp_keepalives_interval": 5,
    "tcp_keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "statement_timeout": 300_000,
    "idle_in_transaction_session_timeout": 60_000,
}


def _libpq_version(driver: str) -> int:
    try:
        if driver == "psycopg":
            import psycopg

            return int(psycopg.pq.version())
        import psycopg2.extensions

        return int(psycopg2.extensions.libpq_version())
    except Exception:
        return 0


def pg_engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for a PostgreSQL ``url`` (see PG_CONNECT_ARGS).

    ``pool_pre_ping`` replaces connections that died while idle in the pool (a server restart,
    a network cut) before they are used. The connection settings are libpq's, so they are
    given only for the psycopg / psycopg2 drivers; a setting named in the URL's query (for
    example ``?connect_timeout=30``) is left to the URL.
    """
    from sqlalchemy.engine import make_url

    kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 8, "pool_timeout": 60,
                              "pool_recycle": 1800}
    try:
        u = make_url(url)
        driver = u.get_driver_name()
    except Exception:
        return kwargs
    if driver not in ("psycopg", "psycopg2"):
        return kwargs
    args = {k: v for k, v in PG_CONNECT_ARGS.items() if k not in u.query}
    if _libpq_version(driver) < 120000:
        args.pop("tcp_user_timeout", None)
    kwargs["connect_args"] = args
    return kwargs


def _session_settings(engine) -> None:
    """Apply PG_SESSION_SETTINGS to every new connection of ``engine``."""
    from sqlalchemy import event

    def apply(dbapi_conn, record) -> None:
        for name, value in PG_SESSION_SETTINGS.items():
            cur = dbapi_conn.cursor()
            try:
                cur.execute(f"SET {name} = {int(value)}")
                dbapi_conn.commit()
            except Exception:  # unknown to this server, or refused by a pooler in front of it
                dbapi_conn.rollback()
            finally:
                cur.close()

    event.listen(engine, "connect", apply)
    engine.dispose()  # connections opened while Optuna set the storage up have none of it


def open_storage(url: str, *, create: bool = True):
    """``(kind, path, storage)`` for ``url``: ``journal`` / ``postgresql`` / ``sqlite`` /
    ``memory``, the file for the file-based kinds, and the Optuna storage. With ``create``
    false a journal file must exist already (nothing is created for a sweep that is not there)."""
    if url.startswith(("postgresql://", "postgresql+", "postgres://")):
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://"):]
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=pg_engine_kwargs(url))
            _session_settings(storage.engine)
            return "postgresql", None, storage
        except ImportError as e:
            raise ConfigError(f"--storage {redact(url)}: PostgreSQL needs psycopg (pip install 'saesweep[postgres]'): "
                              f"{redact_text(str(e), url)}") from None
        except Exception as e:  # sqlalchemy.exc.OperationalError and friends
            first = redact_text(str(e), url).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--storage {redact(url)}: cannot connect ({first})") from None
    if url.startswith("sqlite:///"):
        return "sqlite", Path(url[len("sqlite:///"):]), optuna.storages.RDBStorage(url)
    if url == ":memory:":
        return "memory", None, optuna.storages.InMemoryStorage()
    if "://" in url:
        raise ConfigError(f"--storage {redact(url)}: unknown scheme; use a journal file path, postgresql://... or sqlite:///...")
    path = Path(url[len("journal:"):] if url.startswith("journal:") else url)
    if path.exists() and path.is_dir():
        raise ConfigError(f"--storage {url}: is a folder; give a journal file path")
    if not create and not path.exists():
        raise ConfigError(f"--storage {url}: no such sweep journal")
    if create:
        ensure_folder(path.parent, "--storage")
    from optuna.storages.journal import (
        JournalFileBackend,
        JournalFileOpenLock,
        JournalStorage,
    )

    try:
        storage = JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    except (UnicodeDecodeError, ValueError) as e:  # a damaged line (json.JSONDecodeError is a ValueError)
        raise ConfigError(journal_damage(path, e)) from None
    return "journal", path, storage


def journal_damage(path: Path, error: Exception) -> str:
    """A one-line message naming the first line of a journal that does not parse and how to
    recover the sweep from the lines before it."""
    bad, why = None, str(error).splitlines()[0] if str(error) else type(error).__name__
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                bad, why = n, f"{type(e).__name__}: {str(e).splitlines()[0]}"
                break
    where = f"line {bad}" if bad else "a line"
    keep = (f"keep the {bad - 1} intact lines before it (`head -n {bad - 1} {path} > {path}.fixed` and use "
            f"{path}.fixed); trials recorded after that line will run again") if bad and bad > 1 else \
        "nothing before it is readable: restore the file from a backup or start the sweep again"
    return f"--storage {path}: {where} of the sweep journal is damaged ({why}); {keep}"
