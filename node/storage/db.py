"""The database: one peewee proxy that every table binds to, opened from a URL.

SQLite in WAL mode is the embedded default (``sqlite:///path/modelnode.db``). A site that runs
several nodes against one registry gives a PostgreSQL URL (``postgresql://user@host/db``) and
installs the ``postgres`` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import peewee
from playhouse.db_url import connect

# Named as before node/ was split into stages, so that log filters and greps keep working.
log = logging.getLogger("node.db")

database_proxy = peewee.DatabaseProxy()

# WAL lets the C-FIND readers run while a C-STORE writes; synchronous=FULL because a success
# status promises the index row survives a power cut, not just a crash of this process.
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
    "busy_timeout": 10000,
    "cache_size": -32 * 1024,
}


class BaseModel(peewee.Model):
    class Meta:
        database = database_proxy


def _db_values(model: type[BaseModel], values: dict[str, Any]) -> list[Any]:
    """Column values as peewee would bind them (booleans, datetimes, foreign keys)."""
    fields = model._meta.fields
    return [fields[k].db_value(v) for k, v in values.items()]


class Statements:
    """Hand-written SQL for the C-STORE hot path (node.storage.index, node.pipeline.jobs), one per database.

    peewee spends about 0.3 ms composing each query; a C-STORE needs five of them, which was most
    of the per-instance cost of indexing (2.6 ms of 3 ms, 200-slice CT). The statements are plain
    SQL with double-quoted identifiers and the database's own placeholder (``?`` in the SQL
    given here is replaced by it), valid in SQLite and PostgreSQL alike. Values go through the
    tables' own field conversions.
    """

    def __init__(self, db: peewee.Database) -> None:
        self.db = db
        self.p = db.param
        self.returning = isinstance(db, peewee.PostgresqlDatabase)

    def insert(self, model: type[BaseModel], values: dict[str, Any]) -> int:
        table = model._meta.table_name
        cols = ", ".join(f'"{model._meta.fields[k].column_name}"' for k in values)
        marks = ", ".join(self.p for _ in values)
        sql = f'INSERT INTO "{table}" ({cols}) VALUES ({marks})'
        if self.returning:
            sql += ' RETURNING "id"'
        cursor = self.db.execute_sql(sql, _db_values(model, values))
        return cursor.fetchone()[0] if self.returning else cursor.lastrowid

    def update(self, model: type[BaseModel], row_id: int, values: dict[str, Any]) -> None:
        sets = ", ".join(f'"{model._meta.fields[k].column_name}" = {self.p}' for k in values)
        sql = f'UPDATE "{model._meta.table_name}" SET {sets} WHERE "id" = {self.p}'
        self.db.execute_sql(sql, [*_db_values(model, values), row_id])

    def first(self, sql: str, params: list[Any]) -> tuple | None:
        return self.db.execute_sql(sql.replace("?", self.p), params).fetchone()

    def execute(self, sql: str, params: list[Any]) -> int:
        """Run ``sql``; returns the number of rows it changed."""
        return self.db.execute_sql(sql.replace("?", self.p), params).rowcount


_statements: dict[int, Statements] = {}


def statements() -> Statements:
    """The :class:`Statements` of the database the proxy points at."""
    db = database_proxy.obj
    st = _statements.get(id(db))
    if st is None or st.db is not db:
        st = _statements[id(db)] = Statements(db)
    return st


def write_transaction(db: peewee.Database | None = None) -> peewee._atomic:
    """A transaction that will write: BEGIN IMMEDIATE on SQLite.

    A deferred transaction that reads and then writes cannot upgrade its lock once another
    connection (``modelnode models add`` in another process, say) committed since its read:
    SQLite answers SQLITE_BUSY at once, without waiting. Taking the write lock up front makes
    it wait for the other writer instead (busy_timeout), which is what a C-STORE should do.
    Nested, it is a savepoint like any ``atomic()``.
    """
    db = db or database_proxy.obj
    if isinstance(db, peewee.SqliteDatabase):
        return db.atomic("IMMEDIATE")
    return db.atomic()


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def open_database(url: str, tables: Sequence[type[peewee.Model]] = ()) -> peewee.Database:
    """Connect to ``url``, bind the proxy to it and create any of ``tables`` that are missing.

    The tables are given by the caller (:func:`node.app.open_app` names every table of the
    node) rather than found by importing their modules here: those modules import this one.
    """
    if url.startswith("sqlite:"):
        path = url.split("sqlite:///", 1)[-1] if url.startswith("sqlite:///") else url[len("sqlite:"):]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = peewee.SqliteDatabase(path or ":memory:", pragmas=SQLITE_PRAGMAS, check_same_thread=False)
    else:
        db = connect(url)
    database_proxy.initialize(db)
    db.connect(reuse_if_open=True)
    if tables:
        db.create_tables(peewee.sort_models(list(tables)), safe=True)
    log.debug("database open: %s", _redact(url))
    return db


def _redact(url: str) -> str:
    """A URL fit for logs: the password, if any, replaced."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
