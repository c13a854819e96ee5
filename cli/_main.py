"""The `agentlibos` command: parses arguments and calls the packages; no logic of its own."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from agentlibos.bus import ScenarioError, StorageError
from agentlibos.harness import (
    REPORT_FORMAT,
    SYSTEMS,
    RunResult,
    TextTable,
    cli_tables,
    load_scenario,
    report,
    run_bench,
    run_libos,
    scenario_paths,
    summarize,
    write_report,
)
from agentlibos.cli._agentdojo import bench_agentdojo
from agentlibos.cli._common import _kernel_running, _op_call, console, err, state_option
from agentlibos.cli._procs import COMMANDS as PROC_COMMANDS
from agentlibos.kernel import LIVE
from agentlibos.storage import LogEntry, RetentionPolicy, SQLiteLog



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """agent-libos: run LLM agents as processes whose every effect is a capability-checked,
    logged syscall.

    \b
    Start here:
      agentlibos run scenarios/quickstart.yaml     run a scenario and print its trace
      agentlibos log verify                        check the log's hash chain
      agentlibos explain SEQ                       why was this allowed or denied?
      agentlibos bench safety --scenarios scenarios
    """


# --- run ---------------------------------------------------------------------------------------


def _step_source(scenario: Any, process: str, index: int) -> dict[str, Any]:
    steps = ([s.raw for s in scenario.script] if process == "root"
             else scenario.images.get(process, {}).get("script", []))
    return dict(steps[index]) if index < len(steps) else {}


def _fmt_args(args: Any, limit: int = 48) -> str:
    text = json.dumps(args, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@state_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the run as JSON to this file.")
@click.option("--model", default=None, metavar="PROVIDER:MODEL",
              help="Drive the root process with a real model (anthropic:MODEL needs ANTHROPIC_API_KEY; "
                   "openai:MODEL uses OPENAI_BASE_URL and OPENAI_API_KEY); the scenario's script is ignored, "
                   "its checks still apply.")
def run(file: str, state: str, json_out: str | None, model: str | None) -> None:
    """Run one scenario FILE on the embedded runtime and print its trace.

    Each step shows the tool call, the kernel's decision, the capability handle that decided
    it, and the result. The log stays in --state: inspect it with `agentlibos log show` and
    `agentlibos explain SEQ`. Exit status: 0 completed, 1 not completed, 2 the file could not be
    loaded.
    """
    try:
        scenario = load_scenario(file)
    except ScenarioError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
    Path(state).mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]{escape(scenario.id)}[/bold]: {escape(scenario.title)}")
    started = time.monotonic()
    backend: Any = None
    if model:
        from agentlibos.actors import AnthropicModel, OpenAIChatModel

        provider = model.split(":", 1)[0]
        if provider == "anthropic":
            if not os.environ.get("ANTHROPIC_API_KEY"):
                err.print("[red]error:[/red] --model anthropic:MODEL needs ANTHROPIC_API_KEY in the environment")
                sys.exit(2)
            backend = AnthropicModel(base_url=os.environ.get("ANTHROPIC_BASE_URL"))
        elif provider == "openai":
            backend = OpenAIChatModel(base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
        else:
            err.print(f"[red]error:[/red] unknown model provider {provider!r} (anthropic:MODEL or openai:MODEL)")
            sys.exit(2)
    try:
        result = run_libos(scenario, model=model, backend=backend,
                           keep_state=str(Path(state) / "runs" / f"{scenario.id}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
    finally:
        if backend is not None:
            backend.close()
    for s in result.steps:
        step_src = _step_source(scenario, s.process, s.index)
        decision = {"allowed": "[green]allow[/green]", "denied": "[red]deny[/red]",
                    "failed": "[yellow]fail[/yellow]", "not_reached": "[dim]not reached[/dim]"}[s.outcome]
        by = f" by [bold]{escape(s.cap)}[/bold]" if s.cap else ""
        res = "ok" if s.outcome == "allowed" else (s.code or "")
        if s.message:
            res += f" ({escape(s.message)})"
        mark = "[green]✓[/green]" if s.ok else "[red]✗ expected " + escape(str(s.expect)) + "[/red]"
        console.print(f"[dim]{s.seq or '':>5}[/dim] {escape(s.process)}#{s.index} [cyan]{escape(s.tool)}[/cyan] "
                      f"{escape(_fmt_args(step_src.get('args', {}), 90))}")
        console.print(f"      {decision}{by} -> {res}  {mark}")
    for name, ok, why in result.checks:
        console.print(f"  check {escape(name)}: {'[green]holds[/green]' if ok else '[red]fails[/red] (' + escape(why) + ')'}")
    for leak in result.leaks:
        console.print(f"  [red]leak:[/red] {escape(leak)}")
    if result.error:
        console.print(f"  [red]error:[/red] {escape(result.error)}")
    verdict = "[green]completed[/green]" if result.completed else "[red]not completed[/red]"
    console.print(f"{verdict}; unauthorized side effects: {result.unauthorized}; false denials: "
                  f"{result.false_denials}; {time.monotonic() - started:.2f} s; log: {escape(state)}/runs/")
    if json_out:
        Path(json_out).write_text(json.dumps(report([result]), indent=2))
    sys.exit(0 if result.completed else 1)


# --- log ---------------------------------------------------------------------------------------


def _latest_log(state: str) -> Path:
    """The log in STATE itself, or the newest run's log under STATE/runs/."""
    base = Path(state)
    if (base / "log.db").exists():
        return base / "log.db"
    runs = sorted((base / "runs").glob("*/log.db"), key=lambda p: p.stat().st_mtime) if (base / "runs").exists() else []
    if not runs:
        err.print(f"[red]error:[/red] no log under {escape(state)} (run a scenario first, or pass --state DIR)")
        sys.exit(2)
    return runs[-1]


