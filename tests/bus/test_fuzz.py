"""Random and malformed frames never stop the kernel; each gets a typed error reply."""

from __future__ import annotations

from pathlib import Path

import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentlibos.bus import MAX_FRAME_BYTES, KernelClient
from agentlibos.runtime import Runtime

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_frames = st.one_of(
    st.binary(max_size=200),
    _values.map(lambda v: msgpack.packb(v)),
    st.dictionaries(st.sampled_from(["v", "t", "id", "sys", "args", "cap", "cause", "token", "role"]), _values,
                    max_size=7).map(lambda d: msgpack.packb(d)),
    st.fixed_dictionaries({"v": st.just(1), "t": st.sampled_from(["req", "hello", "rep", "cmd", "x"]),
                           "id": st.integers(0, 100), "sys": st.text(max_size=12), "args": _values}).map(msgpack.packb),
)


def test_random_frames_never_stop_the_kernel(tmp_path: Path) -> None:
    with Runtime(tmp_path / "state", world_root=tmp_path / "world") as rt:
        ctx = rt.context
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(rt.endpoint)
        try:
            @settings(max_examples=300, suppress_health_check=list(HealthCheck))
            @given(frame=_frames)
            def one(frame: bytes) -> None:
                sock.send(frame)
                assert sock.poll(10_000), "the kernel stopped answering"
                reply = msgpack.unpackb(sock.recv())
                assert reply["t"] == "rep"
                if not reply["ok"]:
                    assert reply["error"]["code"] in ("EINVAL", "EPERM", "ENOSYS")

            one()
            # Oversized and multipart frames.
            sock.send(b"\x00" * (MAX_FRAME_BYTES + 1))
            assert sock.poll(10_000)
            assert msgpack.unpackb(sock.recv())["error"]["code"] == "EINVAL"
            sock.send_multipart([b"a", b"b"])
            assert sock.poll(10_000)
            assert "one frame" in msgpack.unpackb(sock.recv())["error"]["message"]
        finally:
            sock.close(0)
        # Still serving, and the log still verifies.
        assert rt.ps() == []
        with KernelClient(rt.endpoint, context=rt.context, token=rt.config.operator_token, role="operator") as c:
            assert c.call("op.ps") == {"processes": []}
    from agentlibos.storage import SQLiteLog

    with SQLiteLog.open_readonly(tmp_path / "state" / "log.db") as log:
        assert log.verify().ok
