"""Canonical msgpack encoding: one byte string per value, whatever the dict order.

The log hashes these bytes, so two equal bodies must always encode identically.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import msgpack

__all__ = ["canonical", "canonical_pair", "digest", "pack_record_head"]

_tls = threading.local()


def _pack(obj: Any) -> bytes:
    # A reused Packer is ~40% cheaper than packb; one per thread because a Packer holds a
    # buffer. It resets that buffer when pack raises, so an error cannot leak into the next call.
    try:
        pack = _tls.pack
    except AttributeError:
        pack = _tls.pack = msgpack.Packer(use_bin_type=True).pack
    try:
        out: bytes = pack(obj)
        return out
    except OverflowError as exc:
        raise TypeError(f"canonical: int out of msgpack range ({exc})") from None


_LEAVES: frozenset[type] = frozenset({type(None), bool, int, float, str, bytes})


def _normalize(obj: Any) -> Any:
    """Return `obj` with every dict rebuilt in sorted key order, or raise TypeError."""
    t = type(obj)
    if t is dict:
        out: dict[str, Any] = {}
        try:
            keys = sorted(obj)
        except TypeError:
            raise TypeError("canonical: dict keys must be str") from None
        for k in keys:
            if type(k) is not str:
                raise TypeError(f"canonical: dict key {k!r} is not a str")
            v = obj[k]
            # Leaves are the common case: skip the call for them.
            out[k] = v if type(v) in _LEAVES else _normalize(v)
        return out
    if t is list or t is tuple:
        return [v if type(v) in _LEAVES else _normalize(v) for v in obj]
    if t in _LEAVES:
        return obj
    # Exact types only: a subclass (an enum, a str wrapper) could encode differently across
    # versions of its class, which would silently change hashes.
    raise TypeError(f"canonical: unsupported type {t.__name__}")


def canonical(obj: Any) -> bytes:
    """Deterministic msgpack of `obj`: str keys sorted recursively, tuples as lists.

    Leaves may be None, bool, int (64-bit range), float, str or bytes; anything else raises
    TypeError.
    """
    return _pack(_normalize(obj))


def canonical_pair(obj: Any) -> tuple[Any, bytes]:
    """`(normalized copy of obj, canonical(obj))`: the copy is what a reader decodes later."""
    norm = _normalize(obj)
    return norm, _pack(norm)


def digest(obj: Any) -> str:
    """sha256 hex of `canonical(obj)`."""
    return hashlib.sha256(canonical(obj)).hexdigest()


def pack_record_head(v: int, seq: int, ts: Any, pid: Any, kind: Any, cause: Any) -> bytes:
    """msgpack of the list [v, seq, ts, pid, kind, cause]: the fields of an entry before its body.

    The row values are packed as stored (no type checks): verify must hash whatever it reads.
    """
    return _pack([v, seq, ts, pid, kind, cause])
