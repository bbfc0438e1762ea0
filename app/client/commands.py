"""``automation jobs ...``, ``automation agents list`` and ``automation secrets ...``: the operator's commands, over
the REST API."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt

from app.client import render, watch
from app.client.http import (
    INTERRUPTED,
    NOT_COMPLETED,
    OK,
    ApiError,
    Client,
    ClientError,
    UsageError,
)

EXIT_CODES = """\
exit codes:
  0    success; with --wait and for watch: the job completed
  1    with --wait and for watch: the job ended otherwise (failed, timed_out, cancelled, dead_letter)
  2    usage error: bad arguments, an unreadable workflow file, CONTROL_PLANE_URL or JWT_TOKEN not set
  3    the API refused the request (4xx): no such job, access denied, invalid token, invalid workflow...
  4    the control plane cannot be reached or failed (5xx)
  130  interrupted (Ctrl-C)

configured by CONTROL_PLANE_URL and JWT_TOKEN (and CONTROL_PLANE_CA_FILE for a private CA); see docs/CLI.md
"""
ID_HELP = "the job's id, or enough of its start to name one job (the 8 characters `jobs watch` prints)"
STATES = ("pending", "queued", "running", "completed", "failed", "timed_out", "cancelled", "dead_letter")
LOG_PAGE = 500
LOG_WAIT = 25  # seconds the server may hold a follow request (the contract allows 30)
UNREADABLE = "cannot read the workflow file {path}: {problem}"
BAD_VAR = "--var {item!r}: expected NAME=VALUE"
MAX_AGENTS = 100  # jobs one POST /jobs/batch takes (the API's MAX_BATCH_JOBS; the client loads no app module)
TOO_MANY_AGENTS = "--agent: at most {limit} agents at once, not {count}"
POLLING = "automation: the control plane serves no live events for this job ({why}); polling it every second"
NO_LOG_ROUTE = "automation: the control plane does not serve job logs; showing the tasks' output instead"
TRUNCATED = "automation: the control plane truncated this job's log (it keeps a bounded number of lines per job)"

WHOLE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ID_START = re.compile(r"[0-9a-f-]{4,35}")
NO_JOB_STARTS = "no job of yours has an id that starts with {start!r}"
AMBIGUOUS_ID = "{start!r} starts the ids of several jobs ({ids}, ...): give more of the id"

NO_VALUE = 'no value: pipe it in (printf %s "$VALUE" | automation secrets set NAME ...) or use --from-env VARIABLE'
NO_VARIABLE = "--from-env {name}: that variable is not set"
NO_TENANT = "--tenant: the token names no tenant to default to"

Handler = Callable[[Client, argparse.Namespace], int]


def _out(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _line(data: Any) -> None:
    print(json.dumps(data), flush=True)


def whole_job_id(client: Client, given: str) -> str:
    """The id of the one job whose id starts with ``given`` (the first 8 characters, as `jobs watch` prints them,
    are enough while no other job shares them); a whole id as it is (in lower case); ``given`` itself when it is
    no start of an id (the API then answers for it), or when the control plane cannot look ids up by their start
    or the token may not list jobs (an agent's)."""
    start = given.strip().lower()
    if WHOLE_ID.fullmatch(start):
        return start
    if not ID_START.fullmatch(start):
        return given
    try:
        page = client.call("GET", "/jobs", params={"id_prefix": start, "limit": 2})
    except ApiError as exc:
        if exc.status not in (400, 403):  # an older control plane (no id_prefix); a token that may not list jobs
            raise
        return given
    ids = [str(job["job_id"]) for job in page.get("jobs") or []]
    if not ids:
        raise ApiError(404, "not_found", NO_JOB_STARTS.format(start=start))
    if len(ids) > 1:
        raise UsageError(AMBIGUOUS_ID.format(start=start, ids=", ".join(ids)))
    return ids[0]


def read_workflow(path: str) -> str:
    """The workflow file's text (``-``: standard input)."""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(UNREADABLE.format(path=path, problem=getattr(exc, "strerror", None) or exc)) from None


def parse_vars(items: list[str] | None) -> dict[str, str]:
    """``--var K=V`` (repeated) as a mapping; the last value of a name wins."""
    variables: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(BAD_VAR.format(item=item))
        variables[name.strip()] = value
    return variables


def follow(client: Client, job_id: str, *, as_json: bool, final_json: bool = False) -> int:
    """Show a job's live events until it ends; 0 when it completed, 1 otherwise."""
    path = watch.job_path(job_id)
    state: Any = None
    if as_json and final_json:
        job = _finished(client, job_id)
        _out(job)
        return OK if job.get("state") == "completed" else NOT_COMPLETED
    if as_json:
        for event in watch.events(client, job_id):
            state = event.get("state")
            _line(event)
        return OK if state == "completed" else NOT_COMPLETED
    progress = render.Progress(sys.stdout, job_id)
    try:
        for event in watch.events(
            client, job_id, on_fallback=lambda why: print(POLLING.format(why=why), file=sys.stderr)
        ):
            progress(event)
        job = client.call("GET", path)
        progress.final(job)
    finally:
        progress.close()
    return OK if job.get("state") == "completed" else NOT_COMPLETED


def _finished(client: Client, job_id: str) -> dict[str, Any]:
    """Wait for a job's live events to end, then read it."""
    for _event in watch.events(client, job_id):
        pass
    return dict(client.call("GET", watch.job_path(job_id)))


def jobs_submit(client: Client, args: argparse.Namespace) -> int:
    """POST the workflow file as a job (one per --agent, in one batch); with --wait, follow them to their end."""
    body: dict[str, Any] = {"workflow": read_workflow(args.file)}
    variables = parse_vars(args.var)
    if variables:
        body["variables"] = variables
    for field, value in (("project_id", args.project), ("priority", args.priority)):
        if value is not None:
            body[field] = value
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    agents = list(dict.fromkeys(args.agent or []))  # in order, each once
    if len(agents) > MAX_AGENTS:
        raise UsageError(TOO_MANY_AGENTS.format(limit=MAX_AGENTS, count=len(agents)))
    if len(agents) > 1:
        return _submit_batch(client, args, [{**body, "agent_id": agent} for agent in agents], headers)
    if agents:
        body["agent_id"] = agents[0]
    job = client.call("POST", "/jobs", body=body, headers=headers)
    _warn(job)
    if not args.wait:
        if args.json:
            _out(job)
        else:
            print(f"submitted job {job['job_id']} ({job.get('name')}): {job.get('state')}")
        return OK
    if not args.json:
        print(f"submitted job {job['job_id']} ({job.get('name')})", flush=True)
    return follow(client, job["job_id"], as_json=args.json, final_json=True)


def _warn(job: dict[str, Any]) -> None:
    """Print what the control plane warns about a job just submitted (no agent online to run it…), on stderr."""
    for warning in job.get("warnings") or ():
        print(f"warning: job {job.get('job_id')}: {warning}", file=sys.stderr)


def _submit_batch(
    client: Client, args: argparse.Namespace, entries: list[dict[str, Any]], headers: dict[str, str] | None
) -> int:
    """One job per agent through ``POST /jobs/batch``; with --wait, follow each in turn (they run meanwhile)."""
    jobs = client.call("POST", "/jobs/batch", body={"jobs": entries}, headers=headers)["jobs"]
    for job in jobs:
        _warn(job)
    if args.json and not args.wait:
        _out({"jobs": jobs})
        return OK
    for job in jobs:  # with --wait --json on stderr: the ids are known even if following is cut short
        line = f"submitted job {job['job_id']} ({job.get('name')}) to {job.get('agent_id')}: {job.get('state')}"
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)
    if not args.wait:
        return OK
    status, finals = OK, []
    for job in jobs:
        if args.json:
            finals.append(_finished(client, job["job_id"]))
            ended = finals[-1].get("state") == "completed"
        else:
            print(f"{job.get('agent_id')}:", flush=True)
            ended = follow(client, job["job_id"], as_json=False) == OK
        status = status if ended else NOT_COMPLETED
    if args.json:
        _out({"jobs": finals})
    return status


