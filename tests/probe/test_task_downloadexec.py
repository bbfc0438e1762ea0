"""The downloadexec task type: download from real loopback servers, verify, run, clean up."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

import probe
from probe.results import Status
from probe.tasks import downloadexec
from tests.servers.http import HTTPTestServer

RunYaml = Callable[..., probe.WorkflowResult]

SCRIPT = b'#!/bin/sh\nprintf \'ran with %s\\n\' "$*"\ntouch "$1"\n'
SCRIPT_SHA = hashlib.sha256(SCRIPT).hexdigest()
WRONG_SHA = "ab" * 32


def one_task(config: str, *, timeout: str = "10s") -> str:
    """Return a workflow with one downloadexec task whose config is the given YAML lines."""
    lines = "\n".join(f"      {line}" for line in config.strip().splitlines())
    head = f"name: fetch\ntimeout: 30s\ntasks:\n  - name: run-tool\n    type: downloadexec\n    timeout: {timeout}\n"
    return f"{head}    config:\n{lines}\n"


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make the task's private temporary directories under a directory the test can inspect."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """A file that the served script creates when (and only when) it runs."""
    path = tmp_path / "ran"
    yield path


def test_a_download_with_the_right_checksum_runs_over_https_with_its_arguments(
    https_server: HTTPTestServer, run_yaml: RunYaml, marker: Path, temp_root: Path
) -> None:
    url = https_server.route("/tools/check.sh", body=SCRIPT)
    config = f"url: {url}\nsha256: {SCRIPT_SHA.upper()}\nca_file: {https_server.ca_file}\nargs: ['{marker}', two]"
    task = run_yaml(one_task(config)).tasks[0]
    assert task.status is Status.SUCCEEDED, task.error
    assert task.output == f"ran with {marker} two\n"
    assert marker.exists()
    assert task.metrics["exit_code"] == 0
    assert task.metrics["bytes"] == len(SCRIPT)
    assert isinstance(task.metrics["download_ms"], int)
    assert list(temp_root.iterdir()) == []  # cleanup is on by default


@pytest.mark.parametrize("cleanup", ["true", "false"])
def test_a_wrong_checksum_deletes_the_file_and_never_runs_it(
    http_server: HTTPTestServer, run_yaml: RunYaml, marker: Path, temp_root: Path, cleanup: str
) -> None:
    url = http_server.route("/check.sh", body=SCRIPT)
    config = f"url: {url}\nsha256: {WRONG_SHA}\nallow_insecure_http: true\nargs: ['{marker}']\ncleanup: {cleanup}"
    task = run_yaml(one_task(config)).tasks[0]
    assert task.status is Status.FAILED
    assert task.error == downloadexec.SHA256_MISMATCH.format(expected=WRONG_SHA, actual=SCRIPT_SHA)
    assert task.error == f"sha256 mismatch: expected {WRONG_SHA}, got {SCRIPT_SHA}"
    assert not marker.exists()
    assert list(temp_root.rglob("*")) == []
    assert task.metrics["bytes"] == len(SCRIPT)


def signed(data: bytes, key: SigningKey) -> tuple[str, str]:
    """Return (signature, public key) of ``data``, both base64, as a workflow would hold them."""
    signature = base64.b64encode(key.sign(data).signature).decode()
    return signature, base64.b64encode(bytes(key.verify_key)).decode()


def test_a_good_signature_lets_the_program_run(http_server: HTTPTestServer, run_yaml: RunYaml, marker: Path) -> None:
    url = http_server.route("/check.sh", body=SCRIPT)
    signature, public_key = signed(SCRIPT, SigningKey.generate())
    config = f"""
url: {url}
sha256: {SCRIPT_SHA}
signature: {signature}
public_key: {public_key}
allow_insecure_http: true
args: ['{marker}']
"""
    task = run_yaml(one_task(config)).tasks[0]
    assert task.status is Status.SUCCEEDED, task.error
    assert marker.exists()


def test_a_signature_made_by_another_key_fails_and_the_program_never_runs(
    http_server: HTTPTestServer, run_yaml: RunYaml, marker: Path, temp_root: Path
) -> None:
    url = http_server.route("/check.sh", body=SCRIPT)
    signature, _ = signed(SCRIPT, SigningKey.generate())
    _, other_key = signed(SCRIPT, SigningKey.generate())
    config = f"""
