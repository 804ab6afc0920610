"""Bulk inserts and lookups straight to the database driver, for the ledger's hot path (`add_facts`).

SQLAlchemy's executemany spends most of its time assembling parameters row by row. Here the caller
builds each row as a tuple of driver-ready values (converted once with `bind_processor`, the very
processor SQLAlchemy would use, so the stored values are identical) and the tuples go to the
driver's executemany in the session's transaction. Several times faster than
`session.execute(insert(table), rows)` (bench/ledger.py).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import JSON, Dialect, Table
from sqlalchemy.orm import Session

_MARKERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}
# json.dumps's defaults (so the text is the same) minus the cycle check, which costs a quarter of
# the time on these small lists; values come from our own records and cannot be cyclic.
_JSON = json.JSONEncoder(check_circular=False)
#: The string encoder json.dumps uses with its defaults (ensure_ascii): '"text"', escaped.
json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def json_list_text(items: Iterable[str]) -> str:
    """json.dumps(list(items)) for strings, character for character, without the encoder's overhead."""
    return "[" + ", ".join(map(json_string, items)) + "]"


def bind_processor(session: Session, table: Table, name: str) -> Callable[[Any], Any] | None:
    """What turns a Python value of column `name` into the driver value SQLAlchemy would send (None: as is).

    JSON columns give their text (json.dumps), to be inserted with `insert_tuples`.
    """
    return _converter(table, name, session.connection().dialect)[0]


def insert_tuples(session: Session, table: Table, names: Sequence[str], values: Sequence[tuple[Any, ...]]) -> None:
    """INSERT one row per tuple of `values` into the columns `names` of `table`, in the session's transaction.

    Each tuple holds driver-ready values in the order of `names`: what `bind_processor` gives for
    the column (for a JSON column, its JSON text). Column defaults are not applied: give every
    non-nullable column.
    """
    if not values:
        return
    connection = session.connection()
    dialect = connection.dialect
    marker = _MARKERS.get(str(dialect.paramstyle))
    if marker is None:
        raise NotImplementedError(f"bulk insert does not support the {dialect.paramstyle!r} parameter style")
    casts = [_converter(table, name, dialect)[1] for name in names]
    preparer = dialect.identifier_preparer
    columns = ", ".join(preparer.quote(name) for name in names)
    placeholders = ", ".join(marker if cast is None else f"CAST({marker} AS {cast})" for cast in casts)
    statement = f"INSERT INTO {preparer.format_table(table)} ({columns}) VALUES ({placeholders})"
    connection.exec_driver_sql(statement, list(values))


def update_column(session: Session, table: Table, column: str, key: str, pairs: Sequence[tuple[Any, Any]]) -> None:
    """UPDATE `table` SET `column` = new WHERE `key` = k for each (new, k) of `pairs` (driver-ready values).

    One executemany in the session's transaction; rows already loaded in the session are not
    refreshed (expire them if they may be read again).
    """
    if not pairs:
        return
    connection = session.connection()
    dialect = connection.dialect
    marker = _MARKERS[str(dialect.paramstyle)]
    preparer = dialect.identifier_preparer
    statement = (
        f"UPDATE {preparer.format_table(table)} SET {preparer.quote(column)} = {marker} "
        f"WHERE {preparer.quote(key)} = {marker}"
    )
    connection.exec_driver_sql(statement, list(pairs))


def insert_rows(
    session: Session, table: Table, rows: Sequence[Mapping[str, Any]], shared: Mapping[str, Any] | None = None
) -> None:
    """INSERT every row of `rows` (dicts with the same keys) plus the `shared` column values into `table`.

    Values are Python values (converted here). Runs in the session's current transaction. Column
    defaults are not applied: give every non-nullable column, in `rows` or in `shared`.
    """
    if not rows:
        return
    shared = dict(shared or {})
    names = [name for name in rows[0] if name not in shared]
    processors = [bind_processor(session, table, name) for name in [*names, *shared]]
    fixed = tuple(_apply(processors[len(names) + i], value) for i, value in enumerate(shared.values()))
    insert_tuples(session, table, [*names, *shared], _values(rows, names, processors, fixed))


def _values(
    rows: Sequence[Mapping[str, Any]],
    names: list[str],
    processors: list[Callable[[Any], Any] | None],
    fixed: tuple[Any, ...],
) -> list[tuple[Any, ...]]:
    # itemgetter builds each tuple in C; only the few columns with a processor are touched in Python.
    get = operator.itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)
    processed = [(index, process) for index, process in enumerate(processors[: len(names)]) if process]
    if not processed:
        return [get(row) + fixed for row in rows]
    values = []
    for row in rows:
        items = list(get(row))
        for index, process in processed:
            items[index] = process(items[index])
        values.append((*items, *fixed))
    return values


def _converter(table: Table, name: str, dialect: Dialect) -> tuple[Callable[[Any], Any] | None, str | None]:
    """The bind processor of a column, and the SQL type to cast its parameter to, if any."""
    column_type = table.c[name].type
    if isinstance(column_type, JSON):
        # json.dumps is SQLAlchemy's default serialiser too. Drivers such as psycopg adapt JSON
        # during statement compilation, which is skipped here, so they get text and a CAST.
        cast = None if dialect.name == "sqlite" else dialect.type_compiler_instance.process(column_type)
        return _dump_json, cast
    # The dialect's own implementation (e.g. SQLite's DATETIME, which formats text), as SQLAlchemy uses.
    return column_type.dialect_impl(dialect).bind_processor(dialect), None


def _dump_json(value: Any) -> str | None:
    if value is None:
        return None
    return "[]" if value == [] else _JSON.encode(value)


def _apply(process: Callable[[Any], Any] | None, value: Any) -> Any:
    return process(value) if process else value


def select_in(
    session: Session, table: Table, columns: Sequence[str], key: str, values: Sequence[Any], chunk: int = 500
) -> list[tuple[Any, ...]]:
    """Raw rows of `columns` from `table` where `key` is one of `values` (text-like columns only).

    Values come back as the driver gives them, without SQLAlchemy's result processing; use it for
    columns whose raw value is what the caller wants (ids, hashes, status strings).
    """
    if not values:
        return []
    connection = session.connection()
    dialect = connection.dialect
    marker = _MARKERS[str(dialect.paramstyle)]
    preparer = dialect.identifier_preparer
    selected = ", ".join(preparer.quote(name) for name in columns)
    head = f"SELECT {selected} FROM {preparer.format_table(table)} WHERE {preparer.quote(key)} IN "
    found: list[tuple[Any, ...]] = []
    for start in range(0, len(values), chunk):
        part = tuple(values[start : start + chunk])
        result = connection.exec_driver_sql(head + "(" + ", ".join([marker] * len(part)) + ")", part)
        found.extend(tuple(row) for row in result)
    return found
