"""`agentlibos spawn|kill|caps|grant|revoke|wait|budget|mem|ckpt`: what an agent may touch, stopping it,
and rolling it back.

Each command is one operator request (`op.*`) to the kernel running on --state; cli/_main.py registers them.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import click
import yaml
from rich.markup import escape
from rich.table import Table

from agentlibos.bus import BusError, KernelError
from agentlibos.cli._common import _operator, console, err, state_option
from agentlibos.cli._common import _op_call as _call
from agentlibos.kernel import DIMENSIONS, GRANT_FIELDS, LIVE

__all__ = ["COMMANDS"]

json_option = click.option("--json", "as_json", is_flag=True, help="Print the kernel's answer as JSON.")



def _refused(exc: KernelError) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(exc.code)}: {escape(exc.message)}")
    sys.exit(1)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, default=str))


# --- argument types ------------------------------------------------------------------------------


class _Yaml(click.ParamType):
    """A YAML (or JSON) value given inline; bad syntax is a usage error naming the option."""

    name = "yaml"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            data = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            self.fail(f"bad YAML/JSON in {value!r}: {_yaml_problem(exc)}", param, ctx)
        return self.check(data, param, ctx)

    def check(self, data: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        return exc.problem + (f" at column {mark.column + 1}" if mark is not None else "")
    return " ".join(str(exc).split())


class _Mapping(_Yaml):
    name = "mapping"

    def check(self, data: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if data is None:
            return {}
        if not isinstance(data, dict):
            self.fail(f"expected a mapping such as {{root: workspace}}, got {json.dumps(data, default=str)}", param, ctx)
        return data


class _Grant(_Yaml):
    name = "grant"

    def check(self, data: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        problem = _grant_problem(data)
        if problem:
            self.fail(problem, param, ctx)
        return data


def _grant_problem(g: Any) -> str | None:
    """What is wrong with a grant's shape, or None; the kernel still checks scope and rights."""
    if not isinstance(g, dict):
        return f"a capability is a mapping {{kind, scope, rights, ...}}, not {json.dumps(g, default=str)}"
    unknown = sorted(set(g) - GRANT_FIELDS, key=str)
    if unknown:
        return f"unknown capability field {unknown[0]!r} (fields: {', '.join(sorted(GRANT_FIELDS))})"
    if not isinstance(g.get("kind"), str):
        return "a capability needs a kind (fs, shell, memory, llm, ...)"
    return None


class _Budget(click.ParamType):
    name = "dim=amount"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        dim, sep, amount = str(value).partition("=")
        if not sep or dim not in DIMENSIONS:
            self.fail(f"{value!r} is not DIM=AMOUNT with DIM one of {', '.join(DIMENSIONS)}", param, ctx)
        try:
            number = float(amount)
        except ValueError:
            self.fail(f"{amount!r} in {value!r} is not a number", param, ctx)
        return dim, number


class _Json(click.ParamType):
    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return json.loads(value)
        except ValueError as exc:
            self.fail(f"not JSON ({exc}); quote a string: '\"text\"'", param, ctx)


# --- spawn, kill, wait -----------------------------------------------------------------------------


def _caps_file(ctx: click.Context, param: click.Parameter, value: str | None) -> list[dict[str, Any]]:
    """A YAML list of grants, or a mapping with one under `caps:` (a scenario file's grants)."""
    if value is None:
        return []
    try:
        with open(value, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}", ctx, param) from None
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"bad YAML in {value}: {_yaml_problem(exc)}", ctx, param) from None
    if isinstance(data, dict) and "caps" in data:
        data = data["caps"]
    if not isinstance(data, list):
        raise click.BadParameter(f"{value} must hold a list of capabilities (or one under `caps:`)", ctx, param)
    for i, g in enumerate(data):
        problem = _grant_problem(g)
        if problem:
            raise click.BadParameter(f"{value}, capability {i + 1}: {problem}", ctx, param)
    return data