def jobs_list(client: Client, args: argparse.Namespace) -> int:
    """GET /api/v1/jobs as a table, newest first."""
    params = {
        "limit": args.limit,
        "state": args.state,
        "agent_id": args.agent,
        "ran_on": args.ran_on,
        "project_id": args.project,
    }
    page = client.call("GET", "/jobs", params={k: v for k, v in params.items() if v is not None})
    if args.json:
        _out(page)
        return OK
    jobs = page.get("jobs") or []
    print(render.jobs_table(jobs) if jobs else "no jobs")
    if page.get("total", 0) > len(jobs):
        print(f"({len(jobs)} of {page['total']}; --limit shows more)")
    return OK


def jobs_get(client: Client, args: argparse.Namespace) -> int:
    """GET one job: its state, target, times, error and tasks."""
    job = client.call("GET", watch.job_path(args.job_id))
    if args.json:
        _out(job)
    else:
        print(render.job_view(job, render.Style(sys.stdout)))
    return OK


def jobs_watch(client: Client, args: argparse.Namespace) -> int:
    """Follow a job live until it ends."""
    return follow(client, args.job_id, as_json=args.json)


def jobs_cancel(client: Client, args: argparse.Namespace) -> int:
    """POST /api/v1/jobs/{id}/cancel."""
    body = {"reason": args.reason} if args.reason else None
    response = client.send("POST", watch.job_path(args.job_id) + "/cancel", body=body)
    job = response.json()
    if args.json:
        _out(job)
    elif response.status_code == 202:
        print(f"cancel requested: job {job['job_id']} is {job.get('state')}; its agent stops it and reports cancelled")
    else:
        print(f"job {job['job_id']} {job.get('state')}")
    return OK


