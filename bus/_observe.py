"""What the kernel records of each model call (`llm.call` entries, the `llm/` topic): model,
tokens in and out, latency, stop reason and a cost estimate at level `metadata`, plus the request
and the response at level `full`, with secrets redacted; nothing at level `off`.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["OBSERVE_LEVELS", "PRICING", "REDACTED", "call_record", "estimate_cost", "redact"]

# --- secrets and prices ------------------------------------------------------------------------

REDACTED = "[REDACTED]"
_KEY_PATTERNS = re.compile(
    r"(sk-ant-[A-Za-z0-9_\-]{8,}|sk-[A-Za-z0-9_\-]{16,}|(?<=Bearer )[A-Za-z0-9._\-]{8,}|(?<=x-api-key: )\S+)"
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every given secret, and anything shaped like an API key, replaced by [REDACTED]."""
    for s in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return _KEY_PATTERNS.sub(REDACTED, text)


#: USD per million tokens (input, output), first matching glob wins. Estimates for observability,
#: not billing: check the provider's price list.
PRICING: list[tuple[str, float, float]] = [
    ("claude-opus-4-5*", 5.0, 25.0),
    ("claude-opus-4*", 15.0, 75.0),
    ("claude-3-opus*", 15.0, 75.0),
    ("claude-sonnet-4*", 3.0, 15.0),
    ("claude-3-7-sonnet*", 3.0, 15.0),
    ("claude-3-5-sonnet*", 3.0, 15.0),
    ("claude-haiku-4*", 1.0, 5.0),
    ("claude-3-5-haiku*", 0.8, 4.0),
    ("claude-3-haiku*", 0.25, 1.25),
    ("gpt-4o-mini*", 0.15, 0.6),
    ("gpt-4o*", 2.5, 10.0),
    ("gpt-4.1-mini*", 0.4, 1.6),
    ("gpt-4.1*", 2.0, 8.0),
]


def estimate_cost(model: str | None, usage: Mapping[str, Any] | None) -> float | None:
    """Estimated USD for one call, or None for a model with no known price (local models, tests)."""
    if not model or not usage:
        return None
    name = model.split(":", 1)[1] if ":" in model and model.split(":", 1)[0] in ("anthropic", "openai") else model
    for glob, p_in, p_out in PRICING:
        if fnmatch.fnmatchcase(name, glob):
            tin = float(usage.get("input_tokens", 0) or 0)
            tin += int(usage.get("cache_creation_input_tokens", 0) or 0) * 1.25
            tin += int(usage.get("cache_read_input_tokens", 0) or 0) * 0.1
            return round((tin * p_in + int(usage.get("output_tokens", 0) or 0) * p_out) / 1_000_000, 8)
    return None


OBSERVE_LEVELS = ("off", "metadata", "full")


def call_record(level: str, *, model: str | None, value: Mapping[str, Any] | None, latency_s: float,
                request: Mapping[str, Any] | None = None, error: str | None = None,
                secrets: Iterable[str | None] = ()) -> dict[str, Any] | None:
    """The observability record of one model call at `level` (off | metadata | full): None, the
    numbers, or the numbers plus the request and response, with secrets redacted."""
    if level not in OBSERVE_LEVELS:
        raise ValueError(f"observe level must be one of {OBSERVE_LEVELS}, not {level!r}")
    if level == "off":
        return None
    usage = dict((value or {}).get("usage") or {})
    rec: dict[str, Any] = {
        "model": model, "input_tokens": int(usage.get("input_tokens", 0) or 0),
        "output_tokens": int(usage.get("output_tokens", 0) or 0), "latency_s": round(latency_s, 6),
        "stop_reason": (value or {}).get("stop_reason"), "cost_usd": estimate_cost(model, usage),
        "error": redact(error, secrets) if error else None,
    }
    if level == "full":
        secrets = list(secrets)
        rec["request"] = json.loads(redact(json.dumps(request or {}, default=repr), secrets))
        rec["response"] = json.loads(redact(json.dumps({"content": (value or {}).get("content")}, default=repr), secrets))
    return rec


