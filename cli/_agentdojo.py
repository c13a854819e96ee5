"""`agentlibos bench agentdojo`: AgentDojo's suites with a compromised scripted model, through the
kernel and unmediated; prints the utility / attack-success table (harness/_agentdojo.py runs it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agentlibos.harness._agentdojo import DOJO_SYSTEMS, SUITES, count_pairs, run_agentdojo

__all__ = ["bench_agentdojo"]

_INSTALL = "pip install 'agent-libos[bench]'"

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@click.command("agentdojo")
@click.option("--suite", "suites", multiple=True, type=click.Choice(SUITES),
              help="Run only this suite (repeatable; default: all four).")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Only the first N user tasks of each suite (each with every injection task).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write every pair's result and the summary here as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the table.")
def bench_agentdojo(suites: tuple[str, ...], limit: int | None, json_out: str | None, quiet: bool) -> None:
    """Run AgentDojo's suites with a compromised model, with and without agent-libos.

    For every user task x injection task pair, a scripted model makes the user task's
    ground-truth tool calls and then the injection task's (it obeys every injection). It runs
    twice: `libos`, where every AgentDojo tool is a syscall of the dojo Runtime Module and the
    process holds only the grants written for that user task (harness/dojo_grants/*.yaml), and
    `direct`, the same tools called unmediated. Utility is the user task's own AgentDojo check,
    attack success the injection task's. Offline: no LLM, no network.

    \b
    Examples:
      agentlibos bench agentdojo                      all suites (a minute or two)
      agentlibos bench agentdojo --suite banking --limit 3
      agentlibos bench agentdojo --json dojo.json -q

    Exit status 0 when the run completed, 2 when AgentDojo is not installed.
    """
    try:
        import agentdojo  # noqa: F401
    except ImportError:
        err.print(f"[red]error:[/red] AgentDojo is not installed; install it with: {escape(_INSTALL)}",
                  soft_wrap=True)
        sys.exit(2)
    names = list(suites) or None
    systems = DOJO_SYSTEMS
    total = count_pairs(names, limit=limit) * len(systems)
    if quiet:
        results = run_agentdojo(names, systems, limit=limit)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True) as progress:
            task = progress.add_task("agentdojo", total=total)

            def tick(system: str, pair: str) -> None:
                progress.update(task, advance=1, description=f"{system}: {escape(pair)}")

            results = run_agentdojo(names, systems, limit=limit, progress=tick)
    table = Table(title=f"AgentDojo {results.version}, compromised model ({results.wall_s:.1f} s)")
    for col in ("system", "suite"):
        table.add_column(col, justify="left", no_wrap=True)
    for col in ("pairs", "utility", "attack success", "denied calls", "false denials"):
        table.add_column(col, justify="right")
    for r in results.summary():
        style = "bold" if r.suite == "all" else None
        table.add_row(r.system, r.suite, str(r.pairs), f"{r.utility:.1f} %", f"{r.attack_success:.1f} %",
                      str(r.denied_calls), str(r.user_denied), style=style)
    console.print(table)
    errors = [p for p in results.pairs if p.error]
    for p in errors[:10]:
        console.print(f"[yellow]check error[/yellow] {p.system} {p.suite}/{p.user_task} x {p.injection_task}: "
                      f"{escape(p.error or '')}")
    if json_out:
        Path(json_out).write_text(json.dumps(results.to_json(), indent=2))
        console.print(f"results written to {escape(json_out)}")
