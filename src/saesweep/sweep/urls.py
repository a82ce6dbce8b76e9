"""Storage URLs and their passwords: shown redacted everywhere, handed to child processes
through the environment (``PGPASSWORD``), never on a command line."""

from __future__ import annotations

import os
import re
from typing import Optional

from saesweep.errors import ConfigError

_QUERY_SECRET = re.compile(r"([?&](?:ssl)?pass(?:word|wd)=)[^&#]*", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for logs, reports and exceptions).

    The user-info part ends at the *last* ``@`` of the URL, so a password containing ``/``,
    ``?``, ``:`` or an unencoded ``@`` is hidden whole (an ``@`` in a query value can make it
    hide more than the password, never less); ``password=`` / ``sslpassword=`` query
    parameters are hidden too. Text without ``://`` (a journal path) is returned unchanged.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        user = rest[: rest.index(":")]
        rest = f"{user}:***{rest[at:]}"
    return _QUERY_SECRET.sub(r"\1***", f"{scheme}://{rest}")


PASSWORD_ENV = "PGPASSWORD"


def _pg_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgresql+", "postgres://"))


def split_password(url: str) -> tuple[str, Optional[str]]:
    """``(url without its password, the password or None)`` for a PostgreSQL URL.

    The password is taken as SQLAlchemy reads it (percent-decoded), from the user info or a
    ``password=`` query parameter. Other URLs and paths come back unchanged.
    """
    if not _pg_url(url):
        return url, None
    from sqlalchemy.engine import URL, make_url

    try:
        u = make_url("postgresql://" + url[len("postgres://"):] if url.startswith("postgres://") else url)
    except Exception:
        raise ConfigError(f"--storage {redact(url)}: not a valid PostgreSQL URL") from None
    query = dict(u.query)
    password = u.password
    if password is None:
        for k in ("password", "PASSWORD"):
            if k in query:
                value = query.pop(k)
                password = value if isinstance(value, str) else value[0]
    else:
        query.pop("password", None)
    if isinstance(password, (tuple, list)):
        password = password[0]
    if password is None:
        return url, None
    bare = URL.create(u.drivername, username=u.username, password=None, host=u.host, port=u.port,
                      database=u.database, query=query)
    return bare.render_as_string(hide_password=False), str(password)


def password_to_env(url: str, env: Optional[dict] = None) -> str:
    """The URL without its password, which goes into ``env`` (default: this process's
    environment) as ``PGPASSWORD``, where libpq finds it; the URL itself is then safe on
    command lines (visible to every user in ``ps``) and in job files."""
    bare, password = split_password(url)
    if password is not None:
        (os.environ if env is None else env)[PASSWORD_ENV] = password
    return bare


def redact_text(text: str, url: str) -> str:
    """``text`` (an error message, say) with ``url`` redacted and its password, in every
    spelling (as written, decoded, encoded), replaced by ``***``."""
    from urllib.parse import quote, unquote

    if not url or "://" not in url:
        return text
    out = text.replace(url, redact(url))
    rest = url.split("://", 1)[1]
    secrets = [m.group(0).split("=", 1)[1] for m in _QUERY_SECRET.finditer(url)]
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        secrets.append(rest[rest.index(":") + 1 : at])
    for secret in secrets:
        for form in sorted({secret, unquote(secret), quote(unquote(secret), safe="")}, key=len, reverse=True):
            if form:
                out = out.replace(form, "***")
    return out
