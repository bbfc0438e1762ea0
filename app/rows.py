"""Write a transaction's new rows with plain INSERT statements, for the hot path of every job.

The unit of work's flush costs about three times the statements it sends: 0.6 ms of CPU against 0.2 ms
for the four rows of a submission (job, audit entry, state change, attempt), measured with SQLite on the
machines of docs/PERFORMANCE.md. ``commit_new`` writes the session's new objects itself, in foreign-key
order and in the order they were added, commits, and keeps them in the session as persistent, clean objects, so the
code that builds them stays ordinary ORM code; and it holds the write lock only for the statements.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Insert, Table, Update, bindparam, inspect
from sqlalchemy.orm import Mapper, Session, make_transient_to_detached, scoped_session
from sqlalchemy.orm.attributes import set_committed_value

from app.extensions import Base

_TABLE_ORDER: dict[Table, int] = {}  # table -> its place in foreign-key order, filled on first use
_INSERTS: dict[Table, Insert] = {}  # table -> its INSERT statement, built once (its cache key with it)


def _insert_statement(table: Table) -> Insert:
    """The table's INSERT statement, built once (its cache key with it)."""
    statement = _INSERTS.get(table)
    if statement is None:
        statement = _INSERTS[table] = table.insert()
    return statement


def _default(column: Any) -> tuple[bool, Any]:
    """(True, the value) the column's Python-side default gives an INSERT, or (False, None) to leave it out."""
    default = column.default
    if default is None:
        return (False, None) if column.primary_key and column.autoincrement else (True, None)
    if default.is_scalar:
        return True, default.arg
    if default.is_callable:
        return True, default.arg(None)
    return False, None  # a sequence or an SQL expression: the database fills it in


def _values(obj: Base) -> tuple[Mapper[Any], dict[str, Any], dict[str, Any]]:
    """The object's mapper, the INSERT's parameters by column key, and the values to keep by attribute key."""
    state = inspect(obj)
    mapper = state.mapper
    if mapper.inherits is not None or mapper.local_table is not mapper.persist_selectable:
        raise TypeError(f"commit_new writes only plain one-table objects, not {type(obj).__name__}")
    parameters: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    for prop in mapper.column_attrs:
        column = prop.columns[0]
        if prop.key in state.dict:
            value = state.dict[prop.key]
        else:
            given, value = _default(column)
            if not given:
                continue
        parameters[column.key] = value
        attributes[prop.key] = value
    return mapper, parameters, attributes


def commit_new(session: Session | scoped_session[Any]) -> int:
    """INSERT every object added to ``session`` and not written yet, commit, keep each as persistent; how many.

    Everything but the statements and the commit happens before the first INSERT or after the COMMIT, so the
    transaction holds the write lock (SQLite's is one for the whole file) no longer than it must: the objects
    leave the session first, so that the commit's flush finds nothing to write, and come back persistent.
    """
    if not _TABLE_ORDER:
        _TABLE_ORDER.update({table: place for place, table in enumerate(Base.metadata.sorted_tables)})
    new = sorted(session.new, key=lambda o: (_TABLE_ORDER[inspect(o).mapper.local_table], inspect(o).insert_order))
    rows = [(obj, *_values(obj)) for obj in new]
    for obj in new:
        if obj in session:  # expunging an object expunges what it cascades to
            session.expunge(obj)
    connection = session.connection()
    for _obj, mapper, parameters, attributes in rows:
        table = cast(Table, mapper.local_table)
        result = connection.execute(_insert_statement(table), parameters)
        for column, value in zip(table.primary_key.columns, result.inserted_primary_key or (), strict=False):
            attributes[mapper.get_property_by_column(column).key] = value
    session.commit()
    for obj, _mapper, _parameters, attributes in rows:
        if obj in session:  # brought back by a parent's cascade: it comes back as persistent instead
            session.expunge(obj)
        inspect(obj).dict.update(attributes)  # as a query loads them: the next line commits them all at once
        make_transient_to_detached(obj)
        session.add(obj)
    return len(rows)


_UPDATES: dict[tuple[Table, tuple[str, ...], tuple[str, ...]], Update] = {}  # fenced UPDATEs, built once each


def _fenced_statement(table: Table, guards: tuple[str, ...], keys: tuple[str, ...]) -> Update:
    """``UPDATE table SET keys WHERE primary key AND guards``, with bound parameters, built once per shape."""
    shape = (table, guards, keys)
    statement = _UPDATES.get(shape)
    if statement is None:
        where = [column == bindparam(f"pk_{column.key}") for column in table.primary_key.columns]
        where += [table.c[key] == bindparam(f"was_{key}") for key in guards]
        statement = _UPDATES[shape] = (
            table.update().where(*where).values({table.c[key]: bindparam(f"set_{key}") for key in keys})
        )
    return statement


def update_fenced(
    session: Session | scoped_session[Any], obj: Base, values: dict[str, Any], guards: dict[str, Any]
) -> bool:
    """Write ``values`` to a stored object's row now, only where its columns still hold ``guards``; True if it did.

    One plain UPDATE (cached per shape) on the session's connection, without the unit of work; on success the
    object carries the new values as committed ones, so the commit's flush does not write them again.
    Attribute keys must equal column keys (true of every model here).
    """
    state = inspect(obj)
    table = cast(Table, state.mapper.local_table)
    statement = _fenced_statement(table, tuple(guards), tuple(values))
    parameters = {f"pk_{column.key}": state.dict[column.key] for column in table.primary_key.columns}
    parameters.update({f"was_{key}": value for key, value in guards.items()})
    parameters.update({f"set_{key}": value for key, value in values.items()})
    if session.connection().execute(statement, parameters).rowcount != 1:
        return False
    for key, value in values.items():
        set_committed_value(obj, key, value)
    return True


def insert_row(session: Session | scoped_session[Any], model: type[Base], values: dict[str, Any]) -> Any:
    """INSERT one row of ``model`` now (its columns' defaults fill the rest); returns its primary key value."""
    table = cast(Table, model.__table__)
    key = session.connection().execute(_insert_statement(table), values).inserted_primary_key
    return key[0] if key else None