def _open_log(state: str) -> SQLiteLog:
    try:
        return SQLiteLog.open_readonly(_latest_log(state))
    except StorageError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)


def _summary(e: LogEntry) -> str:
    b = e.body
    if e.kind == "sys":
        s = f"{b.get('sys')} -> {b.get('decision')}"
        if b.get("handle"):
            s += f" by {b['handle']}"
        if b.get("code"):
            s += f" {b['code']}: {b.get('message', '')}"
        if b.get("detail"):
            s += f" {json.dumps(b['detail'], default=str)}"
        return s
    if e.kind == "result":
        return f"{b.get('sys')} {'ok' if b.get('ok') else b.get('code', '') + ' ' + b.get('message', '')}"
    return json.dumps(b, default=str, ensure_ascii=False)


def _entries_table(entries: list[LogEntry]) -> Table:
    t = Table()
    for col in ("seq", "time", "pid", "kind", "cause", "what"):
        t.add_column(col)
    for e in entries:
        t.add_row(str(e.seq), time.strftime("%H:%M:%S", time.localtime(e.ts)), str(e.pid or ""), e.kind,
                  str(e.cause or ""), escape(_summary(e)[:120]))
    return t


@main.group("log")
def log_group() -> None:
    """Read and verify the append-only, hash-chained log."""


