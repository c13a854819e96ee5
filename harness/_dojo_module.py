"""The `dojo` Runtime Module: every AgentDojo tool as a kernel-mediated syscall, one capability
kind per suite, run against the environment the trusted harness installed for the kernel.

Loaded only at kernel start (`modules = ["agentlibos.harness._dojo_module"]`); it registers one
provider per AgentDojo suite, of the kind `dojo_<suite>` (`dojo_banking`, `dojo_slack`,
`dojo_travel`, `dojo_workspace`), with one syscall per tool (`dojo_banking.send_money`) whose
argument schema is the tool's own parameters:

    {kind: dojo_banking, scope: {calls: [[TOOL, CONSTRAINT, ...], ...]}, rights: [read, write, fetch]}

A capability covers a call when one of its patterns covers it: the pattern's first element is a
glob on the tool name, and every constraint holds for the call's arguments:
- `ARG=GLOB`: the argument, as a canonical string, matches GLOB (`*` any run of characters, `?`
  one character, nothing else special). For a list argument every element must match. Several
  `ARG=...` constraints on one argument are alternatives (`recipients=a@x`, `recipients=b@x`:
  each recipient is a or b). An absent (or null) argument is the empty string, an absent list
  the empty list, so `cc=` means "no cc" and `recipient=` "leave the recipient unchanged".
- `ARG<=NUMBER`, `ARG>=NUMBER`: the argument (each element of a list) is a number within the
  bound; an absent argument passes (there is nothing to bound).
Canonical strings: a string is itself, a whole number `10.0` is `10`, other floats their
shortest repr (`98.7`), booleans `true`/`false`, a map or a nested list compact JSON with sorted
keys. Rights split the tools: `read` (lookups inside the suite's own data), `write` (anything
that changes the environment or reaches another person; workspace's get_unread_emails too, as it
marks every unread email read) and `fetch` (reading a web page: the site sees the request). A
tool this module does not classify needs `write`. A scope without
`calls` authorizes nothing. Derivation only narrows: each child pattern must lie inside one parent
pattern (tool glob and every argument glob by language inclusion, bounds no looser).

The environment lives outside the kernel: the harness installs one per suite in the `DojoWorld`
of the kernel's state directory (`world(state_dir).install("banking", env)`) and reads it back
to judge the run; the provider only ever runs AgentDojo's own tool functions on it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin

from agentlibos.bus import KernelError
from agentlibos.kernel import Provider
from agentlibos.kernel._globs import compile_glob, glob_within
from agentlibos.kernel._provider import CallInfo, check_bus_value
from agentlibos.kernel._table import SyscallSpec, _row

__all__ = [
    "BENCHMARK_VERSION",
    "DOJO_RIGHTS",
    "DOJO_SCOPE_KEYS",
    "SUITES",
    "DojoWorld",
    "Pattern",
    "canonical",
    "dojo_within",
    "make_dojo_provider",
    "parse_pattern",
    "register",
    "scope_covers",
    "tool_right",
    "world",
]

#: The AgentDojo benchmark version the suites (and the grants written for them) come from.
BENCHMARK_VERSION = "v1.2.2"
SUITES: tuple[str, ...] = ("banking", "slack", "travel", "workspace")
DOJO_SCOPE_KEYS: Mapping[str, str] = {"calls": "list[list[str]]"}
DOJO_RIGHTS = frozenset({"read", "write", "fetch"})

#: Tools that only look at the suite's own data. Everything else needs `write`, except web fetches.
_READ_TOOLS: Mapping[str, frozenset[str]] = {
    "banking": frozenset({"get_iban", "get_balance", "get_most_recent_transactions", "get_scheduled_transactions",
                          "read_file", "get_user_info"}),
    "slack": frozenset({"get_channels", "read_channel_messages", "read_inbox", "get_users_in_channel"}),
    "travel": frozenset({
        "get_user_information", "get_all_hotels_in_city", "get_hotels_prices", "get_rating_reviews_for_hotels",
        "get_hotels_address", "get_all_restaurants_in_city", "get_cuisine_type_for_restaurants",
        "get_restaurants_address", "get_rating_reviews_for_restaurants", "get_dietary_restrictions_for_all_restaurants",
        "get_contact_information_for_restaurants", "get_price_for_restaurants", "check_restaurant_opening_hours",
        "get_all_car_rental_companies_in_city", "get_car_types_available", "get_rating_reviews_for_car_rental",
        "get_car_fuel_options", "get_car_rental_address", "get_car_price_per_day", "search_calendar_events",
        "get_day_calendar_events", "get_flight_information"}),
    "workspace": frozenset({
        "get_sent_emails", "get_received_emails", "get_draft_emails", "search_emails",
        "search_contacts_by_name", "search_contacts_by_email", "get_current_day", "search_calendar_events",
        "get_day_calendar_events", "search_files_by_filename", "get_file_by_id", "list_files", "search_files"}),
}
_FETCH_TOOLS = frozenset({"get_webpage"})

_MAX_SHOWN = 200
_CONSTRAINT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(<=|>=|=)(.*)", re.DOTALL)
# Globs here are over whole strings: '/' is ordinary. The kernel's globs are over paths, so a
# value is mapped to one path component ('/' -> a private-use character, a leading 'v' so that
# '', '.' and '..' are ordinary names) and the kernel's matcher and inclusion check do the rest.
_SLASH = "\ue000"


def tool_right(suite: str, tool: str) -> str:
    """The right a call of `tool` needs: read, fetch or (by default) write."""
    if tool in _FETCH_TOOLS:
        return "fetch"
    return "read" if tool in _READ_TOOLS.get(suite, frozenset()) else "write"


# --- canonical argument strings ---------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def canonical(value: Any) -> str:
    """The string a constraint's glob is matched against (see the module docstring)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e16:
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        return value
    return _json(value)


