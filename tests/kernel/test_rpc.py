"""The rpc provider through the real embedded runtime, against real JSON-RPC servers on 127.0.0.1:
allow-list, endpoint names, no redirects, timeouts, response size, JSON-RPC errors, DNS pinning,
and the log of every decision and result.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from agentlibos.bus import KernelClient, KernelError
from agentlibos.harness._servers import RpcServer
from agentlibos.kernel._provider import CallInfo
from agentlibos.kernel._rpc import make_rpc_provider, normalize_url, rpc_within
from agentlibos.runtime import Runtime
from agentlibos.storage import SQLiteLog

CRM = {"kind": "rpc", "scope": {"endpoint": "crm", "methods": ["notes.append"]}, "rights": ["call"]}


def rpc_cap(endpoint: str, methods: list[str] | None = None) -> dict[str, Any]:
    scope: dict[str, Any] = {"endpoint": endpoint}
    if methods is not None:
        scope["methods"] = methods
    return {"kind": "rpc", "scope": scope, "rights": ["call"]}


@contextmanager
def runtime(tmp_path: Path, endpoints: Mapping[str, str], caps: list[dict[str, Any]], **kw: Any
            ) -> Iterator[tuple[Runtime, KernelClient]]:
    rt = Runtime(tmp_path / "s", world_root=tmp_path / "w", ipc=False, providers=[make_rpc_provider(endpoints, **kw)])
    with rt:
        rt.register_image("x")
        _, token = rt.spawn_external("x", caps=caps)
        c = rt.client(token)
        try:
            yield rt, c
        finally:
            c.close()


def code_of(c: KernelClient, args: dict[str, Any]) -> str:
    with pytest.raises(KernelError) as ei:
        c.call("rpc.call", args)
    return ei.value.code


def error_of(c: KernelClient, args: dict[str, Any]) -> KernelError:
    with pytest.raises(KernelError) as ei:
        c.call("rpc.call", args)
    return ei.value


@pytest.fixture
def crm() -> Iterator[RpcServer]:
    with RpcServer("crm", {"notes.append": "ok", "backup.upload": "ok", "big": "x" * 5000}) as s:
        yield s


# --- authorization -------------------------------------------------------------------------------


def test_allowed_method_returns_the_servers_value(tmp_path: Path, crm: RpcServer) -> None:
    with runtime(tmp_path, {"crm": crm.url}, [CRM]) as (_, c):
        v = c.call("rpc.call", {"endpoint": "crm", "method": "notes.append", "params": {"text": "hi"}})
        assert v == {"result": "ok"}
        # Without params: the request carries none.
        assert c.call("rpc.call", {"endpoint": "crm", "method": "notes.append"}) == {"result": "ok"}
    reqs = crm.requests
    assert [(r.method, r.params) for r in reqs] == [("notes.append", {"text": "hi"}), ("notes.append", None)]
    first = json.loads(reqs[0].body)
    assert first["jsonrpc"] == "2.0" and first["method"] == "notes.append" and isinstance(first["id"], int)
    assert "params" not in json.loads(reqs[1].body)
    assert crm.count("notes.append") == 2


def test_method_not_in_allow_list_is_eperm_and_nothing_is_sent(tmp_path: Path, crm: RpcServer) -> None:
    with runtime(tmp_path, {"crm": crm.url}, [CRM]) as (_, c):
        assert code_of(c, {"endpoint": "crm", "method": "backup.upload", "params": {"data": "s"}}) == "EPERM"
        # Exact strings: no prefixes, case or globs.
        assert code_of(c, {"endpoint": "crm", "method": "notes.append2"}) == "EPERM"
        assert code_of(c, {"endpoint": "crm", "method": "Notes.Append"}) == "EPERM"
        assert code_of(c, {"endpoint": "crm", "method": "notes.*"}) == "EPERM"
    assert crm.count() == 0


def test_scope_without_methods_authorizes_nothing(tmp_path: Path, crm: RpcServer) -> None:
    rt = Runtime(tmp_path / "s", world_root=tmp_path / "w", ipc=False, providers=[make_rpc_provider({"crm": crm.url})])
    with rt:
        rt.register_image("x")
        try:
            _, token = rt.spawn_external("x", caps=[rpc_cap("crm")])
        except KernelError as exc:
            assert exc.code == "EINVAL"  # the kernel may refuse such a grant outright
        else:
            c = rt.client(token)
            try:
                assert code_of(c, {"endpoint": "crm", "method": "notes.append"}) == "EPERM"
            finally:
                c.close()
    assert crm.count() == 0


def test_other_endpoint_name_is_eperm(tmp_path: Path, crm: RpcServer) -> None:
    with RpcServer("other", {"notes.append": "other"}) as other:
        with runtime(tmp_path, {"crm": crm.url, "other": other.url}, [CRM]) as (_, c):
            assert code_of(c, {"endpoint": "other", "method": "notes.append"}) == "EPERM"
            assert code_of(c, {"endpoint": "nope", "method": "notes.append"}) == "EPERM"
        assert other.count() == 0
    assert crm.count() == 0


def test_url_as_endpoint_is_eperm_without_allow_urls(tmp_path: Path, crm: RpcServer) -> None:
    # Even a capability that names the URL itself does not authorize it when the operator did
    # not enable URL endpoints.
    caps = [CRM, rpc_cap(crm.url, ["notes.append"])]
    with runtime(tmp_path, {"crm": crm.url}, caps) as (_, c):
        assert code_of(c, {"endpoint": crm.url, "method": "notes.append"}) == "EPERM"
        assert code_of(c, {"endpoint": crm.url.rstrip("/"), "method": "notes.append"}) == "EPERM"
    assert crm.count() == 0


def test_url_endpoint_with_allow_urls_compares_normalized(tmp_path: Path, crm: RpcServer) -> None:
    upper = crm.url.replace("http://", "HTTP://")
    with runtime(tmp_path, {}, [rpc_cap(upper, ["notes.append"])], allow_urls=True) as (_, c):
        assert c.call("rpc.call", {"endpoint": crm.url.rstrip("/"), "method": "notes.append"}) == {"result": "ok"}
        assert code_of(c, {"endpoint": crm.url + "other", "method": "notes.append"}) == "EPERM"
        assert code_of(c, {"endpoint": crm.url.replace("http:", "https:"), "method": "notes.append"}) == "EPERM"
        assert code_of(c, {"endpoint": crm.url, "method": "backup.upload"}) == "EPERM"
    assert crm.count() == 1


def test_name_in_cap_but_not_configured_is_enoent(tmp_path: Path, crm: RpcServer) -> None:
    with runtime(tmp_path, {"crm": crm.url}, [rpc_cap("ghost", ["notes.append"])]) as (_, c):
        e = error_of(c, {"endpoint": "ghost", "method": "notes.append"})
        assert e.code == "ENOENT" and "no such endpoint configured" in e.message
    assert crm.count() == 0


def test_params_must_be_structured(tmp_path: Path, crm: RpcServer) -> None:
    with runtime(tmp_path, {"crm": crm.url}, [CRM]) as (_, c):
        assert code_of(c, {"endpoint": "crm", "method": "notes.append", "params": "text"}) == "EINVAL"
        assert code_of(c, {"endpoint": "crm", "method": "notes.append", "params": {"b": b"\x00"}}) == "EINVAL"
        assert c.call("rpc.call", {"endpoint": "crm", "method": "notes.append", "params": [1, "a"]}) == {"result": "ok"}
    assert [r.params for r in crm.requests] == [[1, "a"]]


# --- transport -----------------------------------------------------------------------------------


def test_redirect_is_refused(tmp_path: Path) -> None:
    with RpcServer("target", {"notes.append": "stolen"}) as target:
        def redirect(body: bytes) -> tuple[int, dict[str, str], bytes]:
            return 307, {"Location": target.url}, b""

        with RpcServer("crm", {"notes.append": "ok"}, respond=redirect) as crm:
            with runtime(tmp_path, {"crm": crm.url}, [CRM]) as (_, c):
                e = error_of(c, {"endpoint": "crm", "method": "notes.append", "params": {"t": 1}})
                assert e.code == "EIO" and "redirect refused" in e.message
            assert crm.count() == 1
        assert target.count() == 0


def test_slow_server_times_out(tmp_path: Path) -> None:
    release = threading.Event()
    entered = threading.Event()

    def slow(params: Any) -> str:
        entered.set()
        release.wait()
        return "late"

    with ExitStack() as stack:
        crm = stack.enter_context(RpcServer("crm", {"notes.append": slow}))
        stack.callback(release.set)  # runs before the server stops
        with runtime(tmp_path, {"crm": crm.url}, [CRM], timeout_s=0.5) as (_, c):
            e = error_of(c, {"endpoint": "crm", "method": "notes.append"})
            assert e.code == "ETIMEDOUT"
            assert entered.is_set()


def test_slow_headers_drip_still_times_out(tmp_path: Path) -> None:
    """A server that accepts the request but never finishes its answer is bound by one deadline."""
    release = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\n")
            # Drip headers, each well within the per-read timeout, until released.
            while not release.wait(0.1):
                try:
                    conn.sendall(b"X-Drip: 1\r\n")
                except OSError:
                    return

    t = threading.Thread(target=serve)
    t.start()
    try:
        with runtime(tmp_path, {"crm": f"http://127.0.0.1:{port}/"}, [CRM], timeout_s=0.5) as (_, c):
            assert code_of(c, {"endpoint": "crm", "method": "notes.append"}) == "ETIMEDOUT"
    finally:
        release.set()
        t.join()
        listener.close()


def test_huge_response_is_eio(tmp_path: Path, crm: RpcServer) -> None:
    with runtime(tmp_path, {"crm": crm.url}, [rpc_cap("crm", ["big", "notes.append"])], max_response_bytes=1000) as (_, c):
        e = error_of(c, {"endpoint": "crm", "method": "big"})
        assert e.code == "EIO" and "response too large" in e.message
        assert c.call("rpc.call", {"endpoint": "crm", "method": "notes.append"}) == {"result": "ok"}


def test_huge_response_without_content_length_is_eio(tmp_path: Path) -> None:
    def stream(body: bytes) -> tuple[int, dict[str, str], bytes]:
        # HTTP/1.0 without Content-Length (an empty value omits it): the body runs to the end of the connection.
        return 200, {"Content-Length": ""}, b'{"jsonrpc":"2.0","id":1,"result":"' + b"y" * 5000 + b'"}'

    with RpcServer("crm", {}, respond=stream) as crm:
        with runtime(tmp_path, {"crm": crm.url}, [CRM], max_response_bytes=1000) as (_, c):
            e = error_of(c, {"endpoint": "crm", "method": "notes.append"})
            assert e.code == "EIO" and "response too large" in e.message


def test_json_rpc_error_is_eio(tmp_path: Path, crm: RpcServer) -> None:
    # The server does not know the method: a JSON-RPC error object (-32601).
    with runtime(tmp_path, {"crm": crm.url}, [rpc_cap("crm", ["notes.delete"])]) as (_, c):
        e = error_of(c, {"endpoint": "crm", "method": "notes.delete"})
        assert e.code == "EIO" and e.message == "rpc error -32601: Method not found"
    assert crm.count("notes.delete") == 1


@pytest.mark.parametrize("status,body,why", [
    (200, b"<html>not json</html>", "not JSON"),
    (200, b'{"id": 1, "result": 1}', "not a JSON-RPC 2.0 response"),
    (200, b'{"jsonrpc": "2.0", "id": 999, "result": 1}', "id does not match"),
    (200, b'{"jsonrpc": "2.0", "id": 1, "result": NaN}', "not JSON"),
    (200, b'{"jsonrpc": "2.0", "id": 1, "result": 123456789012345678901234567890}', "out of range"),
    (500, b"boom", "HTTP 500"),
])
def test_malformed_responses_are_eio(tmp_path: Path, status: int, body: bytes, why: str) -> None:
    with RpcServer("crm", {}, respond=lambda _: (status, {}, body)) as crm:
        with runtime(tmp_path, {"crm": crm.url}, [CRM]) as (_, c):
            e = error_of(c, {"endpoint": "crm", "method": "notes.append"})
            assert e.code == "EIO" and why in e.message, e.message


def test_connection_refused_is_eio(tmp_path: Path) -> None:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with runtime(tmp_path, {"crm": f"http://127.0.0.1:{port}/"}, [CRM]) as (_, c):
        assert code_of(c, {"endpoint": "crm", "method": "notes.append"}) == "EIO"


def test_dns_is_resolved_once_and_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name first resolves to the real server, later to another one. Every
    request goes to the first address; the name is never resolved again."""
    real = socket.getaddrinfo
    with RpcServer("crm", {"notes.append": "ok"}) as crm, RpcServer("evil", {"notes.append": "evil"}) as evil:
        lookups: list[str] = []

        def rebinding(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
            if host != "crm.rebind.test":
                return real(host, port, *args, **kw)
            lookups.append(host)
            target = crm.port if len(lookups) == 1 else evil.port
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", target))]

        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        with runtime(tmp_path, {"crm": f"http://crm.rebind.test:{crm.port}/rpc"}, [CRM]) as (_, c):
            for i in range(3):
                assert c.call("rpc.call", {"endpoint": "crm", "method": "notes.append", "params": [i]}) == {"result": "ok"}
        assert lookups == ["crm.rebind.test"]
        assert crm.count() == 3 and evil.count() == 0
        # The request names the configured host, not the address it went to.
        assert {(r.host, r.path) for r in crm.requests} == {(f"crm.rebind.test:{crm.port}", "/rpc")}


def test_unresolvable_host_is_eio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def nxdomain(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host == "missing.rebind.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", nxdomain)
    with runtime(tmp_path, {"crm": "http://missing.rebind.test/"}, [CRM]) as (_, c):
        e = error_of(c, {"endpoint": "crm", "method": "notes.append"})
        assert e.code == "EIO" and "cannot resolve" in e.message


# --- the log -------------------------------------------------------------------------------------


def test_decisions_and_results_are_logged(tmp_path: Path, crm: RpcServer) -> None:
    with runtime(tmp_path, {"crm": crm.url}, [CRM]) as (_, c):
        assert c.call("rpc.call", {"endpoint": "crm", "method": "notes.append", "params": {"t": "hi"}}) == {"result": "ok"}
        assert code_of(c, {"endpoint": "crm", "method": "backup.upload", "params": {"d": "x"}}) == "EPERM"
        assert code_of(c, {"endpoint": "crm", "method": "notes.append", "params": "bad"}) == "EINVAL"
    with SQLiteLog.open_readonly(tmp_path / "s" / "log.db") as log:
        decisions = [e for e in log.entries(kinds=["sys"]) if e.body.get("sys") == "rpc.call"]
        results = {e.cause: e for e in log.entries(kinds=["result"]) if e.body.get("sys") == "rpc.call"}
        assert [d.body["decision"] for d in decisions] == ["allow", "deny", "allow"]
        ok, denied, bad = decisions
        assert ok.body["detail"] == {"endpoint": "crm", "url": crm.url, "method": "notes.append",
                                     "bytes": len(b'{"t":"hi"}')}
        assert ok.body["handle"] == "c1"
        assert results[ok.seq].body["ok"] is True
        assert log.payload(results[ok.seq].seq) == (True, {"result": "ok"})
        assert denied.body["code"] == "EPERM" and denied.seq not in results
        assert bad.body["detail"]["method"] == "notes.append" and bad.body["detail"]["bytes"] is None
        assert results[bad.seq].body["ok"] is False and results[bad.seq].body["code"] == "EINVAL"
    assert crm.count() == 1


# --- the provider alone --------------------------------------------------------------------------


def test_provider_shape_and_config_validation() -> None:
    prov = make_rpc_provider({"crm": "http://127.0.0.1:9/"})
    assert prov.kind == "rpc"
    (row,) = prov.syscalls
    assert (row.name, row.kind, row.rights, row.budget, row.provider) == ("rpc.call", "rpc", ("call",), ("syscalls",), "ext")
    assert [(a.name, a.type, a.required) for a in row.args] == [
        ("endpoint", "str", True), ("method", "str", True), ("params", "any", False)]
    for bad in ({"crm": "ftp://host/"}, {"crm": "file:///etc/passwd"}, {"crm": "http:///nohost"},
                {"crm": "http://h:99999/"}, {"http://x/": "http://h/"}, {"": "http://h/"}, {"crm": "http://h/ x"}):
        with pytest.raises(ValueError):
            make_rpc_provider(bad)
    with pytest.raises(ValueError):
        make_rpc_provider({}, timeout_s=0)


def test_describe_never_shows_credentials() -> None:
    prov = make_rpc_provider({"crm": "https://user:pw@CRM.example:443/api?x=1"})
    assert prov.describe is not None
    d = prov.describe("rpc.call", {"endpoint": "crm", "method": "m", "params": [1]})
    assert d == {"endpoint": "crm", "url": "https://crm.example/api?x=1", "method": "m", "bytes": 3}
    assert prov.describe("rpc.call", {"endpoint": "ghost", "method": "m"})["url"] is None


def test_covers_rules() -> None:
    covers = make_rpc_provider({"crm": "http://127.0.0.1:9/"}).covers
    scope = {"endpoint": "crm", "methods": ["a"]}
    assert covers(scope, "rpc.call", {"endpoint": "crm", "method": "a"})
    assert not covers(scope, "rpc.other", {"endpoint": "crm", "method": "a"})
    assert not covers({"methods": ["a"]}, "rpc.call", {"endpoint": "crm", "method": "a"})
    assert not covers({"endpoint": "crm", "methods": "a"}, "rpc.call", {"endpoint": "crm", "method": "a"})
    assert not covers({"endpoint": "crm", "methods": []}, "rpc.call", {"endpoint": "crm", "method": "a"})
    # A URL never matches a name, even the URL the name is configured with.
    assert not covers(scope, "rpc.call", {"endpoint": "http://127.0.0.1:9/", "method": "a"})
    assert normalize_url("HTTP://Example.COM:80") == normalize_url("http://example.com/") == "http://example.com/"
    assert normalize_url("http://example.com:81/") != normalize_url("http://example.com/")
    assert normalize_url("gopher://example.com/") is None


def test_within_never_widens() -> None:
    parent = {"endpoint": "crm", "methods": ["a", "b"]}
    assert rpc_within({"endpoint": "crm", "methods": ["a"]}, parent)
    assert not rpc_within({"endpoint": "crm", "methods": ["a", "c"]}, parent)
    assert not rpc_within({"endpoint": "other", "methods": ["a"]}, parent)
    assert not rpc_within({"endpoint": "crm"}, parent)
    # A parent without methods authorizes nothing; its children may not name any.
    assert not rpc_within({"endpoint": "crm", "methods": ["a"]}, {"endpoint": "crm"})
    assert rpc_within({"endpoint": "crm"}, {"endpoint": "crm"})


def test_run_without_the_kernel_uses_only_configured_urls(crm: RpcServer) -> None:
    prov = make_rpc_provider({"crm": crm.url})
    info = CallInfo(pid=1, sys="rpc.call", handle="c1", scope={})
    assert prov.run({"endpoint": "crm", "method": "notes.append"}, info) == {"result": "ok"}
    with pytest.raises(KernelError) as ei:
        prov.run({"endpoint": crm.url, "method": "notes.append"}, info)
    assert ei.value.code == "ENOENT"
    assert crm.count() == 1