@dataclass(frozen=True)
class _NewProcess:
    """The options of a new root process (spawn, ckpt fork): capabilities, budget, first input, how it runs."""

    caps: tuple[dict[str, Any], ...]
    caps_file: list[dict[str, Any]]
    budget: tuple[tuple[str, float], ...]
    input_text: str | None
    daemon: bool
    external: bool
    state: str
    as_json: bool

    def start(self, sys_name: str, args: dict[str, Any], what: str) -> None:
        """op.spawn or op.ckpt.fork with these options; prints the new pid (and token)."""
        args = {**args, "caps": [*self.caps, *self.caps_file]}
        if self.budget:
            args["budget"] = dict(self.budget)
        if self.input_text is not None:
            args["input"] = self.input_text
        if self.daemon:
            args["daemon"] = True
        if self.external:
            args["external"] = True
        out = _call(self.state, sys_name, args)
        if self.as_json:
            _echo_json(out)
            return
        console.print(f"spawned process {out['pid']} from {escape(what)} with {len(args['caps'])} capabilities")
        if "token" in out:
            console.print(f"token (secret: whoever holds it acts as process {out['pid']}): {escape(out['token'])}",
                          soft_wrap=True)


def _process_options(fn: Any) -> Any:
    """Click options for a new root process, handed to FN as one `new: _NewProcess`."""

    @functools.wraps(fn)
    def command(*args: Any, **kw: Any) -> Any:
        fields = {f: kw.pop(f) for f in _NewProcess.__dataclass_fields__}
        return fn(*args, new=_NewProcess(**fields), **kw)

    for option in reversed([
        click.option("--cap", "caps", type=_Grant(), multiple=True, metavar="YAML",
                     help="A capability the process holds, as YAML or JSON: {kind, scope, rights, approval?, "
                          "expires_in_s?, uses?, name?}. Repeatable; with --caps-file's, the only authority the "
                          "process gets."),
        click.option("--caps-file", "caps_file", callback=_caps_file, type=click.Path(exists=True, dir_okay=False),
                     help="A YAML file with a list of capabilities (or a mapping with them under `caps:`)."),
        click.option("--budget", "budget", type=_Budget(), multiple=True, metavar="DIM=AMOUNT",
                     help=f"A budget limit, repeatable (dimensions: {', '.join(DIMENSIONS)}); default: the image's."),
        click.option("--input", "input_text", metavar="TEXT",
                     help="The process's first input. Without it the process waits for `agentlibos send PID TEXT`."),
        click.option("--daemon", is_flag=True, help="Keep the process alive between inputs instead of ending after one."),
        click.option("--external", is_flag=True,
                     help="No host runs it: print a token an outside client says hello with (docs/protocol.md)."),
        state_option,
        json_option,
    ]):
        command = option(command)
    return command


@click.command("spawn")
@click.argument("image")
@_process_options
def spawn_cmd(image: str, new: _NewProcess) -> None:
    """Start a root process from registered IMAGE, holding exactly the capabilities given (and,
    like every process, `self` for its own memory and `model` for its model).

    Prints the new pid. With --external, also prints the process's token: a secret, since whoever
    holds it acts as the process with all its capabilities.

    \b
    Example:
      agentlibos spawn notes --cap '{kind: fs, scope: {root: workspace}, rights: [read, write], name: ws}' \\
          --budget syscalls=200 --input 'Tidy the notes.'

    Exit status 0 spawned, 1 the kernel refused (its code is printed), 2 usage error.
    """
    new.start("op.spawn", {"image": image}, f"image {image}")


@click.command("kill")
@click.argument("pid", type=int)
@state_option
@json_option
def kill_cmd(pid: int, state: str, as_json: bool) -> None:
    """Kill process PID and its live subtree now; prints the pids that ended.

    Their capabilities are released with them (`agentlibos caps --all` still lists the records).
    """
    killed = _call(state, "op.kill", {"pid": pid})["killed"]
    if as_json:
        _echo_json({"killed": killed})
    elif killed:
        console.print("killed " + ", ".join(map(str, killed)))
    else:
        console.print(f"process {pid} had already ended; nothing killed")