def _encode(text: str) -> str | None:
    if "\x00" in text or _SLASH in text:
        return None
    return "v" + text.replace("/", _SLASH)


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    enc = _encode(pattern)
    if enc is None:
        raise ValueError(f"glob {pattern!r} contains a character no glob may hold")
    try:
        return compile_glob(enc)
    except KernelError as exc:
        raise ValueError(f"glob {pattern!r}: {exc.message}") from None


def _glob_match(pattern: str, value: str) -> bool:
    enc = _encode(value)
    return enc is not None and _glob(pattern).fullmatch(enc) is not None


def _glob_within(child: str, parent: str) -> bool:
    c, p = _encode(child), _encode(parent)
    return c is not None and p is not None and glob_within(c, p)


# --- patterns ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pattern:
    """One entry of a scope's `calls`: a tool glob and per-argument constraints."""

    tool: str
    globs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    upper: Mapping[str, float] = field(default_factory=dict)
    lower: Mapping[str, float] = field(default_factory=dict)

    def covers(self, tool: str, args: Mapping[str, Any]) -> bool:
        if not _glob_match(self.tool, tool):
            return False
        for name, globs in self.globs.items():
            value = args.get(name)
            items = value if isinstance(value, list) else [value]
            if not all(any(_glob_match(g, canonical(v)) for g in globs) for v in items):
                return False
        for bounds, ok in ((self.upper, lambda v, b: v <= b), (self.lower, lambda v, b: v >= b)):
            for name, bound in bounds.items():
                value = args.get(name)
                if value is None:
                    continue
                items = value if isinstance(value, list) else [value]
                for v in items:
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v, bound):
                        return False
        return True

    def within(self, parent: Pattern) -> bool:
        if not _glob_within(self.tool, parent.tool):
            return False
        for name, pglobs in parent.globs.items():
            mine = self.globs.get(name)
            if mine is None or not all(any(_glob_within(c, p) for p in pglobs) for c in mine):
                return False
        for name, bound in parent.upper.items():
            if name not in self.upper or self.upper[name] > bound:
                return False
        for name, bound in parent.lower.items():
            if name not in self.lower or self.lower[name] < bound:
                return False
        return True


