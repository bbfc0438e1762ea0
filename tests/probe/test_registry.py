"""The task-type registry: built-ins, duplicates, suggestions, and third-party types by entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from probe.errors import DuplicateTaskType, UnknownTaskType
from probe.tasktype import Option, TaskType, get_task_type, registry

PLUGIN = '''
from probe.tasktype import Option, Outcome, TaskType


class Echo(TaskType):
    """A third-party task type that echoes its message."""

    name = "echo-plugin"
    summary = "echo a message"
    options = {"message": Option("string", required=True)}

    def run(self, config, ctx):
        return Outcome(True, config["message"])
'''


def test_an_unknown_type_suggests_the_closest_name():
    with pytest.raises(UnknownTaskType, match="did you mean 'command'"):
        get_task_type("commnd")


def test_registering_a_second_type_under_the_same_name_is_an_error():
    class Impostor(TaskType):
        name = "command"

    with pytest.raises(DuplicateTaskType, match="registered twice"):
        registry.add(Impostor)


def test_option_kinds_convert_rendered_strings_and_refuse_wrong_types():
    assert Option("integer").coerce("22") == 22
    assert Option("boolean").coerce("True") is True
    assert Option("duration").coerce("1m") == 60
    assert Option("string|list", items="string").coerce(["a"]) == ["a"]
    assert Option("string").coerce(5) == "5"
    with pytest.raises(ValueError, match="expected integer, got boolean"):
        Option("integer").coerce(True)
    with pytest.raises(ValueError, match="must be one of mysql, sqlite"):
        Option("string", choices=("mysql", "sqlite")).coerce("postgres")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ([["a"]], "item 0 of the list: expected string, got list"),
        (["ls", {"x": 1}], "item 1 of the list: expected string, got mapping"),
        ({"x": 1}, "expected string or list, got mapping"),
    ],
)
def test_a_list_with_a_wrong_item_names_the_item_not_the_list(value: object, says: str):
    with pytest.raises(ValueError) as refused:
        Option("string|list", items="string").coerce(value)
    assert str(refused.value) == says
    with pytest.raises(ValueError, match=r"^item 1 of the list: .*'soon'"):  # the item's own kind explains itself
        Option("list", items="duration").coerce(["1m", "soon"])


def test_a_third_party_type_plugs_in_through_the_entry_point_group(tmp_path: Path):
    (tmp_path / "probe_echo_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "probe_echo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-echo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[probe.tasks]\necho-plugin = probe_echo_plugin:Echo\n")
    workflow = tmp_path / "wf.yaml"
    workflow.write_text("name: p\ntasks:\n  - {name: a, type: echo-plugin, config: {message: from-a-plugin}}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    proc = subprocess.run(
        [sys.executable, "-m", "probe.cli", "run", "--json", "-q", str(workflow)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tasks"][0]["output"] == "from-a-plugin"
