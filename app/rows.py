"""Write a transaction's new rows with plain INSERT statements, for the hot path of every job.

The unit of work's flush costs about three times the statements it sends: 0.6 ms of CPU against 0.2 ms
for the four rows of a submission (job, audit entry, state change, attempt), measured with SQLite on the
machines of docs/PERFORMANCE.md. ``commit_new`` writes the session's new objects itself, in foreign-key
order and in the order they were added, commits, and leaves them detached and loaded, as clean as a query leaves
them, so the code that builds them stays ordinary ORM code; and it holds the write lock only for the statements.

Each statement goes to the database as its driver SQL, compiled once per set of parameters, with the values
converted as SQLAlchemy would convert them (``_run``): ``Connection.execute`` looks the statement up in its compiled
cache and builds its parameters again each time, about 25 µs a statement against 8 µs this way (SQLite, in-process).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

from sqlalchemy import Connection, Dialect, Insert, Table, Update, bindparam, inspect
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


class _DriverForm(NamedTuple):
    """A statement as the database driver takes it: its SQL, and its bound parameters (in order, for a driver that
    takes them by position), each with the conversion SQLAlchemy would apply to its value (None: as is)."""

    sql: str
    parameters: tuple[tuple[str, Callable[[Any], Any] | None], ...]
    positional: bool


_FORMS: dict[tuple[Any, Dialect, tuple[str, ...]], _DriverForm | None] = {}


def _driver_form(dialect: Dialect, statement: Insert | Update, keys: tuple[str, ...]) -> _DriverForm | None:
    """The statement of this module compiled once for ``dialect`` and parameter ``keys``; None when it needs more
    than its parameters (a column default filled in by SQLAlchemy, a parameter name the driver cannot take)."""
    cache_key = (statement, dialect, keys)
    if cache_key in _FORMS:
        return _FORMS[cache_key]
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    names = tuple(compiled.positiontup or ()) if compiled.positional else tuple(compiled.binds)
    needs_more = compiled.insert_prefetch or compiled.update_prefetch or compiled.escaped_bind_names
    form = None
    if not needs_more and set(names) <= set(keys):
        # what the execution would apply to each value, a TypeDecorator's own conversion included
        converts = [compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]
        form = _DriverForm(compiled.string, tuple(zip(names, converts, strict=True)), compiled.positional)
    _FORMS[cache_key] = form
    return form


def _run(connection: Connection, statement: Insert | Update, parameters: dict[str, Any] | list[dict[str, Any]]) -> Any:
    """Execute one of this module's statements, one row or several; its CursorResult.

    The statement is sent as its driver SQL with converted values (``exec_driver_sql``): the same SQL, values,
    events and error handling as ``Connection.execute``, for a third of its CPU.
    """
    rows = parameters if isinstance(parameters, list) else [parameters]
    form = _driver_form(connection.dialect, statement, tuple(rows[0]))
    if form is None:
        return connection.execute(statement, parameters)
    values: list[Any]
    if form.positional:
        values = [tuple(row[n] if cv is None else cv(row[n]) for n, cv in form.parameters) for row in rows]
    else:
        values = [{n: row[n] if cv is None else cv(row[n]) for n, cv in form.parameters} for row in rows]
    return connection.exec_driver_sql(form.sql, values if isinstance(parameters, list) else values[0])


def _key_column(table: Table) -> Any:
    """The first column of the table's primary key: the database chooses its value when an INSERT leaves it out
    (an autoincrement key, the only column of its primary key)."""
    return next(iter(table.primary_key.columns))


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
    """INSERT every object added to ``session`` and not written yet, commit; how many.

    Everything but the statements and the commit happens before the first INSERT or after the COMMIT, so the
    transaction holds the write lock (SQLite's is one for the whole file) no longer than it must: the objects
    leave the session first, so that the commit's flush finds nothing to write. They are left detached, loaded as a
    query would load them: every column can be read, and what needs them in a session again adds them (adding them
    back here cost the hot path of every submission about a twentieth of its CPU, for nothing that used it).
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
        result = _run(connection, _insert_statement(table), parameters)
        column = _key_column(table)
        if column.key not in parameters:
            attributes[mapper.get_property_by_column(column).key] = result.lastrowid
    session.commit()
    for obj, _mapper, _parameters, attributes in rows:
        inspect(obj).dict.update(attributes)  # as a query loads them: the next line commits them all at once
        make_transient_to_detached(obj)
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
    if _run(session.connection(), statement, parameters).rowcount != 1:
        return False
    for key, value in values.items():
        set_committed_value(obj, key, value)
    return True


def insert_row(session: Session | scoped_session[Any], model: type[Base], values: dict[str, Any]) -> Any:
    """INSERT one row of ``model`` now (its columns' defaults fill the rest); returns its primary key value."""
    table = cast(Table, model.__table__)
    result = _run(session.connection(), _insert_statement(table), values)
    return values.get(_key_column(table).key, result.lastrowid)


def insert_rows(session: Session | scoped_session[Any], statement: Insert, rows: list[dict[str, Any]]) -> None:
    """Execute an INSERT of several rows (one ``executemany``); ``statement`` is built once, like this module's
    own, as its driver form is kept for it."""
    _run(session.connection(), statement, rows)