@click.command("wait")
@click.argument("pid", type=int)
@click.option("--timeout", type=click.FloatRange(min=0), metavar="S", help="Give up after S seconds (exit 3).")
@state_option
@json_option
def wait_cmd(pid: int, timeout: float | None, state: str, as_json: bool) -> None:
    """Wait until process PID ends; print its status and result.

    \b
    Example:
      agentlibos wait 3 --timeout 60 && echo done

    \b
    Exit status:
      0  the process ended with status ok
      1  it ended otherwise (killed, deadline, error, ...), or the kernel refused (no such process)
      2  usage error, or no kernel runs on --state
      3  --timeout passed first; the process is still running
    """
    args: dict[str, Any] = {"pid": pid}
    if timeout is not None:
        args["timeout_s"] = timeout
    with _operator(state) as client:
        try:
            # The kernel enforces --timeout; ours only notices a kernel that stopped answering.
            out = client.call("op.wait", args, timeout_s=None if timeout is None else timeout + 10)
        except KernelError as exc:
            if exc.code == "ETIMEDOUT":
                err.print(f"process {pid} still running after {timeout:g} s")
                sys.exit(3)
            _refused(exc)
        except BusError as exc:
            err.print(f"[red]error:[/red] the kernel on {escape(state)} stopped answering: {escape(str(exc))}")
            sys.exit(2)
    if as_json:
        _echo_json(out)
    else:
        console.print(f"process {pid} ended: {escape(str(out['status']))}")
        if out.get("result") is not None:
            console.print("result: " + escape(json.dumps(out["result"], ensure_ascii=False, default=str)),
                          soft_wrap=True)
    sys.exit(0 if out["status"] == "ok" else 1)


# --- capabilities ----------------------------------------------------------------------------------

_STATE_STYLE = {"live": "green", "revoked": "red", "dropped": "dim", "expired": "yellow"}


def _cap_state(rec: dict[str, Any], now: float) -> str:
    if rec.get("revoked"):
        return "revoked"
    if rec.get("dropped"):
        return "dropped"
    expires, uses = rec.get("expires"), rec.get("uses")
    if (expires is not None and now >= expires) or (uses is not None and uses <= 0):
        return "expired"
    return "live"


def _limits(rec: dict[str, Any], now: float) -> str:
    """Approval, expiry and uses left in one cell, so that the table stays readable at 80 columns."""
    out = ["asks a human"] if rec.get("approval") == "always" else []
    expires = rec.get("expires")
    if expires is not None:
        left = expires - now
        out.append(f"expires in {left:.0f} s" if left > 0
                   else "expired " + time.strftime("%H:%M:%S", time.localtime(expires)))
    if rec.get("uses") is not None:
        out.append(f"{rec['uses']} uses left")
    return ", ".join(out)


