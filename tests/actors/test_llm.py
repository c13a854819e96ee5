"""Real-model adapters: AnthropicModel and OpenAIChatModel on their real SDK clients, pointed at
local servers that speak the APIs; ReplayModel from a recorded kernel log; pricing and redaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agentlibos.actors import ScriptedModel
from agentlibos.actors._llm import (
    AnthropicModel,
    OpenAIChatModel,
    ReplayModel,
)
from agentlibos.bus._observe import call_record, estimate_cost, redact
from agentlibos.bus import KernelError, NondeterminismError, Topic
from agentlibos.kernel._models import CompletionRequest
from agentlibos.runtime import Grant, Runtime
from agentlibos.storage import SQLiteLog
from tests.actors.llm_servers import (
    HANG,
    ChatServer,
    MessagesServer,
    anthropic_error,
    chat,
    message,
    text,
    tool_use,
)

FS_READ_DEF = {"name": "fs_read", "description": "Read a file.",
               "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}


def request(messages: list[dict[str, Any]], *, model: str = "anthropic:claude-test", max_tokens: int | None = None,
            system: str | None = "You read notes.", pid: int = 1) -> CompletionRequest:
    return CompletionRequest(pid=pid, image="img", model=model, messages=messages, tools=[FS_READ_DEF],
                             system=system, max_tokens=max_tokens)


@pytest.fixture
def messages_server() -> Iterator[MessagesServer]:
    with MessagesServer() as s:
        yield s


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    with ChatServer() as s:
        yield s


@pytest.fixture
def anthropic(messages_server: MessagesServer) -> Iterator[AnthropicModel]:
    with AnthropicModel(base_url=messages_server.url, api_key="test", timeout_s=5) as m:
        yield m


# --- AnthropicModel on the SDK -------------------------------------------------------------------

def test_anthropic_text_turn(messages_server: MessagesServer, anthropic: AnthropicModel) -> None:
    messages_server.push(message(text("Hello there."), input_tokens=21, output_tokens=4))
    turn = anthropic.complete(request([{"role": "user", "content": "hi"}])).to_value()
    assert turn == {"content": [{"type": "text", "text": "Hello there."}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": 21, "output_tokens": 4}, "model": "anthropic:claude-test", "final": False}
    sent = messages_server.requests[0]
    assert sent["model"] == "claude-test"  # the registry prefix is not the API's model name
    assert sent["system"] == "You read notes."
    assert sent["max_tokens"] == 1024
    assert sent["tools"] == [FS_READ_DEF]
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    hdr = messages_server.headers[0]
    assert "test" in (hdr.get("x-api-key"), hdr.get("authorization", "").removeprefix("Bearer "))


def test_anthropic_tool_use_and_tool_result_turns(messages_server: MessagesServer, anthropic: AnthropicModel) -> None:
    messages_server.push(message(text("Reading it."), tool_use("toolu_1", "fs_read", {"path": "notes/a.txt"}),
                                 stop_reason="tool_use"),
                         message(text("It says hi."), input_tokens=40, output_tokens=6))
    convo: list[dict[str, Any]] = [{"role": "user", "content": "read the note"}]
    first = anthropic.complete(request(convo, max_tokens=300)).to_value()
    assert first["stop_reason"] == "tool_use"
    assert first["content"] == [{"type": "text", "text": "Reading it."},
                                {"type": "tool_use", "id": "toolu_1", "name": "fs_read", "input": {"path": "notes/a.txt"}}]
    # The conversation as AgentProcess keeps it: the assistant's blocks, then the tool results.
    convo.append({"role": "assistant", "content": first["content"]})
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": json.dumps({"text": "hi"}), "is_error": False}
    convo.append({"role": "user", "content": [result]})
    second = anthropic.complete(request(convo, max_tokens=300)).to_value()
    assert second["content"] == [{"type": "text", "text": "It says hi."}]
    assert second["usage"] == {"input_tokens": 40, "output_tokens": 6}
    sent = messages_server.requests[1]
    assert sent["max_tokens"] == 300
    assert sent["messages"][1] == {"role": "assistant", "content": first["content"]}
    assert sent["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"text": "hi"}'}]}


def test_anthropic_drops_empty_text_and_keeps_error_results(messages_server: MessagesServer,
                                                            anthropic: AnthropicModel) -> None:
    messages_server.push(message(text("ok")))
    convo: list[dict[str, Any]] = [{"role": "user", "content": "go"},
             {"role": "assistant", "content": [{"type": "text", "text": ""},
                                               {"type": "tool_use", "id": "t", "name": "fs_read", "input": {"path": "x"}}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "is_error": True,
                                           "content": '{"error": {"code": "EPERM"}}'}]}]
    anthropic.complete(request(convo, system=None))
    sent = messages_server.requests[0]
    assert "system" not in sent
    assert sent["messages"][1]["content"] == [{"type": "tool_use", "id": "t", "name": "fs_read", "input": {"path": "x"}}]
    assert sent["messages"][2]["content"][0]["is_error"] is True


def test_anthropic_401_is_eio_with_a_clear_message_and_no_key(messages_server: MessagesServer) -> None:
    key = "sk-ant-api03-not-a-real-key-0123456789"
    messages_server.push(anthropic_error(401, "authentication_error", f"invalid x-api-key {key}"))
    with AnthropicModel(base_url=messages_server.url, api_key=key) as m:
        with pytest.raises(KernelError) as info:
            m.complete(request([{"role": "user", "content": "hi"}]))
    assert info.value.code == "EIO"
    assert "rejected the API key" in info.value.message and "401" in info.value.message
    assert key not in str(info.value)
    assert len(messages_server.requests) == 1  # no retries behind the kernel's back


def test_anthropic_429_and_5xx_are_eio_with_the_status(messages_server: MessagesServer,
                                                       anthropic: AnthropicModel) -> None:
    messages_server.push(anthropic_error(429, "rate_limit_error", "slow down"),
                         anthropic_error(529, "overloaded_error", "overloaded"))
    for status in (429, 529):
        with pytest.raises(KernelError) as info:
            anthropic.complete(request([{"role": "user", "content": "hi"}]))
        assert info.value.code == "EIO"
        assert f"HTTP {status}" in info.value.message
    assert len(messages_server.requests) == 2


def test_anthropic_timeout_is_etimedout(messages_server: MessagesServer) -> None:
    messages_server.push(HANG)
    with AnthropicModel(base_url=messages_server.url, api_key="test", timeout_s=0.3) as m:
        with pytest.raises(KernelError) as info:
            m.complete(request([{"role": "user", "content": "hi"}]))
    assert info.value.code == "ETIMEDOUT"
    assert "0.3s" in info.value.message


def test_adapters_need_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "OPENAI_API_KEY", "OPENAI_ADMIN_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(KernelError) as info:
        AnthropicModel(base_url="http://127.0.0.1:9")
    assert info.value.code == "EINVAL" and "ANTHROPIC_API_KEY" in info.value.message
    with pytest.raises(KernelError) as info:
        OpenAIChatModel(base_url="http://127.0.0.1:9/v1")
    assert info.value.code == "EINVAL" and "OPENAI_API_KEY" in info.value.message
    monkeypatch.setenv("ANTHROPIC_API_KEY", "from-env-key")
    with AnthropicModel(base_url="http://127.0.0.1:9") as m:
        assert m.client.api_key == "from-env-key"


# --- end to end through the runtime --------------------------------------------------------------

def _llm_events(events: Any, pid: int, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        ev = events.next_event(timeout_s=30)
        assert ev is not None, f"saw {len(out)} of {n} llm events"
        if ev[1].get("pid") == pid:
            out.append(ev[1])
    return out


def test_anthropic_agent_end_to_end(tmp_path: Path, messages_server: MessagesServer,
                                    anthropic: AnthropicModel) -> None:
    (tmp_path / "w" / "notes").mkdir(parents=True)
    (tmp_path / "w" / "notes" / "note.txt").write_text("the meeting is at noon")
    (tmp_path / "w" / "secret.txt").write_text("do not read")

    def after_first(body: dict[str, Any]) -> dict[str, Any]:
        return message(tool_use("toolu_b", "fs_read", {"path": "secret.txt"}), stop_reason="tool_use",
                       input_tokens=50, output_tokens=9)

    messages_server.push(
        message(tool_use("toolu_a", "fs_read", {"path": "notes/note.txt"}), stop_reason="tool_use",
                input_tokens=30, output_tokens=8),
        after_first,
        message(text("The meeting is at noon."), input_tokens=70, output_tokens=7),
    )
    rt = Runtime(tmp_path / "s", world_root=tmp_path / "w", ipc=False, models={"anthropic": anthropic})
    with rt:
        rt.register_image("reader", prompt="You read notes.", tools=["fs_read"])
        with rt.events(Topic.llm()) as events:
            pid = rt.spawn("reader", model="anthropic:claude-test", input="read the note",
                           caps=[Grant("fs", {"root": "notes"}, ["read"])], budget={"llm_tokens": 1000})
            ex = rt.wait(pid, timeout_s=60)
            assert (ex.status, ex.result) == ("ok", "The meeting is at noon.")
            evs = _llm_events(events, pid, 3)
        budget = rt.operator.call("op.budget", {"pid": pid})
    assert budget["llm_tokens"]["used"] == 30 + 8 + 50 + 9 + 70 + 7
    assert [(e["model"], e["input_tokens"], e["output_tokens"], e["stop_reason"]) for e in evs] == [
        ("anthropic:claude-test", 30, 8, "tool_use"), ("anthropic:claude-test", 50, 9, "tool_use"),
        ("anthropic:claude-test", 70, 7, "end_turn")]

    reqs = messages_server.requests
    assert len(reqs) == 3
    assert reqs[0]["model"] == "claude-test" and reqs[0]["system"] == "You read notes."
    assert [t["name"] for t in reqs[0]["tools"]] == ["fs_read"]
    assert reqs[0]["messages"] == [{"role": "user", "content": "read the note"}]
    ok_result = reqs[1]["messages"][-1]["content"][0]
    assert ok_result["tool_use_id"] == "toolu_a" and "is_error" not in ok_result
    assert json.loads(ok_result["content"]) == {"text": "the meeting is at noon"}
    # The denied read went back to the model as an error result, not to the file.
    denied = reqs[2]["messages"][-1]["content"][0]
    assert denied["tool_use_id"] == "toolu_b" and denied["is_error"] is True
    assert json.loads(denied["content"])["error"]["code"] in ("EPERM", "EDENIED")
    assert "do not read" not in json.dumps(reqs)

    log = SQLiteLog.open_readonly(tmp_path / "s" / "log.db")
    try:
        sys = [e.body for e in log.entries(kinds=["sys"], pid=pid)]
    finally:
        log.close()
    assert [(b["sys"], b["decision"]) for b in sys if b["sys"] != "proc.exit"] == [
        ("llm.complete", "allow"), ("fs.read", "allow"), ("llm.complete", "allow"), ("fs.read", "deny"),
        ("llm.complete", "allow")]


@pytest.mark.parametrize("level", ["off", "metadata", "full"])
def test_the_kernel_records_each_model_call_at_the_configured_level(
        tmp_path: Path, messages_server: MessagesServer, level: str) -> None:
    key = "sk-ant-api03-" + "k" * 40
    messages_server.push(message(text("done, my key is " + key), model="claude-sonnet-4-x", input_tokens=1000,
                                output_tokens=100))
    with AnthropicModel(base_url=messages_server.url, api_key=key, timeout_s=5) as model, \
            Runtime(tmp_path / "s", world_root=tmp_path / "w", ipc=False, models={"anthropic": model},
                    llm_observe=level) as rt:
        rt.register_image("talker", prompt="Be brief. " + key)
        pid = rt.spawn("talker", model="anthropic:claude-sonnet-4-x", input="hi", budget={"llm_tokens": 5000})
        assert rt.wait(pid, timeout_s=60).status == "ok"
    log = SQLiteLog.open_readonly(tmp_path / "s" / "log.db")
    try:
        calls = [(e.body, log.payload(e.seq)[1]) for e in log.entries(kinds=["llm.call"], pid=pid)]
    finally:
        log.close()
    if level == "off":
        assert calls == []
        return
    ((body, rec),) = calls
    assert body["level"] == level
    assert (body["model"], body["input_tokens"], body["output_tokens"], body["stop_reason"]) == (
        "anthropic:claude-sonnet-4-x", 1000, 100, "end_turn")
    assert body["cost_usd"] == pytest.approx((1000 * 3.0 + 100 * 15.0) / 1e6)
    assert rec["latency_s"] >= 0
    assert ("request" in rec) == (level == "full")
    if level == "full":
        assert rec["request"]["system"].startswith("Be brief.")
        assert rec["response"]["content"][0]["text"].startswith("done")
    assert key not in json.dumps(rec)


def test_model_failure_ends_the_process_with_the_error(tmp_path: Path, messages_server: MessagesServer,
                                                       anthropic: AnthropicModel) -> None:
    messages_server.push(anthropic_error(401, "authentication_error", "invalid x-api-key"))
    with Runtime(tmp_path / "s", world_root=tmp_path / "w", ipc=False, models={"anthropic": anthropic}) as rt:
        rt.register_image("reader", tools=["fs_read"])
        pid = rt.spawn("reader", model="anthropic:claude-test", input="hi", budget={"llm_tokens": 1000})
        ex = rt.wait(pid, timeout_s=60)
        budget = rt.operator.call("op.budget", {"pid": pid})
    assert ex.status == "error" and "EIO" in ex.result and "401" in ex.result
    assert budget["llm_tokens"]["used"] == 0


# --- OpenAI-compatible chat ----------------------------------------------------------------------

def test_openai_two_turn_exchange_through_the_runtime(tmp_path: Path, chat_server: ChatServer) -> None:
    (tmp_path / "w" / "notes").mkdir(parents=True)
    (tmp_path / "w" / "notes" / "note.txt").write_text("bring the slides")
    chat_server.push(chat(None, tool_calls=[("call_1", "fs_read", {"path": "notes/note.txt"})],
                          prompt_tokens=25, completion_tokens=11),
                     chat("Bring the slides.", prompt_tokens=60, completion_tokens=5))
    with OpenAIChatModel(base_url=chat_server.url + "/v1", api_key="test", prefix="local") as model:
        with Runtime(tmp_path / "s", world_root=tmp_path / "w", ipc=False, models={"local": model}) as rt:
            rt.register_image("reader", prompt="You read notes.", tools=["fs_read"])
            pid = rt.spawn("reader", model="local:qwen-test", input="read the note",
                           caps=[Grant("fs", {"root": "notes"}, ["read"])], budget={"llm_tokens": 500})
            ex = rt.wait(pid, timeout_s=60)
            budget = rt.operator.call("op.budget", {"pid": pid})
    assert (ex.status, ex.result) == ("ok", "Bring the slides.")
    assert budget["llm_tokens"]["used"] == 25 + 11 + 60 + 5
    first, second = chat_server.requests
    assert first["model"] == "qwen-test"
    assert first["messages"] == [{"role": "system", "content": "You read notes."},
                                 {"role": "user", "content": "read the note"}]
    assert first["tools"][0]["type"] == "function" and first["tools"][0]["function"]["name"] == "fs_read"
    assert first["tools"][0]["function"]["parameters"]["type"] == "object"
    assistant, tool = second["messages"][2], second["messages"][3]
    assert assistant["role"] == "assistant"
    assert assistant["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "fs_read", "arguments": json.dumps({"path": "notes/note.txt"})}}]
    assert tool["role"] == "tool" and tool["tool_call_id"] == "call_1"
    assert json.loads(tool["content"]) == {"text": "bring the slides"}


def test_openai_maps_finish_reasons_and_errors(chat_server: ChatServer) -> None:
    chat_server.push(chat("cut off", finish_reason="length"),
                     chat(None, tool_calls=[("c", "fs_read", {"path": "a"})], finish_reason="stop"),
                     (429, {"error": {"message": "slow down", "type": "rate_limit", "code": "429"}}),
                     (401, {"error": {"message": "bad key", "type": "invalid_request_error", "code": "401"}}),
                     HANG)
    with OpenAIChatModel(base_url=chat_server.url + "/v1", api_key="test", timeout_s=0.3) as m:
        req = request([{"role": "user", "content": "hi"}], model="openai:gpt-test")
        t1 = m.complete(req).to_value()
        assert (t1["stop_reason"], t1["content"]) == ("max_tokens", [{"type": "text", "text": "cut off"}])
        t2 = m.complete(req).to_value()
        assert t2["stop_reason"] == "tool_use"
        assert t2["content"] == [{"type": "tool_use", "id": "c", "name": "fs_read", "input": {"path": "a"}}]
        codes = []
        for _ in range(3):
            with pytest.raises(KernelError) as info:
                m.complete(req)
            codes.append((info.value.code, info.value.message))
    assert chat_server.requests[0]["model"] == "gpt-test"
    assert codes[0][0] == "EIO" and "HTTP 429" in codes[0][1]
    assert codes[1][0] == "EIO" and "HTTP 401" in codes[1][1]
    assert codes[2][0] == "ETIMEDOUT"


# --- ReplayModel -----------------------------------------------------------------------------------

STEPS = [{"tool": "fs_read", "args": {"path": "notes/note.txt"}},
         {"tool": "fs_read", "args": {"path": "secret.txt"}},
         {"tool": "mem_put", "args": {"key": "k", "value": "v"}},
         {"tool": "mem_get", "args": {"key": "k"}}]


def _run(tmp: Path, model: Any, note: str = "hello") -> tuple[Any, list[tuple[Any, ...]]]:
    (tmp / "w" / "notes").mkdir(parents=True)
    (tmp / "w" / "notes" / "note.txt").write_text(note)
    (tmp / "w" / "secret.txt").write_text("no")
    with Runtime(tmp / "s", world_root=tmp / "w", ipc=False, models={"scripted": model}) as rt:
        rt.register_image("img", tools=["fs_read", "mem_put", "mem_get"])
        pid = rt.spawn("img", caps=[Grant("fs", {"root": "notes"}, ["read"])], input="go")
        ex = rt.wait(pid, timeout_s=60)
    log = SQLiteLog.open_readonly(tmp / "s" / "log.db")
    try:
        decisions = [(e.pid, e.body["sys"], e.body["decision"], e.body.get("code"), json.dumps(e.body.get("detail")))
                     for e in log.entries(kinds=["sys"])]
    finally:
        log.close()
    return ex, decisions


@contextmanager
def _open_log(state: Path) -> Iterator[SQLiteLog]:
    log = SQLiteLog.open_readonly(state / "log.db")
    try:
        yield log
    finally:
        log.close()


def test_replay_reproduces_the_recorded_decisions(tmp_path: Path) -> None:
    ex1, recorded = _run(tmp_path / "rec", ScriptedModel({"img": STEPS}))
    assert ex1.status == "ok"
    with _open_log(tmp_path / "rec" / "s") as log:
        replay = ReplayModel(log)
    assert replay.remaining(ex1.pid) == len(STEPS)
    ex2, replayed = _run(tmp_path / "rep", replay)
    assert (ex2.status, ex2.result) == (ex1.status, ex1.result)
    assert replayed == recorded
    assert ("fs.read", "deny") in [(d[1], d[2]) for d in replayed]
    assert replay.remaining(ex1.pid) == 0
    assert replay.served == [(ex1.pid, i) for i in range(len(STEPS))]


def test_replay_divergence_is_nondeterminism(tmp_path: Path) -> None:
    _run(tmp_path / "rec", ScriptedModel({"img": STEPS}))
    # The world changed: the first tool result differs, so the second request does too.
    with _open_log(tmp_path / "rec" / "s") as log:
        replay = ReplayModel(log)
    ex, decisions = _run(tmp_path / "rep", replay, note="changed")
    assert ex.status == "error" and "NondeterminismError" in ex.result and "messages differ" in ex.result
    assert [d[1] for d in decisions if d[1] != "proc.exit"] == ["llm.complete", "fs.read", "llm.complete"]

    # Asking past the end of the recording, or as a process it never had, is also divergence.
    turns = ReplayModel([(1, {"content": [{"type": "text", "text": "done"}], "stop_reason": "end_turn"})])
    assert turns.complete(request([{"role": "user", "content": "x"}])).to_value()["content"][0]["text"] == "done"
    with pytest.raises(NondeterminismError, match="turn 2; the recorded run has 1"):
        turns.complete(request([{"role": "user", "content": "x"}]))
    with pytest.raises(NondeterminismError):
        turns.complete(request([{"role": "user", "content": "x"}], pid=7))
    with pytest.raises(TypeError, match="open log"):
        ReplayModel(tmp_path / "rec" / "s" / "log.db")


# --- pricing, redaction, call records ------------------------------------------------------------

def test_estimate_cost() -> None:
    usage = {"input_tokens": 1_000_000, "output_tokens": 100_000}
    assert estimate_cost("anthropic:claude-sonnet-4-20250514", usage) == pytest.approx(3.0 + 1.5)
    assert estimate_cost("claude-3-5-haiku-latest", usage) == pytest.approx(0.8 + 0.4)
    assert estimate_cost("openai:gpt-4o-mini", usage) == pytest.approx(0.15 + 0.06)
    assert estimate_cost("local:qwen-test", usage) is None
    assert estimate_cost("scripted", {"input_tokens": 0, "output_tokens": 0}) is None


def test_redact() -> None:
    assert redact("key=hunter2-secret in body", ["hunter2-secret"]) == "key=[REDACTED] in body"
    assert "sk-ant-" not in redact("used sk-ant-api03-abcdefghijklmnop here")
    assert redact("Authorization: Bearer abc.def-ghijk") == "Authorization: Bearer [REDACTED]"
    assert redact("nothing secret", [None, ""]) == "nothing secret"


def test_call_record_levels() -> None:
    value = {"content": [{"type": "text", "text": "the key is sk-ant-api03-zzzzzzzzzzzz"}], "stop_reason": "end_turn",
             "usage": {"input_tokens": 1000, "output_tokens": 100}}
    req = {"messages": [{"role": "user", "content": "my password is swordfish"}]}
    assert call_record("off", model="anthropic:claude-sonnet-4-5", value=value, latency_s=0.5) is None
    meta = call_record("metadata", model="anthropic:claude-sonnet-4-5", value=value, latency_s=0.5, request=req)
    assert meta is not None and "request" not in meta and "response" not in meta
    assert (meta["input_tokens"], meta["output_tokens"], meta["stop_reason"]) == (1000, 100, "end_turn")
    assert meta["cost_usd"] == pytest.approx(0.0045)
    full = call_record("full", model="m", value=value, latency_s=0.5, request=req, secrets=["swordfish"])
    assert full is not None
    assert "swordfish" not in json.dumps(full) and "sk-ant-" not in json.dumps(full)
    assert full["request"]["messages"][0]["content"] == "my password is [REDACTED]"
    with pytest.raises(ValueError):
        call_record("verbose", model="m", value=value, latency_s=0)
