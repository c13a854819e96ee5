"""The scenario world's local JSON-RPC servers: real HTTP on 127.0.0.1, every request recorded."""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any
from urllib.parse import urlsplit

import pytest

from agentlibos.harness._servers import RpcServer, ServerSet, env_name


def post(url: str, body: bytes, method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    u = urlsplit(url)
    assert u.hostname == "127.0.0.1"
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, u.path or "/", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        try:
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            resp.close()
    finally:
        conn.close()


def rpc(url: str, method: str, params: Any = None, rid: Any = 1) -> Any:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    status, _, body = post(url, json.dumps(msg).encode())
    assert status == 200
    return json.loads(body)


def test_answers_configured_methods_and_records_requests() -> None:
    with RpcServer("crm", {"notes.append": "ok", "stats": {"n": 3}}) as s:
        assert s.url.startswith("http://127.0.0.1:") and s.url.endswith("/")
        assert rpc(s.url, "notes.append", {"text": "hi"}, rid=7) == {"jsonrpc": "2.0", "id": 7, "result": "ok"}
        assert rpc(s.url, "stats", [1])["result"] == {"n": 3}
        reqs = s.requests
        assert [(r.method, r.params) for r in reqs] == [("notes.append", {"text": "hi"}), ("stats", [1])]
        assert json.loads(reqs[0].body)["params"] == {"text": "hi"}
        assert reqs[0].path == "/" and reqs[0].host == f"127.0.0.1:{s.port}"
        assert (s.count(), s.count("stats"), s.count("nope")) == (2, 1, 0)
        # .requests is a copy.
        reqs.clear()
        assert s.count() == 2


def test_unknown_method_is_32601_and_still_recorded() -> None:
    with RpcServer("crm", {"a": 1}) as s:
        reply = rpc(s.url, "b", rid="x")
        assert reply == {"jsonrpc": "2.0", "id": "x", "error": {"code": -32601, "message": "Method not found"}}
        assert s.count("b") == 1


def test_malformed_requests() -> None:
    with RpcServer("crm", {"a": 1}) as s:
        status, _, body = post(s.url, b"not json")
        assert status == 200 and json.loads(body)["error"]["code"] == -32700
        status, _, body = post(s.url, b'{"id": 1, "method": "a"}')
        assert json.loads(body)["error"]["code"] == -32600
        status, _, _ = post(s.url, b"", method="GET")
        assert status == 405
        # Recorded as requests without a method (GET is not a JSON-RPC request at all).
        assert [r.method for r in s.requests] == [None, "a"]
        assert s.count("a") == 1


def test_notifications_and_batches() -> None:
    with RpcServer("crm", {"a": 1, "b": 2}) as s:
        status, _, body = post(s.url, b'{"jsonrpc": "2.0", "method": "a"}')
        assert (status, body) == (204, b"")
        batch = [{"jsonrpc": "2.0", "id": 1, "method": "a"}, {"jsonrpc": "2.0", "method": "b"},
                 {"jsonrpc": "2.0", "id": 2, "method": "c"}]
        status, _, body = post(s.url, json.dumps(batch).encode())
        assert status == 200
        assert [r.get("result", r.get("error", {}).get("code")) for r in json.loads(body)] == [1, -32601]
        assert [r.method for r in s.requests] == ["a", "a", "b", "c"]


def test_callable_values_and_raw_override() -> None:
    seen: list[Any] = []

    def echo(params: Any) -> Any:
        seen.append(params)
        return {"echo": params}

    with RpcServer("crm", {"echo": echo}) as s:
        assert rpc(s.url, "echo", {"x": 1})["result"] == {"echo": {"x": 1}}
        assert seen == [{"x": 1}]
    with RpcServer("target", {}) as target:
        with RpcServer("crm", {"a": 1}, respond=lambda body: (307, {"Location": target.url}, b"")) as s:
            status, headers, _ = post(s.url, json.dumps({"jsonrpc": "2.0", "id": 1, "method": "a"}).encode())
            assert status == 307 and headers["Location"] == target.url
            assert s.count("a") == 1
        assert target.count() == 0


def test_concurrent_requests_are_all_recorded() -> None:
    with RpcServer("crm", {"a": "ok"}) as s:
        threads = [threading.Thread(target=rpc, args=(s.url, "a", [i], i)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.count("a") == 16
        assert sorted(r.params[0] for r in s.requests) == list(range(16))


def test_start_stop_lifecycle() -> None:
    s = RpcServer("crm", {"a": 1})
    with pytest.raises(RuntimeError):
        _ = s.url
    s.start()
    url = s.url
    assert s.start() is s  # idempotent
    assert rpc(url, "a")["result"] == 1
    s.stop()
    s.stop()  # idempotent
    with pytest.raises(OSError):
        post(url, b"{}")
    assert s.count() == 1  # the record outlives the server


def test_server_set_from_world() -> None:
    world = {"rpc": {"crm": {"methods": {"notes.append": "ok", "backup.upload": "ok"}},
                     "billing-api": {"methods": {"charge": {"id": 1}}}},
             "files": {"a.txt": "x"}}
    with ServerSet(world) as servers:
        urls = servers.urls()
        assert set(urls) == {"crm", "billing-api"} and len(set(urls.values())) == 2
        assert servers.substitutions() == {f"rpc.{n}.url": u for n, u in urls.items()}
        assert servers.env() == {"RPC_CRM_URL": urls["crm"], "RPC_BILLING_API_URL": urls["billing-api"]}
        before = servers.request_log()
        assert before == ()
        assert rpc(urls["crm"], "notes.append", {"t": 1})["result"] == "ok"
        assert rpc(urls["billing-api"], "charge")["result"] == {"id": 1}
        log = servers.request_log()
        assert log != before and hash(log) is not None
        assert [(n, m) for n, m, _ in log] == [("billing-api", "charge"), ("crm", "notes.append")]
        assert (servers.calls("crm"), servers.calls("crm", "notes.append"), servers.calls("crm", "backup.upload"),
                servers.calls("ghost")) == (1, 1, 0, 0)
        # Same method, different body: still a change of world state.
        assert rpc(urls["crm"], "notes.append", {"t": 2})["result"] == "ok"
        assert servers.request_log() != log


def test_empty_world_has_no_servers() -> None:
    with ServerSet({}) as servers:
        assert servers.urls() == {} and servers.request_log() == ()
    with ServerSet(None) as servers:
        assert list(servers) == []
    assert env_name("crm.v2-x") == "CRM_V2_X"
