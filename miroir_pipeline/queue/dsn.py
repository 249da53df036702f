"""Jobs-store DSNs: the embedded default, parsing, schema names, and redaction for messages.

``sqlite:///relative/path`` / ``sqlite:////absolute/path`` name a SQLite file;
``postgresql://…`` / ``postgres://…`` a Postgres database (``?schema=NAME``, default ``miroir``).
"""

from __future__ import annotations

import contextlib
import os
import re
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from miroir_pipeline.util.home import default_home

__all__ = [
    "DEFAULT_SQLITE_PATH",
    "ENV_DSN",
    "check_url_credentials",
    "default_dsn",
    "redact_dsn",
    "scrub_password",
    "split_schema",
    "sqlite_path_from_dsn",
    "validate_schema",
]

#: Where the embedded default jobs store is when ``$MIROIR_HOME`` is not set.
DEFAULT_SQLITE_PATH = "./.miroir/jobs.sqlite3"
ENV_DSN = "MIROIR_JOBS_DSN"
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
#: Query parameters libpq takes that hold a secret (the key file's passphrase is one too).
_SECRET_PARAMS = frozenset({"password", "sslpassword"})
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def default_dsn() -> str:
    """The embedded default: ``jobs.sqlite3`` in the home of the embedded defaults
    (``$MIROIR_HOME``, else ``./.miroir``; the folder is created)."""
    home = default_home()
    home.mkdir(parents=True, exist_ok=True)
    path = str(home / "jobs.sqlite3")
    return "sqlite:///" + (path if os.path.isabs(path) else "./" + path)


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, safe to show in errors and logs."""
    if "://" not in dsn:
        return _KV_PASSWORD.sub(r"\1***", dsn)
    scheme, rest = dsn.split("://", 1)
    changed = False
    user, password, after = _userinfo(rest)
    if password is not None:
        rest = f"{user}:***@{after}"
        changed = True
    redacted = f"{scheme}://{rest}"
    try:
        parts = urlsplit(redacted)
    except ValueError:
        return "<unparseable DSN>"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
        query = urlencode(
            [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*@:/"
        )
        redacted = urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
        changed = True
    return redacted if changed else dsn


def check_url_credentials(dsn: str) -> None:
    """Refuse a URL DSN whose user name or password holds a raw '/' or '@': libpq would take
    part of the password for the host, port or database and quote it back in its error."""
    if "://" not in dsn:
        return
    rest = dsn.split("://", 1)[1]
    head = rest.split("/", 1)[0]
    # Two '@' before the path, or one only past a raw '/' (in the path, before the query).
    ambiguous = head.count("@") > 1 or ("@" not in head and "@" in _path(rest, head))
    if ambiguous:
        raise ValueError(
            f"the jobs DSN {redact_dsn(dsn)} has a raw '/' or '@' in its user name or password, "
            "which would be read as part of the host or database: percent-encode them "
            "('/' as %2F, '@' as %40) and try again"
        )


def _path(rest: str, head: str) -> str:
    """What follows the host part of a URL DSN, up to its query."""
    return rest[len(head) :].split("?", 1)[0]


def _userinfo(rest: str) -> tuple[str, str | None, str]:
    """``(user, password, what follows the '@')`` of a URL DSN after its ``scheme://``; password
    ``None`` when there is none.

    libpq reads the user info up to the first '@' before any '/', so a password may hold a raw
    '#' or '?' that a URL parser would take for the fragment or query: it is cut the same way.
    Where libpq would misread the DSN (a raw '@' or '/' in the password), the password is taken
    to run to the last '@' of the host part, or past a '/' to the last '@' before the query:
    more is hidden rather than less (hosts and ports never hold an '@'). An '@' in the query
    (``?user=admin@server``) is a parameter's."""
    head = rest.split("/", 1)[0]
    if "@" in head:
        end = head.rindex("@")
    else:
        path = _path(rest, head)
        if "@" not in path:
            return "", None, rest
        end = len(head) + path.rindex("@")
    user, colon, password = rest[:end].partition(":")
    return user, (password if colon else None), rest[end + 1 :]


def scrub_password(text: str, dsn: str) -> str:
    """``text`` (a driver's error) with the DSN's password, as written and percent-decoded,
    replaced by ``***``: libpq quotes the token it could not parse, password included."""
    secrets: set[str] = set()
    if "://" in dsn:
        _, raw, _ = _userinfo(dsn.split("://", 1)[1])
        if raw is not None:
            secrets.update({raw, unquote(raw)})
        with contextlib.suppress(ValueError):
            secrets.update(
                v for k, v in parse_qsl(urlsplit(dsn).query) if k.lower() in _SECRET_PARAMS
            )
    else:
        secrets.update(m.group(2).strip("'") for m in _KV_PASSWORD.finditer(dsn))
    for secret in sorted((x for x in secrets if x), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def sqlite_path_from_dsn(dsn: str) -> str:
    """``sqlite:///rel/path`` → ``rel/path``; ``sqlite:////abs/path`` → ``/abs/path``."""
    prefix = "sqlite:///"
    if not dsn.startswith(prefix):
        raise ValueError(
            f"bad SQLite DSN {dsn!r}: write sqlite:///relative/path or sqlite:////absolute/path"
        )
    path = dsn[len(prefix) :].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ValueError(
            f"bad SQLite DSN {dsn!r}: the job store needs a file path shared by all "
            "processes (e.g. sqlite:///.miroir/jobs.sqlite3)"
        )
    return path


def split_schema(dsn: str) -> tuple[str, str | None]:
    """Remove ``schema=NAME`` from a Postgres URL's query; return (DSN for psycopg, NAME)."""
    parts = urlsplit(dsn)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    kept = []
    for key, value in pairs:
        if key == "schema":
            schema = value
        else:
            kept.append((key, value))
    if schema is None:
        return dsn, None
    query = urlencode(kept, quote_via=quote)  # %20, not "+": libpq does not decode "+"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment)), schema


def validate_schema(schema: str) -> str:
    """A plain SQL identifier (letters, digits, underscore; not starting with a digit)."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(
            f"invalid Postgres schema name {schema!r}: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters"
        )
    return schema