url: {url}
sha256: {SCRIPT_SHA}
signature: {signature}
public_key: {other_key}
allow_insecure_http: true
args: ['{marker}']
"""
    task = run_yaml(one_task(config)).tasks[0]
    assert task.status is Status.FAILED
    assert task.error == downloadexec.SIGNATURE_FAILED
    assert task.error.startswith("signature verification failed")
    assert not marker.exists()
    assert list(temp_root.rglob("*")) == []


KEY = base64.b64encode(bytes(32)).decode()
SIGNATURE = base64.b64encode(bytes(64)).decode()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (f"sha256: {SCRIPT_SHA}\nsignature: {SIGNATURE}", downloadexec.SIGNATURE_WITHOUT_KEY),
        (f"sha256: {SCRIPT_SHA}\npublic_key: {KEY}", downloadexec.KEY_WITHOUT_SIGNATURE),
        (f"sha256: {SCRIPT_SHA}\nsignature: not-base64!\npublic_key: {KEY}", downloadexec.BAD_SIGNATURE),
        (f"sha256: {SCRIPT_SHA}\nsignature: {SIGNATURE}\npublic_key: {SIGNATURE}", downloadexec.BAD_PUBLIC_KEY),
        ("sha256: abc123", downloadexec.BAD_SHA256.format(value="abc123")),
        (f"sha256: {SCRIPT_SHA}\nmax_bytes: 0", downloadexec.BAD_MAX_BYTES.format(value=0)),
    ],
)
def test_inconsistent_verification_options_are_refused_when_the_workflow_loads(
    load_error: Callable[..., Exception], config: str, message: str
) -> None:
    error = load_error(one_task(f"url: https://downloads.example.com/tool.sh\n{config}"))
    assert message in str(error)


def test_plain_http_is_refused_unless_allowed(
    http_server: HTTPTestServer, run_yaml: RunYaml, load_error: Callable[..., Exception], marker: Path
) -> None:
    url = http_server.route("/check.sh", body=SCRIPT)
    refused = downloadexec.INSECURE_URL.format(url=url)
    assert refused in str(load_error(one_task(f"url: {url}\nsha256: {SCRIPT_SHA}")))
    # A URL that comes from a variable is checked when the task runs.
    at_run = run_yaml(one_task(f"url: '{{{{.URL}}}}'\nsha256: {SCRIPT_SHA}"), variables={"URL": url}).tasks[0]
    assert (at_run.status, at_run.error) == (Status.ERROR, refused)
    assert http_server.requests == []
    allowed = run_yaml(one_task(f"url: {url}\nsha256: {SCRIPT_SHA}\nallow_insecure_http: true\nargs: ['{marker}']"))
    assert allowed.tasks[0].status is Status.SUCCEEDED
    assert marker.exists()


def test_a_redirect_from_https_to_plain_http_is_refused(
    https_server: HTTPTestServer, http_server: HTTPTestServer, run_yaml: RunYaml
) -> None:
    target = http_server.route("/check.sh", body=SCRIPT)
    url = https_server.route("/check.sh", status=302, headers={"Location": target})
    task = run_yaml(one_task(f"url: {url}\nsha256: {SCRIPT_SHA}\nca_file: {https_server.ca_file}")).tasks[0]
    assert task.status is Status.ERROR
    assert task.error == downloadexec.REDIRECTED.format(
        url=target, problem=downloadexec.INSECURE_URL.format(url=target)
    )
    assert http_server.requests == []


def test_a_redirect_to_https_is_followed(https_server: HTTPTestServer, run_yaml: RunYaml, marker: Path) -> None:
    https_server.route("/v2/check.sh", body=SCRIPT)
    url = https_server.route("/latest", status=301, headers={"Location": "/v2/check.sh"})
    config = f"url: {url}\nsha256: {SCRIPT_SHA}\nca_file: {https_server.ca_file}\nargs: ['{marker}']"
    assert run_yaml(one_task(config)).tasks[0].status is Status.SUCCEEDED
    assert marker.exists()


@pytest.mark.parametrize("declared", [True, False])
def test_a_download_larger_than_max_bytes_is_aborted(
    http_server: HTTPTestServer, run_yaml: RunYaml, temp_root: Path, declared: bool
) -> None:
    data = b"#!/bin/sh\n" + b"#" * 5000
    body: bytes | list[bytes] = data if declared else [data[:2000], data[2000:]]  # a list streams, undeclared
    url = http_server.route("/big.sh", body=body)
    config = f"url: {url}\nsha256: {hashlib.sha256(data).hexdigest()}\nallow_insecure_http: true\nmax_bytes: 4096"
    task = run_yaml(one_task(config)).tasks[0]
    assert (task.status, task.error) == (Status.ERROR, downloadexec.TOO_LARGE.format(limit=4096))
    assert list(temp_root.rglob("*")) == []


def test_cleanup_false_keeps_the_verified_program_in_a_private_directory(
    http_server: HTTPTestServer, run_yaml: RunYaml, temp_root: Path, marker: Path
) -> None:
    url = http_server.route("/tools/check.sh", body=SCRIPT)
    config = f"url: {url}\nsha256: {SCRIPT_SHA}\nallow_insecure_http: true\ncleanup: false\nargs: ['{marker}']"
    assert run_yaml(one_task(config)).tasks[0].status is Status.SUCCEEDED
    [directory] = temp_root.iterdir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    kept = directory / "check.sh"  # the name, and so the extension, comes from the URL
    assert kept.read_bytes() == SCRIPT
    assert stat.S_IMODE(kept.stat().st_mode) == 0o700


def test_a_program_that_fails_fails_the_task_with_its_stderr(
    http_server: HTTPTestServer, run_yaml: RunYaml, temp_root: Path
) -> None:
    script = b"#!/bin/sh\necho checking\necho 'disk is full' >&2\nexit 3\n"
    url = http_server.route("/fail.sh", body=script)
    config = f"url: {url}\nsha256: {hashlib.sha256(script).hexdigest()}\nallow_insecure_http: true"
    task = run_yaml(one_task(config)).tasks[0]
    assert task.status is Status.FAILED
    assert task.error == "exit code 3 (expected 0): disk is full"
    assert task.output == "checking\ndisk is full\n"
    assert task.metrics["exit_code"] == 3
    assert list(temp_root.iterdir()) == []  # cleaned up after a failure too


def test_a_program_that_outlives_the_timeout_is_killed(
    http_server: HTTPTestServer, run_yaml: RunYaml, tmp_path: Path, temp_root: Path
) -> None:
    script = b'#!/bin/sh\necho $$ > "$1"\nexec sleep 30\n'
    url = http_server.route("/hang.sh", body=script)
    pid_file = tmp_path / "pid"
    sha = hashlib.sha256(script).hexdigest()
    config = f"url: {url}\nsha256: {sha}\nallow_insecure_http: true\nargs: ['{pid_file}']"
    started = time.monotonic()
    task = run_yaml(one_task(config, timeout="1s")).tasks[0]
    assert time.monotonic() - started < 3
    assert (task.status, task.error) == (Status.TIMED_OUT, "timed out (its timeout)")
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    assert list(temp_root.iterdir()) == []


def test_a_download_answered_with_404_is_an_error(http_server: HTTPTestServer, run_yaml: RunYaml) -> None:
    url = f"{http_server.url}/missing.sh"
    task = run_yaml(one_task(f"url: {url}\nsha256: {SCRIPT_SHA}\nallow_insecure_http: true")).tasks[0]
    assert (task.status, task.error) == (Status.ERROR, downloadexec.DOWNLOAD_STATUS.format(url=url, status=404))


def test_a_cancel_stops_a_slow_download_at_once(
    http_server: HTTPTestServer, run_yaml: RunYaml, temp_root: Path
) -> None:
    def slow() -> Iterator[bytes]:
        yield b"#!/bin/sh\n"
        http_server.sleep(30)
        yield b"exit 0\n"

    url = http_server.route("/slow.sh", body=slow())
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    config = f"url: {url}\nsha256: {SCRIPT_SHA}\nallow_insecure_http: true"
    task = run_yaml(one_task(config, timeout="20s"), cancel=cancel).tasks[0]
    assert time.monotonic() - started < 2
    assert (task.status, task.error) == (Status.CANCELLED, "cancelled")
    assert list(temp_root.iterdir()) == []