@log_group.command("show")
@state_option
@click.option("--from", "start", default=1, show_default=True, help="First seq to show.")
@click.option("--limit", default=200, show_default=True, help="At most this many entries.")
@click.option("--pid", type=int, help="Only entries of this process.")
@click.option("--kind", "kinds", multiple=True, help="Only these kinds (sys, result, proc.state, cap.create, ...).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
def log_show(state: str, start: int, limit: int, pid: int | None, kinds: tuple[str, ...], as_json: bool) -> None:
    """Show log entries in order."""
    with _open_log(state) as log:
        entries = []
        for e in log.entries(start, kinds=list(kinds) or None, pid=pid):
            entries.append(e)
            if len(entries) >= limit:
                break
    if as_json:
        for e in entries:
            click.echo(json.dumps({"seq": e.seq, "ts": e.ts, "pid": e.pid, "kind": e.kind, "cause": e.cause,
                                   "body": e.body, "payload_digest": e.payload_digest, "hash": e.hash.hex()},
                                  default=str))
        return
    console.print(_entries_table(entries))


@log_group.command("tail")
@state_option
@click.option("-n", "count", default=20, show_default=True, help="How many of the newest entries.")
def log_tail(state: str, count: int) -> None:
    """Show the newest entries."""
    with _open_log(state) as log:
        head, _ = log.head()
        entries = list(log.entries(max(1, head - count + 1)))
    console.print(_entries_table(entries))


@log_group.command("verify")
@state_option
def log_verify(state: str) -> None:
    """Check the hash chain: any edit, deletion, reordering or truncation is found.

    Exit status 0 when the log verifies, 1 when it does not (the first bad seq is printed).
    """
    path = _latest_log(state)
    with _open_log(state) as log:
        rep = log.verify()
    if rep.ok:
        console.print(f"[green]ok[/green]: {rep.checked} entries verify ({escape(str(path))})")
        return
    console.print(f"[red]corrupt[/red] at seq {rep.first_bad_seq}: {escape(rep.reason or '')} ({escape(str(path))})")
    sys.exit(1)


@log_group.command("retain")
@state_option
@click.option("--mode", type=click.Choice(["digest", "purge_after"]), required=True,
              help="digest: drop every payload, keep digests; purge_after: drop payloads older than --days.")
@click.option("--days", type=float, help="Age in days for purge_after.")
def log_retain(state: str, mode: str, days: float | None) -> None:
    """Apply a retention policy: drop stored payloads (file contents, prompts, model output).

    The hash chain covers only the payloads' digests, so `log verify` still passes afterwards.
    Run it on a log no kernel is writing.
    """
    if mode == "purge_after" and days is None:
        err.print("[red]error:[/red] --mode purge_after needs --days N")
        sys.exit(2)
    path = _latest_log(state)
    try:
        with SQLiteLog(path) as log:
            n = log.apply_retention(RetentionPolicy(mode, days))  # type: ignore[arg-type]
            ok = log.verify().ok
    except StorageError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(1)
    console.print(f"dropped {n} payloads from {escape(str(path))}; verify: {'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


# --- a running kernel ----------------------------------------------------------------------------


@main.command("kernel")
@state_option
@click.option("--world", "world_root", type=click.Path(file_okay=False), help="World root (default STATE/world).")
def kernel_cmd(state: str, world_root: str | None) -> None:
    """Run a kernel on --state until interrupted (Ctrl-C or SIGTERM).

    Clients connect to the ipc endpoint written to STATE/connection.json (docs/protocol.md);
    the operator commands (`ps`, `spawn`, `caps`, `kill`, `approvals`, `approve`, ...) talk to it.
    Stopped this way, it records what lets outside processes and processes idle between turns
    carry on when a kernel is started again on the same --state.
    """
    import signal
    import threading

    from agentlibos.runtime import Runtime

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with Runtime(state, world_root=world_root) as rt:
        console.print(f"kernel on {escape(str(rt.state_dir))}; endpoint {escape(rt.endpoint)}; Ctrl-C stops it")
        done.wait()
    console.print("kernel stopped")


@main.command("console")
@state_option
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0 picks a free one).")
@click.option("--bind", "bind", default="127.0.0.1", show_default=True,
              help="Address to listen on. Loopback only unless you say otherwise: anyone who can reach it "
                   "and has the URL's token can operate the kernel.")
@click.option("--world", "world_root", type=click.Path(file_okay=False), help="World root (default STATE/world).")
def console_cmd(state: str, port: int, bind: str, world_root: str | None) -> None:
    """Serve the web supervision console for a kernel on --state until interrupted.

    Starts a kernel on --state (as `agentlibos kernel` does) and serves, on http://BIND:PORT, the
    process tree, budgets, capabilities, pending approvals, a live audit stream, LLM calls, images,
    checkpoints and the log's verify status. Approve, deny, kill and revoke are operator requests
    through the kernel, logged like any other. The printed URL carries a random access token; every
    request needs it.
    """
    from agentlibos.bus import BusError
    from agentlibos.console import serve

    try:
        serve(state, host=bind, port=port, world_root=world_root, announce=click.echo)
    except BusError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)


