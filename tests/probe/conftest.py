"""Helpers for the probe tests: write a workflow, run it, collect its events."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

import pytest

import probe


@pytest.fixture
def run_yaml() -> Callable[..., probe.WorkflowResult]:
    """Load a workflow from (dedented) YAML text and run it with the given keyword arguments."""

    def run(text: str, **kwargs: Any) -> probe.WorkflowResult:
        return probe.run_workflow(probe.load_workflow(textwrap.dedent(text)), **kwargs)

    return run


@pytest.fixture
def load_error() -> Callable[[str], probe.WorkflowError]:
    """Load (dedented) YAML text that must be invalid and return the error."""

    def load(text: str) -> probe.WorkflowError:
        with pytest.raises(probe.WorkflowError) as info:
            probe.load_workflow(textwrap.dedent(text))
        return info.value

    return load
