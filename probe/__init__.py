"""probe: load YAML workflows, validate them strictly, and run their tasks with real timeouts.

>>> import probe
>>> workflow = probe.load_workflow("workflow.yaml")
>>> result = probe.run_workflow(workflow, variables={"HOST": "web1"})
>>> result.success
"""

from __future__ import annotations

from probe.errors import ProbeError, Problem, TaskError, TaskStopped, UnknownTaskType, WorkflowError
from probe.results import Status, TaskResult, WorkflowResult
from probe.runner import run_workflow
from probe.tasktype import Option, Outcome, TaskContext, TaskType, get_task_type, register, registry
from probe.workflow import TaskSpec, Workflow, load_workflow

__all__ = [
    "Option",
    "Outcome",
    "ProbeError",
    "Problem",
    "Status",
    "TaskContext",
    "TaskError",
    "TaskResult",
    "TaskSpec",
    "TaskStopped",
    "TaskType",
    "UnknownTaskType",
    "Workflow",
    "WorkflowError",
    "WorkflowResult",
    "get_task_type",
    "load_workflow",
    "register",
    "registry",
    "run_workflow",
]