@main.command("ps")
@state_option
@click.option("--live", is_flag=True, help="Only processes that have not ended (a restarted kernel also lists "
                                           "the earlier sessions' processes, ended).")
def ps_cmd(state: str, live: bool) -> None:
    """List the processes of the running kernel."""
    t = Table()
    for col in ("pid", "ppid", "image", "state", "status", "model"):
        t.add_column(col)
    for p in _op_call(state, "op.ps", {})["processes"]:
        if live and p.get("state") not in LIVE:
            continue
        t.add_row(*(escape(str(p.get(k) if p.get(k) is not None else "")) for k in ("pid", "ppid", "image", "state",
                                                                                     "status", "model")))
    console.print(t)


@main.command("approvals")
@state_option
def approvals_cmd(state: str) -> None:
    """List pending approvals and questions, as the kernel renders them (never the model's words)."""
    pending = _op_call(state, "op.approvals", {})["approvals"]
    if not pending:
        console.print("no pending approvals")
        return
    for a in pending:
        console.print(f"[bold]#{a['id']}[/bold] pid {a['pid']} {escape(a['sys'])} ({a['kind']})")
        for k, v in a["rendering"].items():
            console.print(f"    {escape(str(k))}: {escape(json.dumps(v, ensure_ascii=True))}")


@main.command("resolve")
@click.argument("decision", type=int, required=False)
@state_option
@click.option("--as", "outcome", type=click.Choice(["done", "failed", "retry"]),
              help="What became of the effect (you checked the world): it happened, it did not, or run it again "
                   "in a new run. The kernel never re-runs an effect whose outcome is unknown.")
@click.option("--note", default="", help="Why, for the log.")
def resolve_cmd(decision: int | None, state: str, outcome: str | None, note: str) -> None:
    """List effects left unknown by a crash, or resolve the one logged at DECISION."""
    if decision is None:
        items = _op_call(state, "op.unknown", {})["effects"]
        if not items:
            console.print("no unknown effects")
        for it in items:
            console.print(f"decision {it['decision']}: pid {it['pid']} {escape(it['sys'])} (outcome unknown)")
        return
    if outcome is None:
        err.print("[red]error:[/red] say what became of it: --as done|failed|retry")
        sys.exit(2)
    _op_call(state, "op.resolve", {"decision": decision, "outcome": outcome, "note": note})
    console.print(f"decision {decision} resolved as {outcome}")


@main.command("approve")
@click.argument("approval_id", type=int)
@state_option
@click.option("--remember", is_flag=True, help="Also grant, without approval, exactly this effect class.")
def approve_cmd(approval_id: int, state: str, remember: bool) -> None:
    """Approve pending request APPROVAL_ID (see `agentlibos approvals`)."""
    out = _op_call(state, "op.approve", {"id": approval_id, "remember": remember})
    console.print(f"approved #{approval_id}" + (f"; remembered as {out['remembered']}" if out.get("remembered") else ""))


@main.command("deny")
@click.argument("approval_id", type=int)
@state_option
@click.option("--reason", default="", help="Told to the agent with the EDENIED reply.")
def deny_cmd(approval_id: int, state: str, reason: str) -> None:
    """Deny pending request APPROVAL_ID; the agent gets EDENIED."""
    _op_call(state, "op.deny", {"id": approval_id, "reason": reason})
    console.print(f"denied #{approval_id}")


# --- operator control of running agents --------------------------------------------------------


@main.command("suspend")
@click.argument("pid", type=int)
@state_option
def suspend_cmd(pid: int, state: str) -> None:
    """Suspend process PID: its syscalls wait, undecided and unlogged, until `resume`."""
    _op_call(state, "op.suspend", {"pid": pid})
    console.print(f"process {pid} suspended")


@main.command("resume")
@click.argument("pid", type=int)
@state_option
def resume_cmd(pid: int, state: str) -> None:
    """Resume suspended process PID; the syscalls it held are decided now."""
    out = _op_call(state, "op.resume", {"pid": pid})
    console.print(f"process {pid} resumed ({out['released']} held request(s) released)")


