"""What every `agentlibos` command shares: the consoles, the --state option, and the operator
connection to the kernel running on a state directory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

DEFAULT_STATE = ".agentlibos"
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

state_option = click.option(
    "--state", "state", default=DEFAULT_STATE, show_default=True, type=click.Path(file_okay=False),
    help="State directory holding the log (log.db) and, while a kernel runs, its connection.json.",
)


def _operator(state: str) -> Any:
    from agentlibos.bus import BusError, KernelClient

    path = Path(state) / "connection.json"
    try:
        conn = json.loads(path.read_text())
    except (OSError, ValueError):
        err.print(f"[red]error:[/red] no running kernel on {escape(state)} (start one with `agentlibos kernel --state "
                  f"{escape(state)}`)")
        sys.exit(2)
    if not _kernel_running(Path(state)):
        err.print(f"[red]error:[/red] no kernel is running on {escape(state)} (its connection.json is left from one "
                  f"that did not stop cleanly); start one with `agentlibos kernel --state {escape(state)}`")
        sys.exit(2)
    try:
        return KernelClient(conn["endpoint"], token=conn["operator_token"], role="operator", timeout_s=10)
    except BusError as exc:
        err.print(f"[red]error:[/red] the kernel on {escape(state)} does not answer: {escape(str(exc))}")
        sys.exit(2)


def _kernel_running(state: Path) -> bool:
    """A running kernel holds an exclusive lock on STATE/kernel.lock; if we can take it, none is."""
    import fcntl

    try:
        fd = os.open(state / "kernel.lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def _op_call(state: str, sys_name: str, args: dict[str, Any]) -> Any:
    from agentlibos.bus import KernelError

    with _operator(state) as client:
        try:
            return client.call(sys_name, args)
        except KernelError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            sys.exit(1)
