"""A human's yes never outlives the capability it was asked under: a request whose cap was revoked
while it waited is refused, and "approve and remember" then grants nothing."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from agentlibos.bus import Topic
from agentlibos.runtime import Grant
from tests.hosted import next_event, session


def test_remembering_an_approval_of_a_revoked_cap_grants_nothing(tmp_path: Path) -> None:
    with session(tmp_path) as rt:
        rt.register_image("x")
        pid, token = rt.spawn_external("x", caps=[Grant("fs", {"root": "docs"}, ["write"], approval="always",
                                                        name="gate")])
        replies: list[Any] = []
        with rt.client(token) as c, rt.events(Topic.approval()) as events:
            asking = threading.Thread(target=lambda: replies.append(
                c.request("fs.write", {"path": "docs/a.txt", "data": "x"}, cap="gate")))
            asking.start()
            aid = next_event(events, lambda b: b.get("event") == "asked" and b.get("pid") == pid)["id"]
            rt.revoke(pid, "gate")
            out = rt.operator.call("op.approve", {"id": aid, "remember": True})
            asking.join(30)
            (reply,) = replies
            assert reply.error is not None and reply.error.code == "EREVOKED"
            assert out.get("remembered") is None
            assert sorted(h["handle"] for h in c.call("cap.list", {})["caps"]) == ["gate", "model", "self"]
            assert c.request("fs.write", {"path": "docs/a.txt", "data": "x"}).error is not None
        assert (tmp_path / "world" / "docs" / "a.txt").read_text() == "alpha"