def _log_pages(client: Client, job_id: str, *, follow_: bool, after: int) -> Iterator[dict[str, Any]]:
    path = watch.job_path(job_id) + "/logs"
    while True:
        params: dict[str, Any] = {"after": after, "limit": LOG_PAGE}
        if follow_:
            params.update(follow="true", wait=LOG_WAIT)
        page = client.call("GET", path, params=params, timeout=(10, LOG_WAIT + 30))
        yield page
        lines, cursor = page.get("lines") or [], page.get("next", after)
        if page.get("finished") or (not follow_ and (not lines or cursor == after)):
            return
        if follow_ and not lines:
            time.sleep(watch.POLL_INTERVAL)  # a server that does not hold the request: do not spin
        after = cursor


def _task_output(client: Client, job_id: str, *, follow_: bool) -> Iterator[dict[str, Any]]:
    """Log lines made of the tasks' output, for a control plane without the logs endpoint."""
    shown: set[tuple[Any, str]] = set()
    while True:
        job = client.call("GET", watch.job_path(job_id))
        for task in sorted(job.get("tasks") or [], key=lambda t: t.get("position", 0)):
            key = (task.get("attempt"), task["name"])
            if key in shown:
                continue
            shown.add(key)
            for level, text in (("info", task.get("output")), ("error", task.get("error"))):
                for message in str(text or "").splitlines():
                    yield {
                        "ts": task.get("finished_at"),
                        "attempt": task.get("attempt"),
                        "task": task["name"],
                        "level": level,
                        "message": message,
                    }
        if not follow_ or job.get("state") in render.FINAL:
            return
        time.sleep(watch.POLL_INTERVAL)


def jobs_logs(client: Client, args: argparse.Namespace) -> int:
    """Page through a job's log lines; with --follow, wait for new ones until the job has ended."""
    show: Callable[[dict[str, Any]], None] = _line if args.json else lambda line: print(render.log_line(line))
    warned = False
    try:
        for page in _log_pages(client, args.job_id, follow_=args.follow, after=args.after):
            for line in page.get("lines") or []:
                show(line)
            sys.stdout.flush()
            if page.get("truncated") and not warned:
                warned = True
                print(TRUNCATED, file=sys.stderr)
        return OK
    except ApiError as exc:
        if exc.status != 404:
            raise
        client.call("GET", watch.job_path(args.job_id))  # the job's own 404 is raised
    print(NO_LOG_ROUTE, file=sys.stderr)
    for line in _task_output(client, args.job_id, follow_=args.follow):
        show(line)
    return OK


