"""The built-in task types, one module each, by short name; each is imported only when a workflow uses it."""

from __future__ import annotations

BUILTINS = {
    "command": "probe.tasks.command:CommandTask",
    "db": "probe.tasks.db:DbTask",
    "downloadexec": "probe.tasks.downloadexec:DownloadExecTask",
    "http": "probe.tasks.http:HttpTask",
    "powershell": "probe.tasks.powershell:PowerShellTask",
    "ssh": "probe.tasks.ssh:SSHTask",
}
