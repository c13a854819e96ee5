"""canonical/digest: deterministic bytes, round trip, key-order independence, strict types."""

from __future__ import annotations

import math
import random
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentlibos.storage import canonical, digest

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _lists(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    return obj


def _shuffled(obj: Any, rnd: random.Random) -> Any:
    if isinstance(obj, dict):
        items = list(obj.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(obj, list):
        return [_shuffled(v, rnd) for v in obj]
    return obj


@given(values)
def test_round_trip(obj: Any) -> None:
    assert msgpack.unpackb(canonical(obj), raw=False) == _lists(obj)


@given(st.dictionaries(st.text(), values, max_size=8), st.randoms(use_true_random=False))
def test_key_order_does_not_matter(obj: dict[str, Any], rnd: random.Random) -> None:
    other = _shuffled(obj, rnd)
    assert canonical(other) == canonical(obj)
    assert digest(other) == digest(obj)


def test_keys_sorted_recursively() -> None:
    assert canonical({"b": {"d": 1, "c": 2}, "a": 0}) == msgpack.packb(
        {"a": 0, "b": {"c": 2, "d": 1}}, use_bin_type=True
    )


def test_tuples_are_lists_and_bytes_stay_bin() -> None:
    assert canonical((1, b"x")) == canonical([1, b"x"])
    assert canonical("x") != canonical(b"x")


def test_digest_is_sha256_hex() -> None:
    d = digest({"a": 1})
    assert len(d) == 64 and int(d, 16) >= 0


@pytest.mark.parametrize(
    "bad",
    [
        {1: "int key"},
        {"nested": {b"k": 1}},
        {1, 2},
        object(),
        [1, 2.5, complex(1, 2)],
        {"x": frozenset()},
        bytearray(b"x"),
        2**64,
    ],
)
def test_unsupported_raise_type_error(bad: Any) -> None:
    with pytest.raises(TypeError):
        canonical(bad)


def test_leaf_subclasses_are_refused() -> None:
    class MyStr(str):
        pass

    with pytest.raises(TypeError):
        canonical({"k": MyStr("v")})


def test_error_does_not_poison_the_next_call() -> None:
    with pytest.raises(TypeError):
        canonical([1, 2**70])
    assert canonical(1) == b"\x01"


def test_nan_is_deterministic() -> None:
    assert canonical(math.nan) == canonical(math.nan)