@main.command("interrupt")
@click.argument("pid", type=int)
@state_option
def interrupt_cmd(pid: int, state: str) -> None:
    """Interrupt process PID's current turn: what it waits on (an approval, a message, a child)
    ends with EINTR, or else its next syscall does. The agent then waits for a follow-up
    (`agentlibos send PID TEXT`)."""
    out = _op_call(state, "op.interrupt", {"pid": pid})
    what = f"{out['interrupted']} waiting request(s) ended" if out["interrupted"] else "its next syscall gets EINTR"
    console.print(f"process {pid} interrupted: {what}")


@main.command("send")
@click.argument("pid", type=int)
@click.argument("text")
@state_option
def send_cmd(pid: int, text: str, state: str) -> None:
    """Send TEXT to process PID as its next input (a follow-up after `interrupt`, or work for a daemon)."""
    _op_call(state, "op.send", {"pid": pid, "input": text})
    console.print(f"sent to process {pid}")


@main.command("deadline")
@click.argument("pid", type=int)
@click.argument("seconds", type=float, required=False)
@state_option
def deadline_cmd(pid: int, seconds: float | None, state: str) -> None:
    """Kill process PID and its subtree SECONDS from now (status `deadline`); without SECONDS,
    clear its deadline."""
    if seconds is not None and seconds < 0:
        err.print("[red]error:[/red] SECONDS must be >= 0")
        sys.exit(2)
    _op_call(state, "op.deadline", {"pid": pid, **({"in_s": seconds} if seconds is not None else {})})
    console.print(f"process {pid}: " + (f"deadline in {seconds:g} s" if seconds is not None else "no deadline"))


for _cmd in PROC_COMMANDS:  # spawn, kill, wait, caps, grant, revoke, budget, mem (cli/_procs.py)
    main.add_command(_cmd)


# --- images ------------------------------------------------------------------------------------

IMAGE_FIELDS = {"name", "prompt", "tools", "skills", "jit_tools", "model", "budget"}


@main.group("image")
def image_group() -> None:
    """Register and list AgentImages (prompt, tools, Skills, JIT tools; never capabilities)."""


@image_group.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@state_option
def image_add(file: str, state: str) -> None:
    """Register the image described by a YAML FILE (name, prompt, tools, skills, jit_tools, model, budget).

    The registration is an operator request through the kernel running on --state (or one
    started for the occasion when none is) and is recorded in its log.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(file).read_text())
    except yaml.YAMLError as exc:
        err.print(f"[red]error:[/red] {escape(file)}: bad YAML: {escape(str(exc))}")
        sys.exit(2)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        err.print(f"[red]error:[/red] {escape(file)}: an image is a mapping with at least a name")
        sys.exit(2)
    unknown = set(data) - IMAGE_FIELDS
    if unknown:
        err.print(f"[red]error:[/red] {escape(file)}: unknown image field {sorted(unknown)[0]!r} "
                  f"(fields: {', '.join(sorted(IMAGE_FIELDS))})")
        sys.exit(2)
    from agentlibos.bus import KernelError
    from agentlibos.runtime import Runtime

    args = {"name": data["name"], "prompt": data.get("prompt", ""), "tools": list(data.get("tools") or []),
            "skills": list(data.get("skills") or []), "jit_tools": dict(data.get("jit_tools") or {})}
    args.update({k: data[k] for k in ("model", "budget") if data.get(k) is not None})
    if _kernel_running(Path(state)):
        digest = _op_call(state, "op.image.register", args)["digest"]
        console.print(f"registered image [bold]{escape(data['name'])}[/bold] sha256:{digest}")
        return
    try:
        with Runtime(state, ipc=False) as rt:
            digest = rt.operator.call("op.image.register", args)["digest"]
    except KernelError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(1)
    console.print(f"registered image [bold]{escape(data['name'])}[/bold] sha256:{digest}")


@image_group.command("list")
@state_option
def image_list(state: str) -> None:
    """List the images registered in --state's log."""
    from agentlibos.runtime import Runtime

    with Runtime(state, ipc=False) as rt:
        images = rt.images()
    t = Table()
    for col in ("name", "digest", "tools", "skills", "JIT tools"):
        t.add_column(col)
    for i in images:
        t.add_row(escape(i["name"]), i["digest"][:16], escape(", ".join(i.get("tools") or [])),
                  escape(", ".join(i.get("skills") or [])), escape(", ".join(sorted(i.get("jit_tools") or {}))))
    console.print(t)