def agents_list(client: Client, args: argparse.Namespace) -> int:
    """GET /api/v1/agents as a table."""
    params = {"limit": args.limit, "status": args.status, "project_id": args.project}
    page = client.call("GET", "/agents", params={k: v for k, v in params.items() if v is not None})
    if args.json:
        _out(page)
        return OK
    agents = page.get("agents") or []
    print(render.agents_table(agents) if agents else "no agents")
    if page.get("total", 0) > len(agents):
        print(f"({len(agents)} of {page['total']}; --limit shows more)")
    return OK


def _token_tenant(token: str) -> str | None:
    """The ``tenant_id`` claim of a JWT, read without checking it (the server does): the default of --tenant."""
    try:
        tenant = jwt.decode(token, options={"verify_signature": False}).get("tenant_id")
    except jwt.InvalidTokenError:
        return None
    return tenant if isinstance(tenant, str) else None


def _secrets_path(client: Client, args: argparse.Namespace) -> str:
    tenant = args.tenant or _token_tenant(client.token)
    if tenant is None:
        raise UsageError(NO_TENANT)
    return f"/tenants/{quote(tenant, safe='')}/projects/{quote(args.project, safe='')}/secrets"


def secrets_set(client: Client, args: argparse.Namespace) -> int:
    """PUT a secret, its value from standard input or a variable: never from the command line, which ps shows."""
    if args.from_env:
        value = os.environ.get(args.from_env)
        if value is None:
            raise UsageError(NO_VARIABLE.format(name=args.from_env))
    else:
        value = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
        value = value[:-1] if value.endswith("\n") and not args.keep_newline else value
    if not value:
        raise UsageError(NO_VALUE)
    secret = client.call("PUT", f"{_secrets_path(client, args)}/{quote(args.name, safe='')}", body={"value": value})
    if args.json:
        _out(secret)
    else:
        print(f"secret {secret['name']} of project {secret['project_id']} set by {secret['updated_by']}")
    return OK


def secrets_list(client: Client, args: argparse.Namespace) -> int:
    """GET a project's secrets: names and when they were set, never values."""
    page = client.call("GET", _secrets_path(client, args))
    if args.json:
        _out(page)
        return OK
    secrets = page.get("secrets") or []
    for secret in secrets:
        print(f"{secret['name']}  set {secret['updated_at']} by {secret['updated_by']}")
    if not secrets:
        print("no secrets")
    return OK


def secrets_delete(client: Client, args: argparse.Namespace) -> int:
    """DELETE a secret."""
    client.call("DELETE", f"{_secrets_path(client, args)}/{quote(args.name, safe='')}")
    if not args.json:
        print(f"secret {args.name} of project {args.project} deleted")
    return OK


