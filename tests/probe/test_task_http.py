"""The http task type against real HTTP and HTTPS servers on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import probe
from probe.results import Status
from probe.tasks import _web
from probe.tasks import http as http_task
from probe.tasktype import TaskContext
from tests.servers.http import HTTPTestServer, ReceivedRequest

RunYaml = Callable[..., probe.WorkflowResult]


def one_task(config: str, *, timeout: str = "5s") -> str:
    """Return a workflow with one http task whose config is the given YAML lines."""
    lines = "\n".join(f"      {line}" for line in config.strip().splitlines())
    head = f"name: web\ntimeout: 30s\ntasks:\n  - name: call\n    type: http\n    timeout: {timeout}\n"
    return f"{head}    config:\n{lines}\n"


def run_direct(config: dict[str, object], ctx: TaskContext) -> probe.Outcome:
    """Run the task type without the engine, with its defaults filled in as the engine would."""
    defaults = {k: o.default for k, o in http_task.HttpTask.options.items() if o.default is not None}
    return http_task.HttpTask().run({**defaults, **config}, ctx)


def context(seconds: float = 10.0, output_limit: int = 65536) -> TaskContext:
    return TaskContext(task="t", deadline=time.monotonic() + seconds, output_limit=output_limit)


def abort_later(ctx: TaskContext, after: float, reason: str = "cancelled") -> threading.Thread:
    thread = threading.Timer(after, ctx.abort, args=(reason,))
    thread.start()
    return thread


def test_a_get_that_answers_200_succeeds_with_the_body_as_output_and_metrics(
    http_server: HTTPTestServer, run_yaml: RunYaml
) -> None:
    http_server.route("/health", body="all good\n")
    result = run_yaml(one_task('url: "{{.BASE}}/health"\nexpected_status: [200]'), variables={"BASE": http_server.url})
    task = result.tasks[0]
    assert task.status is Status.SUCCEEDED, task.error
    assert task.output == "all good\n"
    assert task.metrics["status_code"] == 200
    assert task.metrics["bytes"] == 9
    assert isinstance(task.metrics["elapsed_ms"], int)
    assert [r.method for r in http_server.requests] == ["GET"]


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_any_2xx_status_succeeds_when_no_status_is_expected(
    http_server: HTTPTestServer, run_yaml: RunYaml, status: int
) -> None:
    url = http_server.route("/x", status=status)
    assert run_yaml(one_task(f"url: {url}")).tasks[0].status is Status.SUCCEEDED


def test_a_503_fails_the_default_check_and_says_what_was_expected(
    http_server: HTTPTestServer, run_yaml: RunYaml
) -> None:
    url = http_server.route("/down", status=503, body="maintenance")
    task = run_yaml(one_task(f"url: {url}")).tasks[0]
    assert task.status is Status.FAILED
    assert task.error == "expected a 2xx status, got 503"
    assert task.output == "maintenance"
    assert task.metrics["status_code"] == 503


def test_a_status_outside_the_expected_list_fails_with_both_statuses(
    http_server: HTTPTestServer, run_yaml: RunYaml
) -> None:
    url = http_server.route("/down", status=503)
    task = run_yaml(one_task(f"url: {url}\nexpected_status: [200]")).tasks[0]
    assert task.error == http_task.STATUS_MISMATCH.format(expected="status 200", status=503)
    assert task.error == "expected status 200, got 503"
    task = run_yaml(one_task(f"url: {url}\nexpected_status: [200, 201, 204]")).tasks[0]
    assert task.error == "expected status 200, 201 or 204, got 503"


def test_an_expected_non_2xx_status_succeeds_and_one_integer_is_accepted(
    http_server: HTTPTestServer, run_yaml: RunYaml
) -> None:
    url = http_server.route("/gone", status=404)
    assert run_yaml(one_task(f"url: {url}\nexpected_status: [404, 410]")).tasks[0].status is Status.SUCCEEDED
    assert run_yaml(one_task(f"url: {url}\nexpected_status: 404")).tasks[0].status is Status.SUCCEEDED


def test_expected_body_text_must_be_in_the_body(http_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    url = http_server.route("/status", body='{"db": "up", "cache": "down"}')
    ok = run_yaml(one_task(f'url: {url}\nexpected_body_contains: \'"db": "up"\'')).tasks[0]
    assert ok.status is Status.SUCCEEDED
    missing = run_yaml(one_task(f'url: {url}\nexpected_body_contains: \'"cache": "up"\'')).tasks[0]
    assert missing.status is Status.FAILED
    assert missing.error == http_task.BODY_MISSING.format(text='"cache": "up"')


def test_a_large_body_is_counted_whole_kept_to_the_output_limit_and_searched_to_its_end(
    http_server: HTTPTestServer,
) -> None:
    chunks = [b"x" * 50_000 for _ in range(4)] + [b"THE END"]  # streamed, so the needle spans no chunk edge
    url = http_server.route("/big", body=chunks)
    outcome = run_direct({"url": url, "expected_body_contains": "xxTHE END"}, context(output_limit=1000))
    assert outcome.ok, outcome.error
    assert outcome.metrics["bytes"] == 200_007
    assert outcome.output == "x" * 1000
    assert outcome.truncated_bytes == 199_007


def test_the_output_limit_ends_with_the_engines_truncation_marker(
    http_server: HTTPTestServer,
) -> None:
    url = http_server.route("/big", body="y" * 100_000)
    result = probe.run_workflow(probe.load_workflow(one_task(f"url: {url}")), output_limit=100)
    task = result.tasks[0]
    assert task.status is Status.SUCCEEDED
    assert task.output.startswith("y" * 100 + "\n[... output truncated: 99900 more bytes")
    assert task.metrics["bytes"] == 100_000


def test_a_json_body_is_posted_as_json_with_its_content_type(http_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    url = http_server.route("/items", method="POST", status=201)
    config = f"url: {url}\nmethod: post\njson: {{name: web1, tags: [a, b], port: 8080}}"
    assert run_yaml(one_task(config)).tasks[0].status is Status.SUCCEEDED
    request = http_server.requests[0]
    assert request.method == "POST"
    assert request.header("content-type") == "application/json"
    assert json.loads(request.body) == {"name": "web1", "tags": ["a", "b"], "port": 8080}


def test_a_string_body_and_headers_are_sent_as_they_are(http_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    url = http_server.route("/raw", method="PUT")
    config = f"""
