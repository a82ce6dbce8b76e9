"""``postgresql://...`` -- Optuna's RDB storage on PostgreSQL, for many hosts: its connections
tuned to fail fast when a host or the network goes away, the server's clock for leases, an
advisory lock as the sweep's mutex, and lost connections waited out by the workers."""

from __future__ import annotations

import contextlib
import time
import zlib
from typing import Any, Iterator, Optional

import optuna

from saesweep.errors import ConfigError
from saesweep.sweep.storages.base import Backend, Unreachable
from saesweep.sweep.urls import PASSWORD_ENV, redact, redact_text

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


def is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` comes from a lost database connection: SQLAlchemy's error itself, or one
    wrapping it (Optuna re-raises it as ``StorageInternalError``), anywhere in its chain."""
    try:
        from sqlalchemy.exc import DBAPIError, OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy comes with optuna
        return False
    seen: set[int] = set()
    err: Optional[BaseException] = error
    while err is not None and id(err) not in seen:
        if isinstance(err, OperationalError) or (isinstance(err, DBAPIError) and err.connection_invalidated):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


class PostgresBackend(Backend):
    """The sweep's mutex is ``pg_advisory_xact_lock``, held by a transaction on its own
    connection for as long as the block runs. A holder that vanishes releases it when the server
    drops its session: a dead host or a cut network within about half a minute (TCP keepalives
    and ``tcp_user_timeout``, see PG_CONNECT_ARGS); a process that hangs with its connection open
    after ``LOCK_IDLE_S`` (``idle_in_transaction_session_timeout``). Waiting for the lock has no
    statement timeout: a long populate (minutes for a large grid over a slow link) is waited for.
    """

    kind, title = "postgresql", "PostgreSQL"
    server_clock = True
    secret_env = PASSWORD_ENV
    LOCK_IDLE_S = 1800

    @classmethod
    def accepts(cls, url: str) -> bool:
        return url.startswith(("postgresql://", "postgresql+", "postgres://"))

    @classmethod
    def split_secret(cls, url: str) -> tuple[str, dict[str, str]]:
        from saesweep.sweep.urls import split_password

        bare, password = split_password(url)
        return bare, ({} if password is None else {cls.secret_env: password})

    @classmethod
    def check(cls, url: str) -> None:
        from saesweep.sweep.urls import split_password

        split_password(url)  # a ConfigError for a URL that does not parse

    @classmethod
    def open(cls, url: str, *, create: bool = True, read_only: bool = False) -> "PostgresBackend":
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://"):]
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=pg_engine_kwargs(url))
            _session_settings(storage.engine)
            return cls(url, None, storage)
        except ImportError as e:
            raise ConfigError(f"--storage {redact(url)}: PostgreSQL needs psycopg (pip install 'saesweep[postgres]'): "
                              f"{redact_text(str(e), url)}") from None
        except Exception as e:  # sqlalchemy.exc.OperationalError and friends
            first = redact_text(str(e), url).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise Unreachable(f"--storage {redact(url)}: cannot connect ({first})") from None

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        from sqlalchemy import text

        key = zlib.crc32(f"saesweep:{name}".encode()) & 0x7FFFFFFF
        with self.storage.engine.connect() as conn, conn.begin():
            conn.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = '{int(self.LOCK_IDLE_S)}s'"))
            conn.execute(text("SET LOCAL statement_timeout = 0"))
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            yield

    def server_time(self) -> tuple[float, float]:
        from sqlalchemy import text

        with self.storage.engine.connect() as conn:
            t0 = time.monotonic()
            server = float(conn.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar())
            t1 = time.monotonic()
        return server, (t0 + t1) / 2

    def is_retryable(self, error: BaseException) -> bool:
        return is_connection_error(error)
