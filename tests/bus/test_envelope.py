"""Envelope round trips and topic rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentlibos.bus import (
    Command,
    Hello,
    KernelError,
    ProtocolError,
    Reply,
    Request,
    Topic,
    decode,
    decode_event,
    encode_event,
)

_args = st.dictionaries(st.text(max_size=10), st.one_of(st.none(), st.integers(-1000, 1000), st.text(max_size=10)),
                        max_size=5)


@given(st.integers(0, 2**31), st.text(min_size=1, max_size=20), _args, st.none() | st.text(max_size=5),
       st.none() | st.integers(0, 2**31))
def test_request_round_trip(rid: int, sys: str, args: dict, cap: str | None, cause: int | None) -> None:  # type: ignore[type-arg]
    r = Request(rid, sys, args, cap, cause)
    assert decode(r.encode()) == r


def test_reply_hello_command_round_trip() -> None:
    ok = Reply(3, True, {"text": "x"}, seq=9)
    assert decode(ok.encode()) == ok
    bad = decode(Reply.failure(4, "EPERM", "no").encode())
    assert isinstance(bad, Reply) and bad.error is not None and bad.error.code == "EPERM"
    with pytest.raises(KernelError) as e:
        bad.unwrap()
    assert e.value.code == "EPERM" and e.value.is_denial
    h = Hello(1, "tok", "operator")
    assert decode(h.encode()) == h
    c = Command("start", 4, {"token": "t"})
    assert decode(c.encode()) == c


@pytest.mark.parametrize("frame", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1v\x02"])
def test_bad_frames_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(frame)


def test_unknown_error_codes_become_eio() -> None:
    assert KernelError.from_wire({"code": "EWHAT", "message": "m"}).code == "EIO"
    with pytest.raises(ValueError):
        KernelError("EWHAT")


def test_topics_are_delimited() -> None:
    with pytest.raises(ValueError):
        Topic("audit")
    assert str(Topic.proc(4)) == "proc/4/"
    assert not str(Topic.proc(42)).startswith(str(Topic.proc(4))) or str(Topic.proc(4)) == "proc/4/"
    assert not "proc/42/".startswith("proc/4/")
    frame = encode_event(Topic.audit(), {"seq": 1})
    assert frame.startswith(b"audit/\x00")
    assert decode_event(frame) == (Topic.audit(), {"seq": 1})
