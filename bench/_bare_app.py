"""The bare Flask + Flask-SQLAlchemy app that ``bench/submit.py`` loads next to the control plane (gunicorn runs
``_bare_app:bare_app()``), and the workflow both of them receive.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from _platform import envelope_payload
from celery import Celery
from flask import Flask, Response, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, Text, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dispatch.contract import celery_priority, celery_settings

BARE_TASK = "bench.submitted"  # nobody consumes it: the messages wait in Valkey, as the platform's do
BARE_QUEUE = "bench.bare.submit"
WORKFLOW = """\
name: bench
tasks:
  - name: kernel
    type: command
    config:
      command: uname -a
  - name: disk
    type: command
    config:
      command: df -h
  - name: uptime
    type: command
    config:
      command: uptime
"""


class BareBase(DeclarativeBase):
    """The bare app's declarative base."""


class BareRow(BareBase):
    """The one row the bare endpoint inserts per request."""

    __tablename__ = "bare_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)


def bare_app() -> Flask:
    """The ceiling: Flask + Flask-SQLAlchemy, one JSON endpoint that inserts one row (gunicorn entry point).

    With ``VALKEY_URL`` set, the endpoint then sends a Celery task with the platform's settings, carrying a
    signed envelope of the bench's workflow (the platform's message, signed once here rather than per request).
    """
    db = SQLAlchemy(model_class=BareBase)
    app = Flask(__name__)
    url = os.environ["DATABASE_URL"]
    celery: Celery | None = None
    payload: dict[str, str] = {}
    if os.environ.get("VALKEY_URL"):
        celery = Celery("bench-bare-submit")
        celery.conf.update(celery_settings(os.environ["VALKEY_URL"]))
        payload = envelope_payload(WORKFLOW)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = (
        {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    db.init_app(app)

    @app.post("/insert")
    def insert() -> tuple[Response, int]:
        data = request.get_json()
        row = BareRow(name="bench", body=data["workflow"])
        db.session.add(row)
        db.session.commit()
        if celery is not None:
            celery.send_task(
                BARE_TASK, kwargs=payload, queue=BARE_QUEUE, task_id=str(uuid.uuid4()), priority=celery_priority(5)
            )
        return jsonify({"id": row.id}), 201

    with app.app_context():
        if url.startswith("sqlite"):  # the same pragmas as the control plane, for a fair ceiling

            @event.listens_for(db.engine, "connect")
            def _pragmas(connection: Any, _record: Any) -> None:
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()

        db.create_all()
    return app