def run(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """The command's ``run``: make the client, call ``handler``, turn errors into messages and exit codes."""

    def command(args: argparse.Namespace) -> int:
        try:
            client = Client.from_environment(args.url, args.token)
            if getattr(args, "job_id", None) is not None:
                args.job_id = whole_job_id(client, args.job_id)
            return handler(client, args)
        except ClientError as exc:
            print(f"automation: {exc.message}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("automation: interrupted", file=sys.stderr)
            return INTERRUPTED

    return command


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the control plane's address (default: $CONTROL_PLANE_URL)")
    common.add_argument("--token", help="a JWT (default: $JWT_TOKEN; prefer the variable: arguments show in ps)")
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of text")
    return common


def _limit(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 500:
        raise argparse.ArgumentTypeError("must be between 1 and 500")
    return number


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``jobs``, ``agents`` and ``secrets`` to the ``automation`` command."""
    common = _common()
    layout: dict[str, Any] = {"epilog": EXIT_CODES, "formatter_class": argparse.RawDescriptionHelpFormatter}

    def action(group: Any, name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(
            name, parents=[common], help=text, description=text, **layout
        )
        parser.set_defaults(run=run(handler))
        return parser

    jobs = commands.add_parser(
        "jobs",
        help="submit, list, watch and cancel jobs (over the REST API)",
        description="Submit, list, watch and cancel jobs through the control plane's REST API.",
        **layout,
    )
    group = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")

    submit = action(group, "submit", jobs_submit, "submit a YAML workflow file as a job")
    submit.add_argument("file", help="the workflow file (- for standard input)")
    submit.add_argument(
        "--agent",
        action="append",
        metavar="AGENT",
        help="pin the job to this agent; repeated, one job per agent, submitted together (all or none)",
    )
    submit.add_argument("--project", help="the project (default: the token's)")
    submit.add_argument("--var", action="append", metavar="NAME=VALUE", help="a variable (repeatable)")
    submit.add_argument("--priority", type=int, choices=range(10), metavar="0-9", help="0-9 (default 5)")
    submit.add_argument("--idempotency-key", metavar="KEY", help="submitting again with the same key returns the job")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end; exit 0 only if it completed")

    listing = action(group, "list", jobs_list, "list jobs, newest first")
    listing.add_argument("--state", choices=STATES)
    listing.add_argument("--agent", help="jobs pinned to this agent")
    listing.add_argument("--ran-on", metavar="AGENT", help="jobs whose current attempt this agent claimed")
    listing.add_argument("--project")
    listing.add_argument("--limit", type=_limit, default=50, help="at most this many (1-500, default 50)")

    get = action(group, "get", jobs_get, "show a job with its tasks")
    get.add_argument("job_id", help=ID_HELP)

    live = action(group, "watch", jobs_watch, "follow a job live, a line per task, until it ends")
    live.add_argument("job_id", help=ID_HELP)

    logs = action(group, "logs", jobs_logs, "print a job's log lines")
    logs.add_argument("job_id", help=ID_HELP)
    logs.add_argument("--follow", "-f", action="store_true", help="wait for new lines until the job has ended")
    logs.add_argument("--after", type=int, default=0, metavar="CURSOR", help="start after this cursor")

    cancel = action(group, "cancel", jobs_cancel, "cancel a job (a running one stops at its agent)")
    cancel.add_argument("job_id", help=ID_HELP)
    cancel.add_argument("--reason", help="why (kept as the job's error)")

    agents = commands.add_parser(
        "agents", help="list agents (over the REST API)", description="The agents registered in your tenant.", **layout
    )
    agent_group = agents.add_subparsers(dest="action", required=True, metavar="ACTION")
    agent_list = action(agent_group, "list", agents_list, "list agents with their status and last heartbeat")
    agent_list.add_argument("--status", choices=("online", "offline"))
    agent_list.add_argument("--project")
    agent_list.add_argument("--limit", type=_limit, default=50, help="at most this many (1-500, default 50)")

    secrets = commands.add_parser(
        "secrets",
        help="set, list and delete a project's secrets (over the REST API; a tenant admin's token)",
        description="A project's secrets, which its workflows name as {{.secrets.NAME}}; values are never shown.",
        **layout,
    )
    secret_group = secrets.add_subparsers(dest="action", required=True, metavar="ACTION")
    put = action(secret_group, "set", secrets_set, "set a secret; its value from standard input or --from-env")
    put.add_argument("name")
    put.add_argument("--from-env", metavar="VARIABLE", help="take the value from this environment variable")
    put.add_argument("--keep-newline", action="store_true", help="keep a final newline of standard input")
    listed = action(secret_group, "list", secrets_list, "list a project's secrets (names, never values)")
    remove = action(secret_group, "delete", secrets_delete, "delete a secret")
    remove.add_argument("name")
    for parser in (put, listed, remove):
        parser.add_argument("--project", required=True)
        parser.add_argument("--tenant", help="the tenant (default: the token's)")


def main(argv: list[str]) -> int:
    """Run ``automation jobs|agents|secrets ...`` alone: what ``automation`` can call first, so these start fast."""
    parser = argparse.ArgumentParser(prog="automation", description="The operator's commands (docs/CLI.md).")
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.run(args))
