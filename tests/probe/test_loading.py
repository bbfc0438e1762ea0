"""Loading and validating workflow documents: every error names its place and its YAML line."""

from __future__ import annotations

from pathlib import Path

import pytest

import probe
from probe.yamlload import ALIAS_BOMB, MAX_NODES, MULTIPLE_DOCUMENTS

GOOD = """\
name: deploy
description: the example
timeout: 10m
variables:
  HOST: web1
x-defaults: &defaults
  timeout: 30s
tasks:
  - name: build
    type: command
    <<: *defaults
    config:
      command: make
      args: [all]
  - name: check
    type: command
    retries: 2
    retry_delay: 500ms
    continue_on_error: true
    config:
      command: "test -f {{.tasks.build.output}}"
      shell: true
"""


def test_a_valid_workflow_loads_with_its_settings():
    workflow = probe.load_workflow(GOOD)
    assert workflow.name == "deploy"
    assert workflow.timeout == 600
    assert workflow.variables == {"HOST": "web1"}
    build, check = workflow.tasks
    assert build.timeout == 30 and build.config == {"command": "make", "args": ["all"]}
    assert (check.retries, check.retry_delay, check.continue_on_error) == (2, 0.5, True)
    assert workflow.task_types == {"command"}


def test_a_workflow_loads_from_a_file_path(tmp_path: Path):
    path = tmp_path / "wf.yaml"
    path.write_text(GOOD)
    assert probe.load_workflow(path).source == str(path)
    assert probe.load_workflow(str(path)).name == "deploy"