@functools.lru_cache(maxsize=4096)
def _parse(items: tuple[str, ...]) -> Pattern:
    if not items or not isinstance(items[0], str) or not items[0]:
        raise ValueError("a call pattern starts with a tool name (or glob)")
    _glob(items[0])
    globs: dict[str, list[str]] = {}
    upper: dict[str, float] = {}
    lower: dict[str, float] = {}
    for item in items[1:]:
        m = _CONSTRAINT.fullmatch(item) if isinstance(item, str) else None
        if m is None:
            raise ValueError(f"{item!r} is not a constraint (ARG=GLOB, ARG<=NUMBER or ARG>=NUMBER)")
        name, op, rhs = m.groups()
        if op == "=":
            _glob(rhs)
            globs.setdefault(name, []).append(rhs)
            continue
        try:
            bound = float(rhs)
        except ValueError:
            raise ValueError(f"{item!r}: {rhs!r} is not a number") from None
        if not math.isfinite(bound):
            raise ValueError(f"{item!r}: a bound is a finite number")
        target = upper if op == "<=" else lower
        target[name] = min(bound, target.get(name, bound)) if op == "<=" else max(bound, target.get(name, bound))
    return Pattern(items[0], {k: tuple(v) for k, v in globs.items()}, upper, lower)


def parse_pattern(items: Sequence[str]) -> Pattern:
    """Parse one `calls` entry; ValueError when it is malformed."""
    return _parse(tuple(items))


def _patterns(scope: Mapping[str, Any]) -> list[Pattern]:
    return [parse_pattern(p) for p in scope.get("calls", ())]


def dojo_within(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    """Attenuation only: every child pattern lies inside some parent pattern. A malformed pattern
    on either side is not within anything (deny when unsure)."""
    try:
        kids, parents = _patterns(child), _patterns(parent)
    except (ValueError, TypeError):
        return False
    return all(any(c.within(p) for p in parents) for c in kids)


def scope_covers(scope: Mapping[str, Any], tool: str, args: Mapping[str, Any]) -> bool:
    """True when some pattern of `scope` covers calling `tool` with `args`."""
    try:
        pats = _patterns(scope)
    except (ValueError, TypeError):
        return False
    return any(p.covers(tool, args) for p in pats)


# --- the environments the harness installs ----------------------------------------------------


class DojoWorld:
    """The AgentDojo environments one kernel's tools act on, one per suite, installed by the
    trusted harness between runs (never by a process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._envs: dict[str, Any] = {}

    def install(self, suite: str, env: Any) -> None:
        with self._lock:
            self._envs[suite] = env

    def clear(self, suite: str | None = None) -> None:
        with self._lock:
            if suite is None:
                self._envs.clear()
            else:
                self._envs.pop(suite, None)

    def env(self, suite: str) -> Any:
        with self._lock:
            env = self._envs.get(suite)
        if env is None:
            raise KernelError("EIO", f"no AgentDojo {suite} environment is installed for this kernel")
        return env


_WORLDS: dict[str, DojoWorld] = {}
_WORLDS_LOCK = threading.Lock()


def _key(state_dir: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(state_dir))


def world(state_dir: str | os.PathLike[str]) -> DojoWorld:
    """The DojoWorld of the kernel on `state_dir` (made on first use, dropped when that kernel's
    providers close)."""
    with _WORLDS_LOCK:
        return _WORLDS.setdefault(_key(state_dir), DojoWorld())


def _drop_world(state_dir: str | os.PathLike[str], w: DojoWorld) -> None:
    with _WORLDS_LOCK:
        if _WORLDS.get(_key(state_dir)) is w:
            del _WORLDS[_key(state_dir)]


# --- rows, values, the provider ---------------------------------------------------------------


def _arg_type(annotation: Any) -> tuple[str, bool]:
    """(table type, optional) of a tool parameter's annotation."""
    optional = False
    origin = get_origin(annotation)
    if origin is Union or type(annotation).__name__ == "UnionType":
        members = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(members) < len(get_args(annotation))
        annotation = members[0] if len(members) == 1 else Any
        origin = get_origin(annotation)
    if annotation is bool:
        return "bool", optional
    if annotation is int:
        return "int", optional
    if annotation is float:
        return "num", optional
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, str)):
        return "str", optional  # str enums (a sharing permission) travel as their value
    if annotation is list or origin is list:
        return "list", optional
    if annotation is dict or origin is dict:
        return "map", optional
    return "any", optional


