"""A human's yes never outlives the capability it was asked under: a request whose cap was revoked
while it waited is refused, and "approve and remember" then grants nothing."""

from __future__ import annotations

from pathlib import Path

from agentlibos.runtime import Grant
from tests.hosted import Asking, session


def test_remembering_an_approval_of_a_revoked_cap_grants_nothing(tmp_path: Path) -> None:
    with session(tmp_path) as rt:
        rt.register_image("x")
        pid, token = rt.spawn_external("x", caps=[Grant("fs", {"root": "docs"}, ["write"], approval="always",
                                                        name="gate")])
        with rt.client(token) as c:
            asking = Asking(rt, c, pid, "fs.write", {"path": "docs/a.txt", "data": "x"}, cap="gate")
            rt.revoke(pid, "gate")
            out = rt.operator.call("op.approve", {"id": asking.id, "remember": True})
            reply = asking.reply()
            assert reply.error is not None and reply.error.code == "EREVOKED"
            assert out.get("remembered") is None
            assert sorted(h["handle"] for h in c.call("cap.list", {})["caps"]) == ["gate", "model", "self"]
            assert c.request("fs.write", {"path": "docs/a.txt", "data": "x"}).error is not None
        assert (tmp_path / "world" / "docs" / "a.txt").read_text() == "alpha"