# --- explain -----------------------------------------------------------------------------------


@main.command()
@click.argument("seq", type=int)
@state_option
def explain(seq: int, state: str) -> None:
    """Why was log entry SEQ allowed or denied?

    Prints the causal chain (model turn -> tool call -> syscall -> decision -> result) and the
    capability's derivation back to the operator's grant.
    """
    with _open_log(state) as log:
        entry = log.get(seq)
        if entry is None:
            err.print(f"[red]error:[/red] no entry {seq} in the log")
            sys.exit(2)
        chain = [entry]
        while chain[-1].cause is not None and len(chain) < 64:
            nxt = log.get(chain[-1].cause)
            if nxt is None:
                break
            chain.append(nxt)
        console.print("[bold]causal chain[/bold] (newest first)")
        console.print(_entries_table(chain))
        decision = next((e for e in chain if e.kind == "sys"), None)
        if decision is None:
            console.print("no decision in this chain")
            return
        cap_id = decision.body.get("cap")
        verdict = decision.body.get("decision")
        console.print(f"decision at seq {decision.seq}: [bold]{verdict}[/bold] {escape(str(decision.body.get('sys')))}"
                      + (f" ({decision.body.get('code')}: {escape(decision.body.get('message', ''))})" if verdict != "allow" else ""))
        if cap_id is None:
            console.print("no capability was involved (the call needs none, or none was found)")
            return
        caps = {int(row["cap"]): row for row in log.projection("capabilities")}
        console.print("[bold]capability derivation[/bold] (the capability used, back to the operator's grant)")
        cur: int | None = int(cap_id)
        depth = 0
        while cur is not None and cur in caps:
            row = caps[cur]
            st = "revoked" if row.get("revoked") else ("dropped" if row.get("dropped") else "live")
            via = row.get("via")
            origin = "operator grant" if via == "operator" else f"by {via}"
            console.print(f"  {'  ' * depth}[bold]{escape(str(row.get('handle')))}[/bold] ({origin}, seq "
                          f"{row.get('created_seq')}, {st}) cap {cur} of pid {row.get('holder')}: "
                          f"{escape(str(row.get('kind')))} {escape(str(row.get('scope')))} rights "
                          f"{escape(str(row.get('rights')))}")
            parent = row.get("parent")
            cur = int(parent) if parent is not None else None
            depth += 1


# --- replay ------------------------------------------------------------------------------------