url: {url}
method: PUT
headers: {{X-Token: abc123, Content-Type: text/plain, X-Count: 3}}
body: "héllo\\nworld"
"""
    assert run_yaml(one_task(config)).tasks[0].status is Status.SUCCEEDED
    request = http_server.requests[0]
    assert request.body == "héllo\nworld".encode()
    assert request.header("x-token") == "abc123"
    assert request.header("content-type") == "text/plain"
    assert request.header("x-count") == "3"


def test_body_and_json_together_are_refused_when_the_workflow_loads(load_error: Callable[..., Exception]) -> None:
    error = load_error(one_task("url: http://127.0.0.1:1/\nbody: a\njson: {a: 1}"))
    assert http_task.BODY_AND_JSON in str(error)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("url: ftp://example.com/file", http_task.BAD_URL.format(url="ftp://example.com/file")),
        ("url: http://127.0.0.1/\nmethod: 'GET /x'", http_task.BAD_METHOD.format(method="GET /x")),
        ("url: http://127.0.0.1/\nexpected_status: [200, 700]", http_task.BAD_STATUS.format(status=700)),
        ("url: https://127.0.0.1/\nverify_tls: false\nca_file: /ca.pem", http_task.CA_FILE_UNUSED),
    ],
)
def test_impossible_options_are_refused_when_the_workflow_loads(
    load_error: Callable[..., Exception], config: str, message: str
) -> None:
    assert message in str(load_error(one_task(config)))


def test_redirects_are_followed_by_default_and_not_when_turned_off(
    http_server: HTTPTestServer, run_yaml: RunYaml
) -> None:
    target = http_server.route("/new", body="moved here")
    old = http_server.route("/old", status=302, headers={"Location": target})
    followed = run_yaml(one_task(f"url: {old}")).tasks[0]
    assert (followed.status, followed.output) == (Status.SUCCEEDED, "moved here")
    not_followed = run_yaml(one_task(f"url: {old}\nfollow_redirects: false")).tasks[0]
    assert (not_followed.status, not_followed.error) == (Status.FAILED, "expected a 2xx status, got 302")
    expected = run_yaml(one_task(f"url: {old}\nfollow_redirects: false\nexpected_status: [302]")).tasks[0]
    assert expected.status is Status.SUCCEEDED
    assert [r.path for r in http_server.requests] == ["/old", "/new", "/old", "/old"]


def test_a_self_signed_certificate_is_refused_by_default_with_a_hint(
    https_server: HTTPTestServer, run_yaml: RunYaml
) -> None:
    url = https_server.route("/secure", body="secret")
    task = run_yaml(one_task(f"url: {url}")).tasks[0]
    assert task.status is Status.ERROR
    assert task.error is not None
    assert task.error.startswith("TLS certificate verification failed for 127.0.0.1:")
    assert task.error.endswith(http_task.TLS_HINT)
    assert https_server.requests == []


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verify_tls_false_accepts_any_certificate(https_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    url = https_server.route("/secure", body="secret")
    task = run_yaml(one_task(f"url: {url}\nverify_tls: false")).tasks[0]
    assert (task.status, task.output) == (Status.SUCCEEDED, "secret")


def test_ca_file_trusts_the_servers_ca(https_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    url = https_server.route("/secure", body="secret")
    task = run_yaml(one_task(f"url: {url}\nca_file: {https_server.ca_file}")).tasks[0]
    assert (task.status, task.output) == (Status.SUCCEEDED, "secret")
    by_name = url.replace("127.0.0.1", "localhost")
    assert run_yaml(one_task(f"url: {by_name}\nca_file: {https_server.ca_file}")).tasks[0].success


def test_a_missing_ca_file_is_a_clear_error(https_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    task = run_yaml(one_task(f"url: {https_server.url}/\nca_file: /nonexistent/ca.pem")).tasks[0]
    assert task.status is Status.ERROR
    assert task.error is not None and task.error.startswith("cannot load ca_file /nonexistent/ca.pem")


def test_a_refused_connection_is_an_error_that_says_so(run_yaml: RunYaml) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        task = run_yaml(one_task(f"url: http://127.0.0.1:{port}/")).tasks[0]
    assert task.status is Status.ERROR
    assert task.error == _web.CONNECTION_REFUSED.format(where=f"127.0.0.1:{port}")


def test_a_host_that_does_not_resolve_is_an_error_that_names_it(run_yaml: RunYaml) -> None:
    task = run_yaml(one_task("url: http://no-such-host.invalid/")).tasks[0]
    assert task.status is Status.ERROR
    assert task.error is not None and task.error.startswith("cannot resolve host 'no-such-host.invalid'")


def test_a_slow_server_is_stopped_at_the_task_timeout(http_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    url = http_server.route("/slow", body="late", delay=30)
    started = time.monotonic()
    task = run_yaml(one_task(f"url: {url}", timeout="1s")).tasks[0]
    assert time.monotonic() - started < 3  # the abort, not requests' own backstop timeout (6 s)
    assert task.status is Status.TIMED_OUT
    assert task.error == "timed out (its timeout)"  # not "abandoned": the request really stopped


def test_the_timeout_option_limits_the_request_too(http_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    url = http_server.route("/slow", body="late", delay=30)
    started = time.monotonic()
    task = run_yaml(one_task(f"url: {url}\ntimeout: 500ms", timeout="20s")).tasks[0]
    assert time.monotonic() - started < 3
    assert task.status is Status.TIMED_OUT


def test_a_cancel_from_another_thread_stops_a_request_at_once(http_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    url = http_server.route("/slow", body="late", delay=30)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    result = run_yaml(one_task(f"url: {url}", timeout="20s"), cancel=cancel)
    assert time.monotonic() - started < 3
    assert result.tasks[0].status is Status.CANCELLED
    assert result.tasks[0].error == "cancelled"


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full, so a new connection hangs in its TCP handshake."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = []
    for _ in range(4):  # fill the queue until a connection hangs
        sock = socket.socket()
        sock.settimeout(0.2)
        held.append(sock)
        try:
            sock.connect(("127.0.0.1", port))
        except TimeoutError:
            break
    try:
        yield port
    finally:
        for sock in held:
            sock.close()
        listener.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never sends a byte (a TLS handshake waits forever)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_an_abort_ends_a_request_within_a_second_at_every_stage(
    http_server: HTTPTestServer, full_backlog: int, silent_server: int
) -> None:
    def trickle(request: ReceivedRequest) -> tuple[int, dict[str, str], Iterator[bytes]]:
        def body() -> Iterator[bytes]:
            yield b"first part"
            http_server.sleep(30)
            yield b"never"

        return 200, {}, body()

    stages = {
        "connecting": f"http://127.0.0.1:{full_backlog}/",
        "in the TLS handshake": f"https://127.0.0.1:{silent_server}/",
        "waiting for headers": http_server.route("/slow", delay=30),
        "reading the body": http_server.route("/trickle", body=trickle),
    }
    for stage, url in stages.items():
        ctx = context(seconds=60)
        abort_later(ctx, 0.5)
        started = time.monotonic()
        with pytest.raises(probe.TaskStopped):
            run_direct({"url": url}, ctx)
        assert time.monotonic() - started < 2.5, stage


def test_an_abort_before_the_request_starts_stops_it_at_once(http_server: HTTPTestServer) -> None:
    url = http_server.route("/ok", body="ok")
    ctx = context()
    ctx.abort("cancelled")
    with pytest.raises(probe.TaskStopped):
        run_direct({"url": url}, ctx)
    assert http_server.requests == []


def test_a_head_request_has_no_body(http_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    url = http_server.route("/h", method="HEAD", body="not sent")
    task = run_yaml(one_task(f"url: {url}\nmethod: HEAD")).tasks[0]
    assert (task.status, task.output, task.metrics["bytes"]) == (Status.SUCCEEDED, "", 0)


def test_a_body_in_the_charset_its_content_type_names_is_decoded_and_searched_in_it(
    http_server: HTTPTestServer, run_yaml: RunYaml
) -> None:
    headers = {"Content-Type": "text/plain; charset=ISO-8859-1"}
    url = http_server.route("/latin", body="café crème".encode("latin-1"), headers=headers)
    task = run_yaml(one_task(f"url: {url}\nexpected_body_contains: crème")).tasks[0]
    assert (task.status, task.output) == (Status.SUCCEEDED, "café crème")


def test_a_secret_in_the_url_stays_out_of_debug_logs(
    http_server: HTTPTestServer, run_yaml: RunYaml, caplog: pytest.LogCaptureFixture
) -> None:
    from dispatch.logs import configure_logging

    http_server.route("/ok", body="fine\n")
    secret = "api-key-7c1f9e"
    configure_logging(component="test", level="DEBUG")  # what an agent does with LOG_LEVEL=DEBUG
    try:
        with caplog.at_level("DEBUG", logger="probe"):
            result = run_yaml(
                one_task('url: "{{.BASE}}/ok?api_key={{.secrets.KEY}}"'),
                variables={"BASE": http_server.url},
                secrets={"KEY": secret},
            )
    finally:
        configure_logging(component="test", level="INFO")
    assert result.tasks[0].status is Status.SUCCEEDED, result.tasks[0].error
    assert any(r.name == "probe.tasks.http" for r in caplog.records)  # the request's debug line was written
    assert secret not in caplog.text, caplog.text  # neither in it nor in urllib3's


@pytest.mark.parametrize(
    ("url", "secret", "error"),
    [
        # the resolver's error names the host in lower case
        ("http://{{.secrets.PW}}.invalid/x", "Zq7Kx9SecretPW", "cannot resolve host '***.invalid'"),
        # a '/' in a password ends the URL's host early: what follows it up to the '@' would be shown as a port
        ("http://user:{{.secrets.PW}}@127.0.0.1:1/x", "Ab1/Xy9zSecret", "the URL's host or port is not valid"),
        ("http://127.0.0.1:{{.secrets.PW}}/x", "Zq7Kx9SecretPW", "the URL's host or port is not valid"),
    ],
)
def test_no_part_of_a_secret_in_a_url_shows_in_the_error_of_a_request_that_cannot_be_made(
    run_yaml: RunYaml, caplog: pytest.LogCaptureFixture, url: str, secret: str, error: str
) -> None:
    with caplog.at_level("DEBUG", logger="probe"):  # urllib3's debug lines: see the test above
        task = run_yaml(one_task(f'url: "{url}"'), secrets={"PW": secret}).tasks[0]
    assert task.status is Status.ERROR and error in (task.error or ""), task.error
    assert "internal error" not in (task.error or "")
    for part in {secret, secret.lower(), *secret.split("/")}:
        assert part not in (task.error or "") and part not in caplog.text, (part, task.error, caplog.text)
