"""`Runtime`: bus + kernel + a process host in one Python process (the embedded default).

The Python API starts here; every method is an operator request through the kernel, so what a
script does is logged and decided exactly like what the CLI or a remote client does.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from agentlibos.actors import ProcessHost, ScriptedModel, ToolObserver
from agentlibos.bus import BusError, EventStream, KernelClient, Topic, ipc_dir
from agentlibos.kernel import (
    Inspect,
    Kernel,
    KernelConfig,
    ModelBackend,
    Provider,
    make_mcp_provider,
    make_pty_provider,
    make_rpc_provider,
)
from agentlibos.kernel._modules import load_modules
from agentlibos.storage import SQLiteLog


@dataclass(frozen=True, slots=True)
class Exit:
    """How a process ended."""

    pid: int
    status: str
    result: Any


@dataclass(frozen=True, slots=True)
class Grant:
    """An operator grant, as the Python API spells it (same fields as ABI.md)."""

    kind: str
    scope: Mapping[str, Any]
    rights: Sequence[str]
    name: str | None = None
    approval: str = "never"
    expires_in_s: float | None = None
    uses: int | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "scope": dict(self.scope), "rights": list(self.rights),
                               "approval": self.approval}
        if self.name is not None:
            out["name"] = self.name
        if self.expires_in_s is not None:
            out["expires_in_s"] = self.expires_in_s
        if self.uses is not None:
            out["uses"] = self.uses
        return out


def _grant_wire(g: Grant | Mapping[str, Any]) -> dict[str, Any]:
    return g.to_wire() if isinstance(g, Grant) else dict(g)


def _process_args(caps: Iterable[Grant | Mapping[str, Any]], requestable: Iterable[Grant | Mapping[str, Any]],
                  budget: Mapping[str, float] | None, **fields: Any) -> dict[str, Any]:
    """op.spawn / op.ckpt.fork arguments: the grants, and each field that was given (not None)."""
    args: dict[str, Any] = {"caps": [_grant_wire(g) for g in caps], **{k: v for k, v in fields.items() if v is not None}}
    ceiling = [_grant_wire(g) for g in requestable]
    if ceiling:
        args["requestable"] = ceiling
    if budget is not None:
        args["budget"] = dict(budget)
    return args


#: Open files kept for everything but process sockets (see `Runtime.start`).
FD_RESERVE = 1024


class Runtime:
    """An embedded kernel on a state directory, with a process host and an operator connection.

    ```
    with Runtime("state", world_root="world") as rt:
        rt.register_image("notes", prompt="You keep notes.", tools=["fs_read"])
        pid = rt.spawn("notes", caps=[Grant("fs", {"root": "workspace"}, ["read"])])
    ```
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        world_root: str | os.PathLike[str] | None = None,
        models: Mapping[str, ModelBackend] | None = None,
        observer: ToolObserver | None = None,
        ipc: bool = True,
        providers: Iterable[Provider] = (),
        **config: Any,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = KernelConfig.load(self.state_dir, world_root, **config)
        self.config.world_root.mkdir(parents=True, exist_ok=True)
        self.models: dict[str, ModelBackend] = dict(models or {"scripted": ScriptedModel({})})
        self._observer = observer
        self._ipc = ipc
        self._providers = list(providers)
        # The built-in providers, configured from the kernel config, unless given explicitly.
        given = {p.kind for p in self._providers}
        cfg = self.config
        if "rpc" not in given:
            self._providers.append(make_rpc_provider(dict(cfg.rpc_endpoints)))
        if "mcp" not in given:
            self._providers.append(make_mcp_provider({k: dict(v) for k, v in cfg.mcp_servers.items()}))
        if "pty" not in given:
            self._providers.append(make_pty_provider(path=cfg.path, world_root=str(cfg.world_root),
                                                     env=dict(cfg.shell_env)))
        # Runtime Modules named in the config: loaded here, before the kernel exists, and never later.
        self._providers.extend(load_modules(cfg.modules, cfg))
        self._local = threading.local()
        self._clients: list[KernelClient] = []
        self._clients_lock = threading.Lock()
        self._started = False

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Runtime:
        if self._started:
            return self
        # One kernel per state directory: two writers would fork the log's hash chain.
        self._lock_fd = os.open(self.state_dir / "kernel.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            raise BusError(f"a kernel is already running on {self.state_dir} (pid {holder or '?'}); stop it or use "
                           "another --state directory") from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)
        self.context: zmq.Context[Any] = zmq.Context()
        # Every live process holds a socket: ZeroMQ's default of 1023 would cap a host far below
        # its thread ceiling, so the open-files limit is the cap (raise `ulimit -n` for more), less
        # a reserve for the log, pipes, PTYs and subprocesses. A process past it ends with an error.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.context.set(zmq.MAX_SOCKETS, max(1023, nofile - FD_RESERVE))
        tag = f"{os.getpid()}-{id(self)}"
        self.inproc_endpoint = f"inproc://agentlibos-kernel-{tag}"
        self.inproc_events = f"inproc://agentlibos-events-{tag}"
        endpoints, events = [self.inproc_endpoint], [self.inproc_events]
        self.endpoint = self.inproc_endpoint
        self.events_endpoint = self.inproc_events
        if self._ipc:
            run = ipc_dir(self.state_dir)
            self.endpoint = f"ipc://{run}/kernel.sock"
            self.events_endpoint = f"ipc://{run}/events.sock"
            endpoints.append(self.endpoint)
            events.append(self.events_endpoint)
        self.log = SQLiteLog(self.state_dir / "log.db")
        self.kernel = Kernel.start(self.config, self.log, self.context, endpoints, events, self.models,
                                   self._providers)
        try:
            bound = self.kernel.ask(Inspect(lambda k: k.bound), timeout=30)
        except Exception as exc:
            bound, why = False, exc
        else:
            why = "its sockets could not be bound"
        if not bound:
            self.log.close()
            self.context.term()
            os.close(self._lock_fd)
            raise BusError(f"the kernel did not start: {why}")
        self._write_connection_file()
        # The `jit-sandbox` ablation (benchmark only) runs JIT tools without their sandbox.
        jit_options = {"sandbox": False} if "jit-sandbox" in self.config.ablate else None
        self.host = ProcessHost(self.context, self.inproc_endpoint, self.config.host_token, observer=self._observer,
                                jit_options=jit_options, hibernate_after_s=self.config.hibernate_after_s)
        self.host.start()
        self._started = True
        return self

    def _write_connection_file(self) -> None:
        path = self.state_dir / "connection.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"endpoint": self.endpoint, "events": self.events_endpoint,
                       "operator_token": self.config.operator_token, "pid": os.getpid()}, fh)

    def stop(self) -> None:
        """A clean stop: the host first (it hands the kernel the processes idle between turns),
        then the kernel, whose stop entry lets those and outside processes carry on after a restart."""
        if not self._started:
            return
        self._started = False
        self.host.stop()
        with self._clients_lock:
            for c in self._clients:
                c.close()
            self._clients.clear()
        self.kernel.stop(timeout=10)
        self.log.close()
        self.context.term()
        try:
            (self.state_dir / "connection.json").unlink()
        except FileNotFoundError:
            pass
        os.close(self._lock_fd)

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the operator's API --------------------------------------------------------------------
    @property
    def operator(self) -> KernelClient:
        """A KernelClient with operator credentials, one per calling thread."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = KernelClient(self.inproc_endpoint, context=self.context, token=self.config.operator_token,
                                  role="operator", timeout_s=None)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def images(self) -> list[dict[str, Any]]:
        return list(self.operator.call("op.images")["images"])

    def register_image(self, name: str, *, prompt: str = "", tools: Iterable[str] = (), model: str | None = None,
                       budget: Mapping[str, float] | None = None, skills: Iterable[str] = (),
                       jit_tools: Mapping[str, Mapping[str, Any]] | None = None) -> str:
        """Register (or replace) an AgentImage; returns its content digest. Images carry no capabilities."""
        args: dict[str, Any] = {"name": name, "prompt": prompt, "tools": list(tools), "skills": list(skills),
                                "jit_tools": {k: dict(v) for k, v in (jit_tools or {}).items()}}
        if model is not None:
            args["model"] = model
        if budget is not None:
            args["budget"] = dict(budget)
        return str(self.operator.call("op.image.register", args)["digest"])

    def spawn(self, image: str, *, caps: Iterable[Grant | Mapping[str, Any]] = (), budget: Mapping[str, float] | None = None,
              input: Any = None, model: str | None = None, daemon: bool = False,
              requestable: Iterable[Grant | Mapping[str, Any]] = ()) -> int:
        """Start a process with exactly `caps`; `requestable` is the ceiling of what it may ask a
        human for with cap.request (nothing by default)."""
        args = _process_args(caps, requestable, budget, image=image, daemon=daemon, input=input, model=model)
        return int(self.operator.call("op.spawn", args)["pid"])

    def spawn_external(self, image: str, *, caps: Iterable[Grant | Mapping[str, Any]] = (),
                       budget: Mapping[str, float] | None = None,
                       requestable: Iterable[Grant | Mapping[str, Any]] = ()) -> tuple[int, str]:
        """A process that no host runs: returns (pid, token) for a client that says hello with the
        token (`client(token)`, or any ZeroMQ client speaking docs/protocol.md)."""
        v = self.operator.call("op.spawn", _process_args(caps, requestable, budget, image=image, external=True))
        return int(v["pid"]), str(v["token"])

    def send(self, pid: int, input: Any) -> None:
        self.operator.call("op.send", {"pid": pid, "input": input})

    def wait(self, pid: int, timeout_s: float | None = None) -> Exit:
        args: dict[str, Any] = {"pid": pid}
        if timeout_s is not None:
            args["timeout_s"] = timeout_s
        v = self.operator.call("op.wait", args)
        return Exit(pid=v["pid"], status=v["status"], result=v.get("result"))

    def grant(self, pid: int, grant: Grant | Mapping[str, Any]) -> str:
        return str(self.operator.call("op.grant", {"pid": pid, **_grant_wire(grant)})["handle"])

    def revoke(self, pid: int, handle: str) -> list[int]:
        return list(self.operator.call("op.revoke", {"pid": pid, "handle": handle})["revoked"])

    def kill(self, pid: int) -> list[int]:
        return list(self.operator.call("op.kill", {"pid": pid})["killed"])

    def suspend(self, pid: int) -> None:
        """Hold a process's requests undecided until `resume` (its model may still be thinking)."""
        self.operator.call("op.suspend", {"pid": pid})

    def resume(self, pid: int) -> None:
        self.operator.call("op.resume", {"pid": pid})

    def interrupt(self, pid: int) -> int:
        """Stop a process's current turn (what it waits on, or its next syscall, gets EINTR); it
        then waits for a follow-up `send`. Returns how many waiting requests were ended now."""
        return int(self.operator.call("op.interrupt", {"pid": pid})["interrupted"])

    def deadline(self, pid: int, in_s: float | None) -> float | None:
        """Kill the process and its subtree `in_s` seconds from now (None: clear the deadline)."""
        args: dict[str, Any] = {"pid": pid}
        if in_s is not None:
            args["in_s"] = in_s
        v = self.operator.call("op.deadline", args)["deadline"]
        return None if v is None else float(v)

    def checkpoint(self, pid: int, label: str | None = None) -> int:
        """Snapshot process `pid` as the kernel sees it (conversation to its last model answer, JIT
        tools, Skills, memory, queues, handles); returns the checkpoint's id."""
        args: dict[str, Any] = {"pid": pid}
        if label is not None:
            args["label"] = label
        return int(self.operator.call("op.ckpt.create", args)["checkpoint"])

    def checkpoints(self, pid: int | None = None) -> list[dict[str, Any]]:
        return list(self.operator.call("op.ckpt.list", {} if pid is None else {"pid": pid})["checkpoints"])

    def restore(self, pid: int, checkpoint: int | str) -> dict[str, Any]:
        """Roll process `pid` back to one of its checkpoints (an id or a label). Capabilities revoked
        or expired since stay dead and budget spent stays spent; a turn in progress finishes first
        (`interrupt` or `suspend` it before to stop it)."""
        return dict(self.operator.call("op.ckpt.restore", {"pid": pid, "checkpoint": checkpoint}))

    def fork(self, checkpoint: int | str, *, caps: Iterable[Grant | Mapping[str, Any]] = (),
             budget: Mapping[str, float] | None = None, input: Any = None, model: str | None = None,
             daemon: bool = False) -> int:
        """Start a new root process from a checkpoint: its conversation, JIT tools, Skills and
        memory, holding exactly `caps` (never the checkpoint's)."""
        args = _process_args(caps, (), budget, checkpoint=checkpoint, daemon=daemon, input=input, model=model)
        return int(self.operator.call("op.ckpt.fork", args)["pid"])

    def ps(self) -> list[dict[str, Any]]:
        return list(self.operator.call("op.ps")["processes"])

    def caps(self, pid: int | None = None) -> list[dict[str, Any]]:
        return list(self.operator.call("op.caps", {} if pid is None else {"pid": pid})["caps"])

    def events(self, *topics: Topic | str) -> EventStream:
        """Subscribe to kernel events (`audit/`, `proc/<pid>/`, ...); close it when done."""
        return EventStream(self.inproc_events, topics or ("",), context=self.context)

    def client(self, token: str) -> KernelClient:
        """A process-role client (tests and external agents use the process's token)."""
        return KernelClient(self.inproc_endpoint, context=self.context, token=token)

    def inspect(self, fn: Any) -> Any:
        """Run a read-only function on the kernel thread and return its result."""
        return self.kernel.ask(Inspect(fn))