def test_a_missing_required_option_names_the_task_and_the_config_line(load_error):
    error = load_error(
        """\
        name: x
        tasks:
          - name: one
            type: command
            config:
              command: ls
          - name: upload-artifacts
            type: command
            config:
              cwd: /tmp
        """
    )
    assert str(error.problems[0]) == "tasks[1] (upload-artifacts).config: required option 'command' is missing (line 9)"


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            "name: x\ncolour: red\ntasks: [{name: a, type: command, config: {command: ls}}]\n",
            "unknown key 'colour' (line 2)",
        ),
        (
            "name: x\ntasks:\n  - name: a\n    type: comand\n    config: {command: ls}\n",
            "tasks[0] (a).type: unknown task type 'comand'; did you mean 'command'? (line 4)",
        ),
        (
            "name: x\ntasks:\n  - name: a\n    type: command\n    config: {command: ls, argz: []}\n",
            "tasks[0] (a).config: unknown option 'argz'; did you mean 'args'? (line 5)",
        ),
        (  # YAML makes a date of it: no placeholder can render one (the run failed with the option refused)
            "name: x\nvariables:\n  day: 2020-01-01\ntasks:\n  - {name: a, type: command, config: {command: ls}}\n",
            "variables.day: YAML read this value as a date, which is not text, a number, true/false or null: "
            "quote it (line 3)",
        ),
        (
            "name: x\nvariables:\n  v: {a: [1, !!binary aGVsbG8=]}\n"
            "tasks:\n  - {name: a, type: command, config: {command: ls}}\n",
            "variables.v.a[1]: YAML read this value as binary data (!!binary), which is not text, a number, true/false "
            "or null: quote it (line 3)",
        ),
        (
            "name: x\ntasks:\n  - name: a\n    type: command\n    config: {command: ls}\n"
            "  - name: a\n    type: command\n    config: {command: ls}\n",
            "tasks[1] (a): task name 'a' is used twice (first at line 3) (line 6)",
        ),
        (
            "name: x\ntasks:\n  - name: a\n    type: command\n    timeout: 5 minutes\n    config: {command: ls}\n",
            "tasks[0] (a).timeout: expected a duration such as 500ms, 30s, 5m or 1h30m, or a number of seconds, "
            "got '5 minutes' (line 5)",
        ),
        (
            "name: x\ntimeout: 1m\ntasks:\n  - name: a\n    type: command\n    timeout: 1h30m\n"
            "    config: {command: ls}\n",
            "tasks[0] (a).timeout: timeout 1h30m is longer than the workflow's timeout 1m00s (line 6)",
        ),
        (
            "name: x\ntasks:\n  - name: a\n    type: command\n    config:\n      command: ls\n"
            "      expected_exit_codes: zero\n",
            "tasks[0] (a).config.expected_exit_codes: expected list, got string (line 7)",
        ),
        (
            "name: x\ntasks:\n  - name: a\n    type: command\n    config:\n      command: ls\n      shell: maybe\n",
            "tasks[0] (a).config.shell: expected boolean, got string (line 7)",
        ),
        (
            "name: x\ntasks:\n  - name: a\n    type: command\n    retries: many\n    config: {command: ls}\n",
            "tasks[0] (a).retries: retries must be a whole number from 0 to 100 (line 5)",
        ),
        (
            "name: x\ntasks:\n  - name: a\n    type: command\n    config: {command: '{{.tasks.b.output}}'}\n"
            "  - name: b\n    type: command\n    config: {command: ls}\n",
            "tasks[0] (a).config.command: {{.tasks.b.output}} refers to task 'b', which does not run before this task"
            " (line 5)",
        ),
        (
            "name: x\ntasks:\n  - name: a\n    type: command\n    config: {command: '{{ nope }}'}\n",
            "tasks[0] (a).config.command: '{{ nope }}' is not a placeholder this engine understands; use {{.NAME}}"
            " (line 5)",
        ),
        ("name: x\ntasks: []\n", "tasks: a workflow needs a non-empty list of tasks (line 2)"),
        (
            "tasks:\n  - {name: a, type: command, config: {command: ls}}\n",
            "name: a workflow needs a name (a non-empty string) (line 1)",
        ),
        ("name: x\nname: y\ntasks: []\n", "duplicate key 'name' (first at line 1) (line 2)"),
        (
            "name: x\ntasks:\n  - name: a b\n    type: command\n    config: {command: ls}\n",
            "tasks[0] (a b).name: task names are letters, digits, '-' and '_' (line 3)",
        ),
        (
            "name: " + "n" * 201 + "\ntasks:\n  - {name: a, type: command, config: {command: ls}}\n",
            "name: workflow names have at most 200 characters; this one has 201 (line 1)",
        ),
        (
            "name: x\ntasks:\n  - name: " + "t" * 201 + "\n    type: command\n    config: {command: ls}\n",
            "tasks[0].name: task names have at most 200 characters; this one has 201 (line 3)",
        ),
        (
            "name: x\ntasks:\n  - name: a\n    type: command\n    config: {command: ls, shell: true, args: [x]}\n",
            "tasks[0] (a).config: args cannot be used with shell: true; write the whole command line in command"
            " (line 5)",
        ),
    ],
)
def test_each_validation_error_names_its_place_and_line(load_error, document, expected):
    assert expected in [str(p) for p in load_error(document).problems]


def test_every_problem_of_a_document_is_reported_at_once(load_error):
    error = load_error("name: x\nfoo: 1\ntasks:\n  - name: a\n    type: nope\n  - type: command\n")
    assert [p.line for p in error.problems] == [2, 5, 6, 6]
    assert error.line == 2


def test_names_of_the_longest_length_are_accepted():
    workflow = probe.load_workflow(
        "name: " + "n" * 200 + "\ntasks:\n  - {name: " + "t" * 200 + ", type: command, config: {command: ls}}\n"
    )
    assert len(workflow.name) == 200 and len(workflow.tasks[0].name) == 200


def test_keys_starting_with_x_dash_hold_anchors_and_are_allowed():
    workflow = probe.load_workflow(
        "name: x\nx-common: &c {command: ls}\ntasks:\n  - name: a\n    type: command\n    config: *c\n"
    )
    assert workflow.tasks[0].config == {"command": "ls"}


def test_invalid_yaml_reports_its_line(load_error):
    error = load_error("name: x\ntasks:\n  - name: [a\n    type: command\n")
    assert error.line == 4
    assert "invalid YAML" in str(error)