def _scope(scope: Any) -> str:
    """A scope as flow YAML without quotes (`root: ws, paths: [*.md]`): narrower than JSON, so it wraps less."""
    if not isinstance(scope, dict):
        return json.dumps(scope, ensure_ascii=False, default=str)

    def value(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return v if isinstance(v, str) and v and v.strip() == v and "," not in v else json.dumps(v, default=str)

    return ", ".join(f"{k}: {value(v)}" for k, v in scope.items())


def _origin(rec: dict[str, Any]) -> str:
    return str(rec.get("via") or "") + (f" of {rec['parent']}" if rec.get("parent") is not None else "")


@click.command("caps")
@click.argument("pid", type=int, required=False)
@click.option("--all", "show_all", is_flag=True, help="Also the dropped records of processes that have ended.")
@state_option
@json_option
def caps_cmd(pid: int | None, show_all: bool, state: str, as_json: bool) -> None:
    """What can an agent touch? The capability records of process PID (default: every process).

    One row per record: its id, holder pid and handle, kind, scope and rights; its limits (each use
    asks a human, an expiry, uses left); its origin (how it was made: operator, spawn, cap.derive,
    ..., and of which cap id); and its state: live, revoked, dropped (the holder let go of it or
    ended) or expired. Dropped records of ended processes are hidden unless --all. --json gives
    every field apart (approval, expires, uses, parent, via).

    \b
    Example:
      agentlibos caps 3
      agentlibos caps --all --json | jq '.[] | select(.state == "live")'
    """
    with _operator(state) as client:
        try:
            procs = {p["pid"]: p for p in client.call("op.ps", {})["processes"]}
            records = client.call("op.caps", {} if pid is None else {"pid": pid})["caps"]
        except KernelError as exc:
            _refused(exc)
    if pid is not None and pid not in procs:
        err.print(f"[red]error:[/red] no process {pid} (see `agentlibos ps`)")
        sys.exit(1)
    now = time.time()  # the kernel's clock is the wall clock of this host
    rows = []
    for rec in sorted(records, key=lambda r: r["cap"]):
        st = _cap_state(rec, now)
        ended = procs.get(rec["holder"], {}).get("state") not in LIVE
        if show_all or not (st == "dropped" and ended):
            rows.append({**rec, "state": st})
    hidden = len(records) - len(rows)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        what = f"process {pid} holds no capabilities" if pid is not None else "no capability records"
        console.print(what + (f" ({hidden} dropped records hidden; --all shows them)" if hidden else ""))
        return
    # One process's records: its pid goes in the title, which leaves the columns room at 80 columns.
    t = Table(title=None if pid is None else f"capabilities of process {pid} ({procs[pid].get('state')})")
    t.add_column("cap", justify="right", no_wrap=True)
    if pid is None:
        t.add_column("pid", justify="right", no_wrap=True)
    t.add_column("handle", overflow="fold")
    t.add_column("kind", no_wrap=True)
    for col in ("scope", "rights", "limits"):
        t.add_column(col, overflow="fold")
    t.add_column("origin", overflow="fold", min_width=8)
    t.add_column("state", no_wrap=True)
    for r in rows:
        t.add_row(str(r["cap"]), *([str(r["holder"])] if pid is None else []), escape(str(r["handle"])),
                  escape(str(r["kind"])), escape(_scope(r.get("scope") or {})),
                  escape(", ".join(r.get("rights") or [])), _limits(r, now), escape(_origin(r)),
                  f"[{_STATE_STYLE[r['state']]}]{r['state']}[/]")
    console.print(t)
    if hidden:
        console.print(f"[dim]{hidden} dropped records of ended processes hidden; --all shows them[/dim]")


@click.command("grant")
@click.argument("pid", type=int)
@click.argument("kind")
@click.option("--scope", type=_Mapping(), default="{}", metavar="YAML",
              help="What it reaches, as YAML or JSON, e.g. '{root: workspace, paths: [\"*.md\"]}' for fs.")
@click.option("--rights", required=True, metavar="R1,R2", help="Comma-separated rights, e.g. read,write.")
@click.option("--approval", type=click.Choice(["never", "always"]), default="never", show_default=True,
              help="always: every use waits for a human (`agentlibos approvals`).")
@click.option("--expires-in", "expires_in", type=click.FloatRange(min=0), metavar="S",
              help="Expires S seconds from now.")
@click.option("--uses", type=click.IntRange(min=1), metavar="N", help="Usable N times.")
@click.option("--name", metavar="HANDLE", help="The handle the process names it by (default: one is chosen).")
@state_option
@json_option
def grant_cmd(pid: int, kind: str, scope: dict[str, Any], rights: str, approval: str, expires_in: float | None,
              uses: int | None, name: str | None, state: str, as_json: bool) -> None:
    """Grant live process PID a new capability of KIND; prints its handle.

    \b
    Example:
      agentlibos grant 3 fs --scope '{root: workspace/docs}' --rights read,list --name docs --expires-in 600
    """
    names = [r.strip() for r in rights.split(",") if r.strip()]
    if not names:
        raise click.BadParameter("name at least one right, e.g. read,write", param_hint="'--rights'")
    args: dict[str, Any] = {"pid": pid, "kind": kind, "scope": scope, "rights": names, "approval": approval}
    if expires_in is not None:
        args["expires_in_s"] = expires_in
    if uses is not None:
        args["uses"] = uses
    if name is not None:
        args["name"] = name
    out = _call(state, "op.grant", args)
    if as_json:
        _echo_json(out)
        return
    console.print(f"granted {escape(str(out['handle']))} (cap {out['cap']}) to process {out['pid']}")


@click.command("revoke")
@click.argument("pid", type=int, required=False)
@click.argument("handle", required=False)
@click.option("--cap", "cap_id", type=int, metavar="ID", help="Revoke by capability id (see `agentlibos caps`).")
@state_option
@json_option
def revoke_cmd(pid: int | None, handle: str | None, cap_id: int | None, state: str, as_json: bool) -> None:
    """Revoke capability HANDLE of process PID (or --cap ID) and everything derived from it, in every
    process; prints the ids of the records revoked.

    \b
    Example:
      agentlibos revoke 3 ws
      agentlibos revoke --cap 12
    """
    by_handle = pid is not None and handle is not None
    if (cap_id is not None and pid is not None) or (cap_id is None and not by_handle):
        raise click.UsageError("name the capability either as PID HANDLE or as --cap ID")
    revoked = _call(state, "op.revoke", {"cap": cap_id} if cap_id is not None else {"pid": pid, "handle": handle})
    if as_json:
        _echo_json({"revoked": revoked["revoked"]})
        return
    ids = revoked["revoked"]
    console.print(f"revoked cap{'s' if len(ids) != 1 else ''} " + ", ".join(map(str, ids)))


# --- budgets and memory ----------------------------------------------------------------------------


def _amount(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


@click.command("budget")
@click.argument("pid", type=int)
@state_option
@json_option
def budget_cmd(pid: int, state: str, as_json: bool) -> None:
    """Process PID's budget: per dimension, its limit, what is used and what remains.

    A limit may be the process's own or an ancestor's that it draws on (column `from`); a
    dimension with no limit anywhere up the tree is unlimited.
    """
    view = _call(state, "op.budget", {"pid": pid})
    if as_json:
        _echo_json(view)
        return
    t = Table(title=f"budget of process {pid}")
    t.add_column("dimension")
    for col in ("limit", "used", "remaining"):
        t.add_column(col, justify="right")
    t.add_column("from")
    for dim, v in view.items():
        if v.get("limit") is None:
            t.add_row(escape(dim), "unlimited", "", "", "")
            continue
        t.add_row(escape(dim), _amount(v["limit"]), _amount(v["used"]), _amount(v["remaining"]),
                  "own" if v.get("own") else "ancestor")
    console.print(t)


@click.group("mem")
def mem_group() -> None:
    """Read or seed Object Memory: a shared namespace NS, or self:PID for one process's own."""


@mem_group.command("get")
@click.argument("ns")
@click.argument("key")
@state_option
def mem_get(ns: str, key: str, state: str) -> None:
    """Print the value under KEY in namespace NS, as JSON (exit 1, ENOENT, if there is none).

    \b
    Example:
      agentlibos mem get team plan
    """
    _echo_json(_call(state, "op.mem.get", {"ns": ns, "key": key})["value"])


@mem_group.command("put")
@click.argument("ns")
@click.argument("key")
@click.argument("value", type=_Json())
@state_option
def mem_put(ns: str, key: str, value: Any, state: str) -> None:
    """Store VALUE (JSON) under KEY in namespace NS, replacing what was there.

    \b
    Example:
      agentlibos mem put team plan '{"steps": ["draft", "review"]}'
      agentlibos mem put self:3 note '"call back at 5"'
    """
    _call(state, "op.mem.put", {"ns": ns, "key": key, "value": value})
    console.print(f"stored {escape(key)} in {escape(ns)}")


# --- checkpoints -----------------------------------------------------------------------------------


@click.group("ckpt")
def ckpt_group() -> None:
    """Checkpoints: snapshot a process, roll it back, or start a new process from a snapshot.

    A checkpoint holds what the kernel knows of a process: its conversation (to the model's last
    answer), JIT tools, Skills, its own memory and queues, and which capability records its
    handles named. A rollback never widens what the process may affect: a capability revoked or
    expired since stays dead, one granted since is dropped, and budget spent stays spent.
    CKPT is a checkpoint id or label.

    \b
    Example:
      agentlibos ckpt create 3 --label before-migration
      agentlibos ckpt restore 3 before-migration
      agentlibos ckpt fork before-migration --cap '{kind: fs, scope: {root: sandbox}, rights: [read]}'
    """


@ckpt_group.command("create")
@click.argument("pid", type=int)
@click.option("--label", help="A name to restore or fork it by (the newest checkpoint with a label wins).")
@state_option
@json_option
def ckpt_create(pid: int, label: str | None, state: str, as_json: bool) -> None:
    """Snapshot live process PID now; prints the checkpoint's id. A process mid-turn is taken as
    the kernel saw it at its last model request."""
    out = _call(state, "op.ckpt.create", {"pid": pid, **({"label": label} if label is not None else {})})
    if as_json:
        _echo_json(out)
    else:
        console.print(f"checkpoint {out['checkpoint']} of process {pid}" + (f" ({escape(label)})" if label else ""))


@ckpt_group.command("list")
@click.argument("pid", type=int, required=False)
@state_option
@json_option
def ckpt_list(pid: int | None, state: str, as_json: bool) -> None:
    """Every checkpoint (of process PID, if given): who took it (the process or the operator) and
    the log entry it was taken at."""
    rows = _call(state, "op.ckpt.list", {} if pid is None else {"pid": pid})["checkpoints"]
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        console.print("no checkpoints" + (f" of process {pid}" if pid is not None else ""))
        return
    t = Table("ckpt", "pid", "image", "label", "taken by", "at seq")
    for r in rows:
        t.add_row(str(r["checkpoint"]), str(r["pid"]), escape(str(r.get("image") or "")),
                  escape(str(r.get("label") or "")), escape(str(r.get("author"))), str(r.get("log_seq")))
    console.print(t)


@ckpt_group.command("show")
@click.argument("ckpt")
@state_option
@json_option
def ckpt_show(ckpt: str, state: str, as_json: bool) -> None:
    """What checkpoint CKPT holds, and what a restore would give back: each handle with the state
    of the capability record it names now (live, or the error a use would get)."""
    out = _call(state, "op.ckpt.show", {"checkpoint": ckpt})
    if as_json:
        _echo_json(out)
        return
    console.print(f"checkpoint {out['checkpoint']} of process {out['pid']} (image {escape(str(out['image']))}), "
                  f"taken by {escape(str(out['author']))} at seq {out['log_seq']}"
                  + (f", label {escape(str(out['label']))}" if out.get("label") else ""))
    console.print(f"conversation: {out['messages']} messages; JIT tools: {escape(', '.join(out['jit_tools']) or '-')}; "
                  f"Skills: {escape(', '.join(out['skills']) or '-')}; memory keys: {len(out['memory'])}")
    t = Table("handle", "cap", "kind", "on restore")
    for h in out["handles"]:
        live = h["status"] == "live"
        t.add_row(escape(h["handle"]), str(h["cap"]), escape(str(h.get("kind") or "")),
                  "[green]live[/green]" if live else f"[red]dead ({escape(str(h['status']))})[/red]")
    console.print(t)
    if out.get("drops"):
        console.print(f"a restore drops what process {out['pid']} got since: {escape(', '.join(out['drops']))}")


@ckpt_group.command("restore")
@click.argument("pid", type=int)
@click.argument("ckpt")
@state_option
@json_option
def ckpt_restore(pid: int, ckpt: str, state: str, as_json: bool) -> None:
    """Roll process PID back to its checkpoint CKPT: conversation, JIT tools, Skills, memory,
    queues and handles. A turn in progress finishes first; `agentlibos interrupt PID` (or
    `suspend`) before stops it. The process then waits for its next input.

    Exit status 0 restored, 1 the kernel refused (EPERM: another process's checkpoint, fork it
    instead; ENOENT: no such process or checkpoint), 2 usage error.
    """
    out = _call(state, "op.ckpt.restore", {"pid": pid, "checkpoint": ckpt})
    if as_json:
        _echo_json(out)
    else:
        console.print(f"process {pid} restored to checkpoint {out['checkpoint']}; handles: "
                      f"{escape(', '.join(out['handles']))} (`agentlibos caps {pid}` shows which are live)")


@ckpt_group.command("fork")
@click.argument("ckpt")
@_process_options
def ckpt_fork(ckpt: str, new: _NewProcess) -> None:
    """Start a new root process from checkpoint CKPT: its image, conversation, JIT tools, Skills
    and a copy of its memory, holding exactly the capabilities given here (never the checkpoint's).

    Exit status 0 spawned, 1 the kernel refused (its code is printed), 2 usage error.
    """
    new.start("op.ckpt.fork", {"checkpoint": ckpt}, f"checkpoint {ckpt}")


COMMANDS = (spawn_cmd, kill_cmd, wait_cmd, caps_cmd, grant_cmd, revoke_cmd, budget_cmd, mem_group, ckpt_group)
