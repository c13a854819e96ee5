"""Globs: matching against a slow reference matcher, and exactness of the narrowing checks."""

from __future__ import annotations

import itertools

import pytest
from agentlibos.bus._errors import KernelError
from agentlibos.kernel import _globs
from agentlibos.kernel._globs import PathSet, compile_glob, glob_within, pathset_within
from hypothesis import given, settings
from hypothesis import strategies as st

# --- reference matcher: recursion over components, then over characters -----------------------


def ref_component(pattern: str, name: str) -> bool:
    if not pattern:
        return not name
    head = pattern[0]
    if head == "*":
        return any(ref_component(pattern[1:], name[i:]) for i in range(len(name) + 1))
    if not name:
        return False
    if head == "?" or head == name[0]:
        return ref_component(pattern[1:], name[1:])
    return False


def ref_components(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(ref_components(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and ref_component(pattern[0], path[0]) and ref_components(pattern[1:], path[1:])


def ref_match(pattern: str, rel: str) -> bool:
    pat = [p for p in pattern.split("/") if p not in ("", ".")]
    path = rel.split("/") if rel else []
    return ref_components(pat, path)


def ref_covers(paths: tuple[str, ...] | None, exclude: tuple[str, ...], rel: str) -> bool:
    if paths is not None and not any(ref_match(p, rel) for p in paths):
        return False
    parts = rel.split("/") if rel else []
    # An exclude hides what it matches and everything below.
    prefixes = ["/".join(parts[:i]) for i in range(len(parts) + 1)]
    return not any(ref_match(e, prefix) for e in exclude for prefix in prefixes)


# --- strategies -------------------------------------------------------------------------------

names = st.text(alphabet="ab.c", min_size=1, max_size=4).filter(lambda s: s not in (".", ".."))
rels = st.lists(names, max_size=4).map("/".join)
glob_components = st.one_of(
    st.just("**"),
    st.text(alphabet="ab*?.", min_size=1, max_size=4).filter(lambda s: s not in (".", "..", "**")),
)
globs = st.lists(glob_components, min_size=1, max_size=4).map("/".join)


# --- compile_glob -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("**", ["", "a", "a/b", "a/b/c"], []),
        ("a/**", ["a", "a/b", "a/b/c"], ["", "b", "ab", "b/a"]),
        ("**/x.txt", ["x.txt", "d/x.txt", "d/e/x.txt"], ["", "x.txt/d", "xxtxt", "dx.txt"]),
        ("a/**/b", ["a/b", "a/x/b", "a/x/y/b"], ["a", "b", "a/bb", "ab"]),
        ("*", ["a", ".git", "x.txt"], ["", "a/b"]),
        ("*.txt", ["a.txt", ".txt"], ["a.txt/b", "d/a.txt", "atxt"]),
        ("x/*.txt", ["x/a.txt"], ["x", "x/d/a.txt", "a.txt"]),
        ("?", ["a", "."], ["", "ab", "a/b"]),
        ("a?c", ["abc", "a.c"], ["ac", "a/c", "abbc"]),
        ("a.b+c(d)[e]{f}|^$", ["a.b+c(d)[e]{f}|^$"], ["aXb+c(d)[e]{f}|^$"]),
        ("src//lib/./x", ["src/lib/x"], ["src//lib/./x"]),
        ("a/", ["a"], ["a/b"]),
        ("**/**", ["", "a", "a/b"], []),
        ("a**b", ["ab", "axxb"], ["a/b"]),
        ("new\nline", ["new\nline"], ["new"]),
    ],
)
def test_compile_glob_examples(pattern: str, matches: list[str], misses: list[str]) -> None:
    regex = compile_glob(pattern)
    for rel in matches:
        assert regex.fullmatch(rel), (pattern, rel)
    for rel in misses:
        assert not regex.fullmatch(rel), (pattern, rel)


@pytest.mark.parametrize("pattern", ["", "/etc/*", "..", "a/../b", "a/..", "../**", ".", "./", "a\x00"])
def test_compile_glob_rejects_malformed(pattern: str) -> None:
    with pytest.raises(KernelError) as info:
        compile_glob(pattern)
    assert info.value.code == "EINVAL"


@settings(max_examples=500, deadline=None)
@given(globs, rels)
def test_compile_glob_agrees_with_reference(pattern: str, rel: str) -> None:
    assert bool(compile_glob(pattern).fullmatch(rel)) == ref_match(pattern, rel)


@settings(max_examples=200, deadline=None)
@given(globs)
def test_compile_glob_agrees_with_reference_exhaustively(pattern: str) -> None:
    regex = compile_glob(pattern)
    for depth in range(4):
        for parts in itertools.product(["a", "b", "ab", ".a"], repeat=depth):
            rel = "/".join(parts)
            assert bool(regex.fullmatch(rel)) == ref_match(pattern, rel), rel


# --- PathSet ----------------------------------------------------------------------------------


def test_pathset_covers() -> None:
    everything = PathSet(None, ())
    assert everything.covers("") and everything.covers("a/b")
    no_git = PathSet(None, (".git",))
    assert no_git.covers("src/a.py") and no_git.covers(".gitignore")
    assert not no_git.covers(".git") and not no_git.covers(".git/config")
    assert not PathSet(None, (".git/**",)).covers(".git/objects/ab")
    src = PathSet(("src/**", "README.md"), ("src/secret",))
    assert src.covers("src") and src.covers("src/a.py") and src.covers("README.md")
    assert not src.covers("") and not src.covers("docs/x") and not src.covers("src/secret/k")
    assert not PathSet((), ()).covers("a")
    assert not PathSet(None, ("**",)).covers("")


@pytest.mark.parametrize("rel", ["/a", "a/", "a//b", "..", "a/../b", "./a", "a/.", "a\x00"])
def test_pathset_never_covers_malformed_paths(rel: str) -> None:
    assert not PathSet(None, ()).covers(rel)


def test_pathset_rejects_malformed_globs() -> None:
    for paths, exclude in [(("/abs",), ()), (None, ("../x",)), (("",), ()), ("src/**", ())]:
        with pytest.raises(KernelError) as info:
            PathSet(paths, exclude)  # type: ignore[arg-type]
        assert info.value.code == "EINVAL"


def test_pathset_value_semantics() -> None:
    assert PathSet(["a"], [".git"]) == PathSet(("a",), (".git",))
    assert hash(PathSet(None, ())) == hash(PathSet(None, ()))
    assert PathSet(None, ()) != PathSet(("**",), ())


pathsets = st.builds(
    PathSet,
    st.one_of(st.none(), st.lists(globs, max_size=2).map(tuple)),
    st.lists(globs, max_size=2).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(pathsets, rels)
def test_pathset_agrees_with_reference(ps: PathSet, rel: str) -> None:
    assert ps.covers(rel) == ref_covers(ps.paths, ps.exclude, rel)


# --- glob_within ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("child", "parent", "expected"),
    [
        ("x/*.txt", "x/**", True),
        ("**", "x/**", False),
        ("x/**", "**", True),
        ("x", "x/**", True),
        ("x/**", "x", False),
        ("*", "**", True),
        ("**", "*", False),
        ("a/*", "a/?*", True),  # a component is never empty
        ("a/?*", "a/*", True),
        ("a/b", "a/?", True),
        ("a/bc", "a/?", False),
        ("**/x.txt", "**/*.txt", True),
        ("**/*.txt", "**/x.txt", False),
        ("a/**/b", "a/**", True),
        ("a/**/b", "**/b", True),
        ("**/b", "a/**/b", False),
        ("*.txt", "*", True),
        ("**/**", "**", True),
        ("a*b*c", "a*c", True),
        ("a*c", "a*b*c", False),
    ],
)
def test_glob_within_examples(child: str, parent: str, expected: bool) -> None:
    assert glob_within(child, parent) is expected


@settings(max_examples=300, deadline=None)
@given(globs)
def test_glob_within_is_reflexive(pattern: str) -> None:
    assert glob_within(pattern, pattern)
    assert glob_within(pattern, "**")


@settings(max_examples=400, deadline=None)
@given(globs, globs, st.lists(rels, max_size=20))
def test_glob_within_is_exact(child: str, parent: str, samples: list[str]) -> None:
    """True: no sampled path separates them. False: the automaton's witness separates them."""
    c, p = compile_glob(child), compile_glob(parent)
    witness = _globs._glob_counterexample(child, parent)
    if witness is None:
        assert glob_within(child, parent)
        for rel in samples:
            assert not c.fullmatch(rel) or p.fullmatch(rel), rel
        for depth in range(3):
            for parts in itertools.product(["a", "b", "ab", ".a"], repeat=depth):
                rel = "/".join(parts)
                assert not ref_match(child, rel) or ref_match(parent, rel), rel
    else:
        assert not glob_within(child, parent)
        assert c.fullmatch(witness) and not p.fullmatch(witness), witness
        assert ref_match(child, witness) and not ref_match(parent, witness), witness


# --- pathset_within ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("child", "parent", "rebase", "expected"),
    [
        (PathSet(None, ()), PathSet(None, ()), "", True),
        (PathSet(None, ()), PathSet(None, (".git",)), "", False),
        (PathSet(None, (".git",)), PathSet(None, (".git",)), "", True),
        (PathSet(None, (".git/**",)), PathSet(None, (".git",)), "", True),
        (PathSet(None, (".git/config",)), PathSet(None, (".git",)), "", False),
        (PathSet(None, ("**",)), PathSet((), ()), "", True),  # covers nothing
        (PathSet(("src/*.py",), ()), PathSet(("src/**",), ()), "", True),
        (PathSet(("src/**",), ()), PathSet(("src/*.py",), ()), "", False),
        (PathSet(("a/**", "b/**"), ()), PathSet(("**",), ()), "", True),
        (PathSet(("a/x", "b/x"), ()), PathSet(("a/*", "b/*"), ()), "", True),
        (PathSet(("a/x", "b/x"), ()), PathSet(("a/*",), ()), "", False),
        (PathSet(None, ()), PathSet(("src/**",), ()), "src", True),
        (PathSet(None, ()), PathSet(("src/*.py",), ()), "src", False),
        (PathSet(("*.py",), ()), PathSet(("src/*.py",), ()), "src", True),
        (PathSet(None, ("secret",)), PathSet(None, ("src/secret",)), "src", True),
        (PathSet(None, ()), PathSet(None, ("src/secret",)), "src", False),
        (PathSet(None, ()), PathSet(None, ("docs/secret",)), "src", True),  # parent exclude elsewhere
        (PathSet(None, ("**/*.pem",)), PathSet(None, ("**/*.pem",)), "a/b", True),
        (PathSet(None, ()), PathSet(None, ("**/*.pem",)), "a/b", False),
        (PathSet(("*.txt",), ()), PathSet(None, ("**/*.pem",)), "a", True),  # nothing to exclude
        (PathSet(None, ()), PathSet(None, ("src",)), "src", False),
        (PathSet(None, ()), PathSet(None, ()), "a*b/?", True),  # rebase is literal
        (PathSet(None, ()), PathSet(("a*b/**",), ()), "a*b", True),
        (PathSet(None, ()), PathSet(("a?b/**",), ()), "a*b", True),
        (PathSet(None, ()), PathSet(("a?b/**",), ()), "a**b", False),
    ],
)
def test_pathset_within_examples(child: PathSet, parent: PathSet, rebase: str, expected: bool) -> None:
    assert pathset_within(child, parent, rebase) is expected