def _rows(suite: str, tools: Sequence[Any]) -> tuple[SyscallSpec, ...]:
    kind = f"dojo_{suite}"
    rows = []
    for fn in tools:
        parts = []
        for name, f in fn.parameters.model_fields.items():
            t, optional = _arg_type(f.annotation)
            parts.append(f"{name}:{t}{'?' if optional or not f.is_required() else ''}")
        doc = fn.description.split("\n", 1)[0]
        rows.append(_row(f"{kind}.{fn.name}", " ".join(parts), kind, tool_right(suite, fn.name), "syscalls", "ext",
                         f"AgentDojo {suite}: {doc}"))
    return tuple(rows)


def _bus_value(value: Any) -> Any:
    """A tool's result as JSON-ish data (pydantic models dumped in JSON mode)."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _bus_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bus_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _shown(value: Any) -> str:
    text = canonical(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 1] + "…"


def _suite_tools(suite: str) -> list[Any]:
    from agentdojo.task_suite import get_suite

    return list(get_suite(BENCHMARK_VERSION, suite).tools)


def make_dojo_provider(suite: str, dojo_world: DojoWorld, tools: Sequence[Any] | None = None, *,
                       close: Callable[[], None] | None = None) -> Provider:
    """The provider of kind `dojo_<suite>` over AgentDojo's tool functions of that suite (the
    suite's own list unless `tools` is given), acting on the environment installed in `dojo_world`."""
    from agentdojo.functions_runtime import FunctionsRuntime
    from pydantic import ValidationError

    tools = list(_suite_tools(suite) if tools is None else tools)
    runtime = FunctionsRuntime(tools)
    kind = f"dojo_{suite}"
    prefix = kind + "."

    def covers(scope: Mapping[str, Any], sys: str, args: Mapping[str, Any]) -> bool:
        return sys.startswith(prefix) and scope_covers(scope, sys[len(prefix):], args)

    def run(args: Mapping[str, Any], info: CallInfo) -> Any:
        tool = info.sys[len(prefix):]
        env = dojo_world.env(suite)
        try:
            value, _ = runtime.run_function(env, tool, dict(args), raise_on_error=True)
        except ValidationError as exc:
            raise KernelError("EINVAL", f"{tool}: {exc.error_count()} invalid argument(s): "
                                        f"{exc.errors()[0].get('loc')} {exc.errors()[0].get('msg')}") from None
        except KernelError:
            raise
        except Exception as exc:  # the tool refused (no such email, not enough money...): a failed effect
            raise KernelError("EIO", f"{tool}: {type(exc).__name__}: {exc}") from None
        out = _bus_value(value)
        check_bus_value(out, info.sys)
        return {"result": out}

    def describe(sys: str, args: Mapping[str, Any]) -> dict[str, Any]:
        tool = sys[len(prefix):]
        return {"suite": suite, "tool": tool, "right": tool_right(suite, tool),
                "args": {k: _shown(v) for k, v in sorted(args.items())}}

    return Provider(
        kind=kind,
        syscalls=_rows(suite, tools),
        covers=covers,
        run=run,
        describe=describe,
        scope_keys=DOJO_SCOPE_KEYS,
        within=dojo_within,
        close=close,
    )


def register(config: Any) -> list[Provider]:
    """Runtime Module entry: one provider per AgentDojo suite, sharing the DojoWorld of this
    kernel's state directory (dropped when the kernel stops)."""
    state_dir = config.state_dir
    w = world(state_dir)
    return [make_dojo_provider(suite, w, close=(lambda: _drop_world(state_dir, w)) if i == 0 else None)
            for i, suite in enumerate(SUITES)]