TASK = "tasks:\n  - {name: a, type: command, config: {command: 'true'}}\n"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2001-13-45", "'2001-13-45' cannot be read as timestamp (month must be in 1..12)"),
        ("!!int abc", "'abc' cannot be read as int (invalid literal for int() with base 10: 'abc')"),
        ("!!float xyz", "'xyz' cannot be read as float"),
        ("!!timestamp xyz", "'xyz' cannot be read as timestamp"),
        ("!!bool maybe", "'maybe' cannot be read as bool"),
        ("1" * 5000, "'" + "1" * 40 + "…' cannot be read as int (Exceeds the limit (4300 digits)"),
    ],
)
def test_a_value_its_yaml_tag_cannot_make_is_invalid_yaml_at_its_line(load_error, value, message):
    # PyYAML's constructors raise plain errors, without a line: the workflow's check failed as "cannot be read"
    error = load_error(f"name: x\nx-value: {value}\n{TASK}")
    assert error.line == 2 and message in str(error), str(error)


@pytest.mark.parametrize("task_type", ["http", "downloadexec"])
def test_a_url_python_cannot_split_is_a_problem_of_the_task_at_its_line(load_error, task_type):
    extra = ", sha256: " + "0" * 64 if task_type == "downloadexec" else ""
    error = load_error(
        f"name: x\ntasks:\n  - name: a\n    type: {task_type}\n    config: {{url: 'http://[::1/'{extra}}}\n"
    )
    assert error.line == 5 and "'http://[::1/'" in str(error), str(error)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: x\ntasks:\n  - name: a\n    type: command\n    config:\n      args: [1, 2\n", 6),  # unclosed [
        ('name: x\ntasks:\n  - name: "a\n', 3),  # unclosed quote
        ("name: x\ntasks: [\n", 2),
        ("name: x\ntasks: [a,\n  b,\n", 2),  # where the "[" is, not the last line
        ("name: x\ntasks:\n  - name: a\n    type: command\n    config: {command: ls,\n\n\n", 5),  # not a blank
        ("name: x\ntasks: [\n\n# a comment\n", 2),  # nor a comment
        ("name: x\ntasks:\n  - name: 'it''s [ not a bracket'\n    config: [\n", 4),
    ],
)
def test_yaml_cut_short_reports_the_line_where_the_unclosed_part_starts_not_one_past_the_end(load_error, text, line):
    error = load_error(text)
    assert error.line == line and len(text.splitlines()) >= line


def test_several_documents_are_refused(load_error):
    error = load_error("name: a\ntasks: []\n---\nname: b\ntasks: []\n")
    assert MULTIPLE_DOCUMENTS in str(error)


def test_documents_over_one_mebibyte_are_refused(load_error):
    error = load_error("name: x\n# " + "a" * (1024 * 1024) + "\n")
    assert "limited to 1 MiB" in str(error)


def test_an_alias_expansion_bomb_is_refused_quickly(load_error):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        prev = "a" if level == 1 else f"l{level - 1}"
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*{prev}"] * 9) + "]")
    error = load_error("\n".join(lines) + "\n")
    assert ALIAS_BOMB.format(limit=MAX_NODES) in str(error)


def test_unsafe_yaml_tags_are_not_constructed(load_error):
    error = load_error("name: !!python/object/apply:os.system ['echo pwned']\ntasks: []\n")
    assert "invalid YAML" in str(error)


def test_control_characters_are_refused_with_their_line(load_error):
    error = load_error("name: x\ntasks: []\ndescription: a\x00b\n")
    assert "control characters are not allowed" in str(error)
    assert error.line == 3


def test_an_empty_document_is_refused(load_error):
    assert "empty" in str(load_error("# nothing\n"))


def test_a_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(probe.WorkflowError, match="cannot read"):
        probe.load_workflow(tmp_path / "absent.yaml")


def test_the_workflow_knows_on_which_platforms_it_can_run():
    both = probe.load_workflow("name: x\ntasks:\n  - {name: a, type: command, config: {command: ls}}\n")
    windows = probe.load_workflow(
        "name: x\ntasks:\n  - {name: a, type: command, config: {command: ls}}\n"
        "  - {name: b, type: powershell, config: {script: Get-Date}}\n"
    )
    assert "linux" in both.platforms
    assert windows.platforms == {"windows"}
