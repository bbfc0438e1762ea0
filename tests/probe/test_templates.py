"""Placeholders: the Go-template form, literals, typed values and clear errors."""

from __future__ import annotations

import base64

import pytest

from probe.redact import Redactor
from probe.templates import Scope, TemplateError

SCOPE = Scope(
    {"N": 5, "HOST": "web1", "LIST": [1, 2]},
    {"PW": "pw"},
    {"build": {"output": "ok", "status": "succeeded", "metrics": {"exit_code": 0}}},
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{.N}}", 5),
        ("{{ .N }}", 5),
        ("port {{.N}}", "port 5"),
        ("{{.HOST}}:{{.N}}", "web1:5"),
        ("{{.LIST}}", [1, 2]),
        ("x={{.LIST}}", "x=[1, 2]"),
        ("{{.secrets.PW}}", "pw"),
        ("{{.tasks.build.output}}/{{.tasks.build.status}}", "ok/succeeded"),
        ("{{.tasks.build.metrics.exit_code}}", 0),
        ("docker inspect -f '{{\"{{\"}}.State.Status}}'", "docker inspect -f '{{.State.Status}}'"),
        ("no placeholders", "no placeholders"),
    ],
)
def test_placeholders_render(text, expected):
    assert SCOPE.render(text) == expected


def test_mappings_and_lists_render_inside():
    assert SCOPE.render({"a": ["{{.N}}", {"b": "{{.HOST}}"}], "c": 1}) == {"a": [5, {"b": "web1"}], "c": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{{.MISSING}}", "variable 'MISSING' is not defined"),
        ("{{.secrets.NOPE}}", "secret 'NOPE' was not given"),
        ("{{.tasks.other.output}}", "task 'other' has not run before this task"),
        ("{{ HOST }}", "is not a placeholder this engine understands"),
        ("{{.HOST", 'an opening "{{" has no closing "}}"'),
        ("{{.tasks.build}}", "write task results as"),
    ],
)
def test_bad_placeholders_are_clear_errors(text, message):
    with pytest.raises(TemplateError, match=message.replace("(", r"\(").replace("{", r"\{")):
        SCOPE.render(text)


def test_the_redactor_masks_every_secret_longest_first():
    redactor = Redactor(["abc", "abcdef", ""])
    assert redactor.text("x abcdef y abc") == "x *** y ***"
    assert redactor.value({"k": ["abc", 1]}) == {"k": ["***", 1]}


def test_a_secret_cut_off_at_the_end_of_truncated_output_is_masked():
    assert Redactor(["supersecret"]).cut_text("token=supers") == "token=***"


@pytest.mark.parametrize(
    "shown",
    [
        "download of http://h/tool?token=p4ss%20w%5Crd%7C%27x%22 failed",  # requests quoting a URL again
        "url must be http(s), got '127.0.0.1/api?key=p4ss w\\\\rd|\\'x\"'",  # a repr in an error
        '[{"header": "Bearer p4ss w\\\\rd|\'x\\""}]',  # a JSON string
        "near 'UPDATE t SET token = 'p4ss w\\\\rd|\\'x\\\"' WHERE id = 1'",  # MySQL echoing a bound value
        "q=p4ss+w%5Crd%7C%27x%22&r=1",  # a form-encoded body
    ],
)
def test_a_secret_is_masked_in_the_forms_urls_json_repr_and_sql_give_it(shown: str) -> None:
    secret = "p4ss w\\rd|'x\""
    masked = Redactor([secret]).text(shown)
    assert "***" in masked and "p4ss" not in masked, masked


@pytest.mark.parametrize("before", ["", "u:", "ab:", "admin:"])  # the secret at each place in base64's 3-byte groups
@pytest.mark.parametrize("after", ["", "x", "@host"])
def test_a_secret_is_masked_inside_base64_text_wherever_it_starts(before: str, after: str) -> None:
    secret = "p4ss w\\rd|'x\"~?"
    redactor = Redactor([secret])
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        shown = "Authorization: Basic " + encode((before + secret + after).encode()).decode()
        masked = redactor.text(shown)
        assert "***" in masked, shown
        # left around the mask: the characters of what comes before and after, and at most one more at each end
        head, tail = masked.split("Basic ", 1)[1].split("***")
        assert len(head) <= -(-len(before) * 8 // 6) and len(tail) <= -(-len(after) * 8 // 6) + 3, masked


def test_each_line_of_a_multi_line_secret_is_masked_on_its_own() -> None:
    # output that prefixes or reflows lines (a logger, sed, a shell's error) shows the lines apart
    redactor = Redactor(["-----BEGIN KEY-----\r\nline1QQsecret\nline2WWsecret\n\nab\n"])
    shown = "> -----BEGIN KEY-----\n> line1QQsecret\n> line2WWsecret\nsh: 2: line2WWsecret: not found\nab cd"
    assert redactor.text(shown) == "> ***\n> ***\n> ***\nsh: 2: ***: not found\nab cd"  # too short a line: kept
    assert Redactor(["line1QQsecret\nline2WWsecret"]).text('"line1QQsecret\\nline2WWsecret"') == '"***"'  # whole


def test_a_secret_is_masked_in_lower_and_upper_case() -> None:
    # a host name in a resolver's error is lower case; a hex digest may be written either way
    shown = "host 'zq7kx9secretpw.invalid', ZQ7KX9SECRETPW"
    assert Redactor(["Zq7Kx9SecretPW"]).text(shown) == "host '***.invalid', ***"


def test_short_base64_runs_of_a_secret_are_not_masked_in_other_text() -> None:
    assert Redactor(["abcdef"]).text("YWJjZGVm and YWJj") == "YWJjZGVm and YWJj"  # too short to tell apart
    assert Redactor(["abcdefg"]).text("YWJjZGVmZw==") == "***w=="


def test_secret_names_are_read_as_placeholders_are_parsed() -> None:
    from probe.templates import secret_names

    text = '{{.secrets.A}} {{ .secrets.b-2 }}\n{{.HOST}} {{.tasks.x.output}} {{"{{.secrets.LITERAL}}"}} {{ oops }}'
    assert secret_names(text) == {"A", "b-2"}  # not a variable, a task's result, a literal or a malformed one
