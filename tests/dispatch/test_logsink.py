"""The Quickwit forwarder: NDJSON batches in the background, retried on 429 and 5xx, dropped and counted otherwise.

Quickwit cannot be installed here: these tests run against the loopback stand-in of tests/servers/quickwit.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from dispatch.logsink import DROPPED, FAILURES, FORWARDED, LogSink
from tests.servers.http import HTTPTestServer
from tests.servers.quickwit import QuickwitStandIn


def doc(seq: int, **changes: Any) -> dict[str, Any]:
    return {
        "timestamp": "2026-11-28T10:00:00Z",
        "tenant_id": "acme",
        "project_id": "web",
        "job_id": "8f0c4c1e-0000-4000-8000-000000000001",
        "attempt": 1,
        "seq": seq,
        "task": "disk",
        "level": "info",
        "message": f"line {seq}",
        **changes,
    }


def counted(metric: Any, **labels: str) -> float:
    return sum(
        s.value
        for family in metric.collect()
        for s in family.samples
        if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
def sinks() -> Iterator[list[LogSink]]:
    made: list[LogSink] = []
    yield made
    for sink in made:
        sink.close()


def fast_sink(sinks: list[LogSink], url: str, index: str = "automation-logs", **options: Any) -> LogSink:
    sink = LogSink(url, index, timeout=5, backoff=0.01, max_backoff=0.05, **options)
    sinks.append(sink)
    return sink


def test_documents_arrive_as_one_ndjson_batch(quickwit_server: QuickwitStandIn, sinks: list[LogSink]) -> None:
    sink = fast_sink(sinks, quickwit_server.url)
    before = counted(FORWARDED)
    sink.submit([doc(1), doc(2, message='ünïcode "quoted"\nnext')])
    assert sink.flush(30)
    assert len(quickwit_server.ingests) == 1
    lines = quickwit_server.ingests[0].decode().split("\n")
    assert lines[-1] == "" and [json.loads(raw) for raw in lines[:-1]] == [
        doc(1),
        doc(2, message='ünïcode "quoted"\nnext'),
    ]
    assert counted(FORWARDED) == before + 2


def test_a_429_then_a_503_are_retried_until_quickwit_takes_the_batch(
    quickwit_server: QuickwitStandIn, sinks: list[LogSink]
) -> None:
    sink = fast_sink(sinks, quickwit_server.url)
    busy, down = counted(FAILURES, status="429"), counted(FAILURES, status="503")
    quickwit_server.fail_ingest(429, 503)
    sink.submit([doc(1), doc(2)])
    assert sink.flush(30)
    assert len(quickwit_server.ingests) == 3 and [d["seq"] for d in quickwit_server.documents] == [1, 2]
    assert counted(FAILURES, status="429") == busy + 1 and counted(FAILURES, status="503") == down + 1


def test_a_refused_batch_is_dropped_at_once_and_counted(quickwit_server: QuickwitStandIn, sinks: list[LogSink]) -> None:
    before = counted(DROPPED, reason="rejected")
    bad = fast_sink(sinks, quickwit_server.url)
    bad.submit([doc(1, tenant_id=None), doc(2)])  # the stand-in refuses a document without its tenant
    assert bad.flush(30)
    unknown = fast_sink(sinks, quickwit_server.url, index="no-such-index")
    unknown.submit([doc(3)])
    assert unknown.flush(30)
    assert len(quickwit_server.ingests) == 1 and quickwit_server.documents == []  # never retried
    assert counted(DROPPED, reason="rejected") == before + 3


def test_retries_end_and_the_batch_is_counted_as_undeliverable(
    quickwit_server: QuickwitStandIn, sinks: list[LogSink]
) -> None:
    sink = fast_sink(sinks, quickwit_server.url, retries=2)
    before, unreachable = counted(DROPPED, reason="undeliverable"), counted(FAILURES, status="unreachable")
    quickwit_server.stop()
    sink.submit([doc(1), doc(2)])  # returns at once although nothing listens
    assert sink.flush(30)
    assert counted(DROPPED, reason="undeliverable") == before + 2
    assert counted(FAILURES, status="unreachable") == unreachable + 3  # the first try and two retries


def test_a_full_queue_drops_what_does_not_fit_without_blocking(
    http_server: HTTPTestServer, sinks: list[LogSink]
) -> None:
    http_server.route("/api/v1/automation-logs/ingest", method="POST", body="{}", delay=60)  # a stuck Quickwit
    sink = fast_sink(sinks, http_server.url, max_queue=2, batch_size=1)
    before = counted(DROPPED, reason="queue_full")
    sink.submit([doc(1)])
    while not http_server.requests:  # the thread took doc 1 and is stuck sending it
        assert not sink.flush(0.01)
    sink.submit([doc(2), doc(3), doc(4), doc(5)])
    assert counted(DROPPED, reason="queue_full") == before + 2
    http_server.close()  # releases the stuck request


def test_a_forked_child_forwards_with_its_own_thread(quickwit_server: QuickwitStandIn, sinks: list[LogSink]) -> None:
    sink = fast_sink(sinks, quickwit_server.url)
    sink.submit([doc(1)])
    assert sink.flush(30)
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread does not exist here
        try:
            sink.submit([doc(2)])
            os._exit(0 if sink.flush(20) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [d["seq"] for d in quickwit_server.documents] == [1, 2]


def test_submit_never_raises(sinks: list[LogSink]) -> None:
    sink = fast_sink(sinks, "http://127.0.0.1:1", retries=0)
    sink.submit([{"not": object()}])  # not JSON-serialisable: dropped by the thread, never raised to the caller
    assert sink.flush(30)