@main.command()
@click.argument("run", type=click.Path(exists=True))
def replay(run: str) -> None:
    """Replay a recorded RUN (a log.db, a run directory, or a state directory: its newest run).

    A fresh kernel is fed the run's stimuli (operator and process requests, effect results,
    model answers, timeouts) without running any effect, and must make the same decisions, entry
    by entry, and reach the same final state hash. A log with restarts in it is replayed session
    by session: each restarted kernel first recovers from the earlier sessions, as the real one
    did. Exit 0 identical; 1 with the first differing entry (NondeterminismError); 2 if the run
    cannot be replayed.
    """
    from agentlibos.bus import NondeterminismError, ReplayError
    from agentlibos.kernel import replay_log

    p = Path(run)
    path = p if p.is_file() else (p / "log.db" if (p / "log.db").exists() else _latest_log(str(p)))
    try:
        rep = replay_log(path)
    except NondeterminismError as exc:
        console.print(f"[red]non-deterministic[/red]: {escape(str(exc))}")
        sys.exit(1)
    except (ReplayError, StorageError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
    sessions = f" in {rep.sessions} kernel sessions" if rep.sessions > 1 else ""
    console.print(f"[green]identical[/green]: {rep.entries} entries{sessions}, {rep.stimuli} stimuli replayed in "
                  f"{rep.seconds:.2f} s ({rep.entries / max(rep.seconds, 1e-9):,.0f} entries/s); final state "
                  f"{rep.state_hash}")
    for note in rep.notes:
        console.print(f"  note: {escape(note)}")


# --- bench -------------------------------------------------------------------------------------


@main.group()
def bench() -> None:
    """Benchmarks."""


bench.add_command(bench_agentdojo)


@bench.command("safety")
@click.option("--scenarios", "scenarios_dir", default="scenarios", show_default=True,
              type=click.Path(exists=True), help="A scenario file or a directory searched for *.yaml.")
@click.option("--systems", default="libos", show_default=True,
              help=f"Comma-separated systems to compare, or `all` (available: {', '.join(SYSTEMS)}).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help=f"Write the report (JSON, format {REPORT_FORMAT}) here.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write DIR/report.md (tables) and DIR/safety.png (chart; needs matplotlib) here.")
@click.option("-v", "--verbose", is_flag=True, help="List every failed step.")
def bench_safety(scenarios_dir: str, systems: str, json_out: str | None, report_dir: str | None,
                 verbose: bool) -> None:
    """Run every scenario on each system and compare safety and utility.

    Prints, per system, completed scenarios, unauthorized side effects, false denials over
    allowed steps, attacks blocked, approvals asked and wall time; the same by capability kind
    and by evolution mechanism; and, for the ablations (`libos-no-*`), the unauthorized effects
    each switched-off mechanism lets through and in which scenarios. Exit status 1 if `libos`
    has any unauthorized side effect, 2 on a usage error, else 0.
    """
    names = list(SYSTEMS) if systems.strip() == "all" else [s.strip() for s in systems.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        err.print(f"[red]error:[/red] unknown system {unknown[0] if unknown else systems!r}; available: "
                  f"{', '.join(SYSTEMS)}")
        sys.exit(2)
    paths = scenario_paths(scenarios_dir)
    if not paths:
        err.print(f"[red]error:[/red] no scenario files under {escape(scenarios_dir)}")
        sys.exit(2)
    failures: list[RunResult] = []

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("scenarios", total=len(paths) * len(names))

        def tick(sid: str, system: str, r: RunResult) -> None:
            progress.update(task, advance=1, description=f"{system}: {sid}")
            if not r.completed:
                failures.append(r)

        runs = run_bench(paths, names, progress=tick)
    for t in cli_tables(runs):
        console.print(_rich_table(t))
    for r in failures:
        console.print(f"[red]not completed[/red] {r.system}/{escape(r.scenario)}: {escape(r.error or '')}")
        if verbose:
            for s in r.steps:
                if not s.ok:
                    console.print(f"    {escape(s.process)} step {s.index} {s.tool}: expected {s.expect}, "
                                  f"got {s.outcome} {s.code or ''} {escape(s.message)} {s.changes}")
            for name, ok, why in r.checks:
                if not ok:
                    console.print(f"    check {escape(name)} fails: {escape(why)}")
    if json_out:
        Path(json_out).write_text(json.dumps(report(runs), indent=2))
        console.print(f"report written to {escape(json_out)}")
    if report_dir:
        try:
            md, png = write_report(runs, report_dir)
        except RuntimeError as exc:  # matplotlib missing
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            sys.exit(2)
        console.print(f"report written to {escape(str(md))} and {escape(str(png))}")
    libos = summarize(runs).get("libos")
    sys.exit(1 if libos is not None and libos.unauthorized else 0)


def _rich_table(t: TextTable) -> Table:
    table = Table(title=t.title)
    for i, col in enumerate(t.columns):
        if t.numeric(i):
            table.add_column(col, justify="right")
        else:
            width = max((len(r[i]) for r in t.rows), default=len(col))
            wrap = col.startswith("scenarios (")
            table.add_column(col, justify="left", no_wrap=not wrap, min_width=None if wrap else width)
    breaks = set(t.breaks)
    for n, row in enumerate(t.rows):
        table.add_row(*(escape(c) for c in row), end_section=n in breaks)
    return table