def test_pathset_within_rejects_malformed_rebase() -> None:
    for rebase in ["/abs", "../x", "a/../b"]:
        with pytest.raises(KernelError):
            pathset_within(PathSet(None, ()), PathSet(None, ()), rebase)


def test_pathset_within_gives_up_by_denying(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_globs, "_MAX_PRODUCT_STATES", 1)
    assert not pathset_within(PathSet(("a/*",), ()), PathSet(None, ()))
    assert not glob_within("a/*", "**")


rebases = st.lists(st.sampled_from(["a", "b", "ab"]), max_size=2).map("/".join)


def _under(rebase: str, rel: str) -> str:
    return "/".join(p for p in (rebase, rel) if p)


@settings(max_examples=400, deadline=None)
@given(pathsets, pathsets, rebases, st.lists(rels, max_size=20))
def test_pathset_within_is_exact(child: PathSet, parent: PathSet, rebase: str, samples: list[str]) -> None:
    witness = _globs._pathset_counterexample(child, parent, rebase)
    if witness is None:
        for rel in samples:
            if child.covers(rel):
                assert parent.covers(_under(rebase, rel)), rel
    else:
        assert not pathset_within(child, parent, rebase)
        assert witness == rebase or witness.startswith(rebase + "/") or not rebase
        rel = witness[len(rebase):].lstrip("/") if rebase else witness
        assert child.covers(rel) and not parent.covers(witness), witness


@settings(max_examples=200, deadline=None)
@given(pathsets, rebases)
def test_pathset_within_is_reflexive_and_rebases(ps: PathSet, rebase: str) -> None:
    assert pathset_within(ps, ps, "")
    # The whole parent, seen from a subdirectory, is within the parent.
    assert pathset_within(PathSet(None, ()), PathSet(None, ()), rebase)
    # A child whose globs live entirely under the parent's globs re-based is within.
    parent = PathSet(
        None if ps.paths is None else tuple(_under(rebase, p) for p in ps.paths),
        tuple(_under(rebase, e) for e in ps.exclude),
    )
    assert pathset_within(ps, parent, rebase)
