"""A client written from docs/protocol.md alone: raw pyzmq DEALER + msgpack, no agentlibos.bus."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import zmq

from agentlibos.runtime import Runtime


def _rpc(sock: zmq.Socket, msg: dict) -> dict:  # type: ignore[type-arg]
    sock.send(msgpack.packb(msg))
    assert sock.poll(10_000), "no reply within 10 s"
    frames = sock.recv_multipart()
    assert len(frames) == 1, "replies are single frames"
    return msgpack.unpackb(frames[0])


def test_raw_dealer_drives_a_syscall(tmp_path: Path) -> None:
    (tmp_path / "world" / "ws").mkdir(parents=True)
    (tmp_path / "world" / "ws" / "a.txt").write_text("hello")
    with Runtime(tmp_path / "state", world_root=tmp_path / "world"):
        conn = json.loads((tmp_path / "state" / "connection.json").read_text())
        assert conn["endpoint"].startswith("ipc://")
        ctx = zmq.Context()
        op = ctx.socket(zmq.DEALER)
        op.setsockopt(zmq.LINGER, 0)
        proc = ctx.socket(zmq.DEALER)
        proc.setsockopt(zmq.LINGER, 0)
        try:
            op.connect(conn["endpoint"])
            # Before hello: refused.
            r = _rpc(op, {"v": 1, "t": "req", "id": 5, "sys": "op.ps", "args": {}})
            assert r["ok"] is False and r["error"]["code"] == "EPERM" and r["id"] == 5
            r = _rpc(op, {"v": 1, "t": "hello", "id": 1, "token": conn["operator_token"], "role": "operator"})
            assert r == {"v": 1, "t": "rep", "id": 1, "ok": True, "seq": None, "value": {"role": "operator"}}
            r = _rpc(op, {"v": 1, "t": "req", "id": 2, "sys": "op.image.register", "args": {"name": "raw"}})
            assert r["ok"], r
            r = _rpc(op, {"v": 1, "t": "req", "id": 3, "sys": "op.spawn", "args": {
                "image": "raw", "external": True,
                "caps": [{"kind": "fs", "scope": {"root": "ws"}, "rights": ["read"], "name": "ws"}]}})
            assert r["ok"], r
            pid, token = r["value"]["pid"], r["value"]["token"]
            proc.connect(conn["endpoint"])
            r = _rpc(proc, {"v": 1, "t": "hello", "id": 1, "token": token, "role": "process"})
            assert r["ok"] and r["value"]["pid"] == pid
            r = _rpc(proc, {"v": 1, "t": "req", "id": 2, "sys": "fs.read", "args": {"path": "ws/a.txt"}, "cap": None})
            assert r["ok"] and r["value"] == {"text": "hello"} and isinstance(r["seq"], int), r
            r = _rpc(proc, {"v": 1, "t": "req", "id": 3, "sys": "fs.write", "args": {"path": "ws/a.txt", "data": "x"}})
            assert not r["ok"] and r["error"]["code"] == "EPERM"
            r = _rpc(proc, {"v": 1, "t": "req", "id": 4, "sys": "no.such", "args": {}})
            assert r["error"]["code"] == "ENOSYS"
            r = _rpc(proc, {"v": 1, "t": "req", "id": 6, "sys": "fs.read", "args": {"path": 7}})
            assert r["error"]["code"] == "EINVAL" and r["id"] == 6
            proc.send(b"\xc1 not msgpack")
            assert proc.poll(10_000)
            r = msgpack.unpackb(proc.recv())
            assert r["ok"] is False and r["error"]["code"] == "EINVAL" and r["id"] == 0
            # Another connection cannot act as the process by naming it.
            r = _rpc(op, {"v": 1, "t": "req", "id": 9, "sys": "fs.read", "args": {"path": "ws/a.txt"}})
            assert r["error"]["code"] == "ENOSYS"
        finally:
            op.close(0)
            proc.close(0)
            ctx.term()
        assert (tmp_path / "world" / "ws" / "a.txt").read_text() == "hello"
