"""Globs over '/'-separated paths relative to a capability root, and exact narrowing checks.

`PathSet` decides coverage at syscall time; `glob_within` / `pathset_within` decide, by
language inclusion over small automata, whether a derived fs capability really narrows its parent.

Syntax: `*` matches within one component (no '/'), `?` one character other than '/', a whole
component `**` matches zero or more components (so `a/**` matches `a` itself and everything
below it, `**/x` matches `x` at any depth including the top). Everything else is literal; there
is no escaping and no character classes. `*` also matches names starting with '.'.
Paths given to `covers` are normalized: '' for the root, otherwise components joined by single
'/', none of them '', '.' or '..'. A component always has at least one character, so `*` does
not match the root.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from agentlibos.bus._errors import KernelError

__all__ = ["PathSet", "compile_glob", "glob_within", "pathset_within"]


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


# Parsed form. A pattern is a tuple of elements; an element is GLOBSTAR or a component, a tuple
# of tokens; a token is STAR, ANY or a one-character literal string. Rebasing prepends literal
# components, which is why parsing and matching work on this form rather than on pattern text.
_GLOBSTAR: Final = _Sentinel("**")
_STAR: Final = _Sentinel("*")
_ANY: Final = _Sentinel("?")

_Token = _Sentinel | str
_Component = tuple[_Token, ...]
_Element = _Sentinel | _Component
_Parsed = tuple[_Element, ...]

# Subset construction is exponential in the worst case; past this many product states we
# give up and answer "not within" (deny by default).
_MAX_PRODUCT_STATES: Final = 200_000


def _parse(pattern: str) -> _Parsed:
    if not isinstance(pattern, str):
        raise KernelError("EINVAL", f"glob must be a string, not {type(pattern).__name__}")
    if pattern == "":
        raise KernelError("EINVAL", "empty glob")
    if "\x00" in pattern:
        raise KernelError("EINVAL", f"glob {pattern!r} contains a NUL byte")
    if pattern.startswith("/"):
        raise KernelError("EINVAL", f"glob {pattern!r} is absolute; globs are relative to root")
    elements: list[_Element] = []
    for part in pattern.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise KernelError("EINVAL", f"glob {pattern!r} contains a '..' component")
        if part == "**":
            if not elements or elements[-1] is not _GLOBSTAR:
                elements.append(_GLOBSTAR)
            continue
        elements.append(_parse_component(part))
    if not elements:
        raise KernelError("EINVAL", f"glob {pattern!r} names no component")
    return tuple(elements)


def _parse_component(part: str) -> _Component:
    tokens: list[_Token] = []
    for ch in part:
        if ch == "*":
            if not tokens or tokens[-1] is not _STAR:
                tokens.append(_STAR)
        elif ch == "?":
            tokens.append(_ANY)
        else:
            tokens.append(ch)
    if all(t is _STAR for t in tokens):
        # A component is never empty: a lone `*` means "one or more characters".
        tokens = [_ANY, _STAR]
    return tuple(tokens)


def _literal_component(name: str) -> _Component:
    return tuple(name)


def _split_rel(rel: str, what: str) -> list[str]:
    if not isinstance(rel, str) or "\x00" in rel or rel.startswith("/"):
        raise KernelError("EINVAL", f"{what} {rel!r} is not a relative path")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise KernelError("EINVAL", f"{what} {rel!r} contains a '..' component")
    return parts


# --- regular expressions (matching) ---------------------------------------------------------


def _component_regex(component: _Component) -> str:
    out = []
    for token in component:
        if token is _STAR:
            out.append("[^/]*")
        elif token is _ANY:
            out.append("[^/]")
        else:
            assert isinstance(token, str)
            out.append(re.escape(token))
    return "".join(out)


def _regex_source(parsed: _Parsed) -> str:
    n = len(parsed)
    parts: list[str] = []
    need_sep = False
    for i, element in enumerate(parsed):
        if element is _GLOBSTAR:
            if n == 1:
                parts.append("(?:[^/]+(?:/[^/]+)*)?")
            elif i == 0:
                parts.append("(?:[^/]+/)*")
                need_sep = False
            else:
                # Middle or last: zero or more "/component" after what came before.
                parts.append("(?:/[^/]+)*")
                need_sep = True
        else:
            assert isinstance(element, tuple)
            if need_sep:
                parts.append("/")
            parts.append(_component_regex(element))
            need_sep = True
    return "".join(parts)


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile `pattern`; use `.fullmatch(rel)` on normalized relative paths ('' is the root)."""
    return re.compile(_regex_source(_parse(pattern)))


_MALFORMED_REL: Final = re.compile(r"\A/|/\Z|//|(?:\A|/)\.\.?(?:/|\Z)|\x00")


class PathSet:
    """The fs scope's `paths` (None: everything) minus `exclude`, relative to the cap root.

    An exclude also hides everything below what it matches: `exclude: [".git"]` hides
    `.git/config`.
    """

    __slots__ = ("_exclude_parsed", "_exclude_re", "_paths_parsed", "_paths_re", "exclude", "paths")

    def __init__(self, paths: Iterable[str] | None, exclude: Iterable[str] = ()) -> None:
        if isinstance(paths, str) or isinstance(exclude, str):
            raise KernelError("EINVAL", "paths and exclude are lists of globs, not strings")
        self.paths: tuple[str, ...] | None = None if paths is None else tuple(paths)
        self.exclude: tuple[str, ...] = tuple(exclude)
        self._paths_parsed: tuple[_Parsed, ...] | None = (
            None if self.paths is None else tuple(_parse(p) for p in self.paths)
        )
        self._exclude_parsed: tuple[_Parsed, ...] = tuple(_parse(p) for p in self.exclude)
        if self._paths_parsed is None:
            self._paths_re: re.Pattern[str] | None = None
        else:
            # An empty alternation must match nothing, hence the (?!) fallback.
            alternatives = [f"(?:{_regex_source(p)})" for p in self._paths_parsed] or ["(?!)"]
            self._paths_re = re.compile("|".join(alternatives))
        if self._exclude_parsed:
            self._exclude_re: re.Pattern[str] | None = re.compile(
                "|".join(f"(?:{_regex_source(_extend(p))})" for p in self._exclude_parsed)
            )
        else:
            self._exclude_re = None

    def covers(self, rel: str) -> bool:
        # A malformed path is never covered: coverage is only defined on normalized paths.
        if _MALFORMED_REL.search(rel):
            return False
        if self._paths_re is not None and self._paths_re.fullmatch(rel) is None:
            return False
        return self._exclude_re is None or self._exclude_re.fullmatch(rel) is None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PathSet):
            return NotImplemented
        return (self.paths, self.exclude) == (other.paths, other.exclude)

    def __hash__(self) -> int:
        return hash((self.paths, self.exclude))

    def __repr__(self) -> str:
        return f"PathSet(paths={self.paths!r}, exclude={self.exclude!r})"


def _extend(parsed: _Parsed) -> _Parsed:
    """`x` -> `x/**`: the pattern plus everything below whatever it matches."""
    return parsed if parsed[-1] is _GLOBSTAR else (*parsed, _GLOBSTAR)


# --- automata (inclusion) ---------------------------------------------------------------------
#
# The automata read the "wrapped" form of a path: '/' + rel + '/' (just '/' for the root). In
# that form a component is "chars then '/'" and `**` is "(chars '/')*", with no special cases
# for the first or last component. Wrapping is injective, so inclusion is unaffected.

_SLASH: Final = "/"
_NONSLASH: Final = _Sentinel("[^/]")  # edge label: any symbol except '/'
_NONSLASH_NONDOT: Final = _Sentinel("[^/.]")  # edge label, for the validity automaton
_DOT: Final = "."
_OTHER: Final = _Sentinel("other")  # alphabet symbol: any character no pattern names, nor '.'

_Label = _Sentinel | str
_Symbol = _Sentinel | str


class _NFA:
    __slots__ = ("accepts", "edges", "eps", "starts")

    def __init__(self) -> None:
        self.edges: list[list[tuple[_Label, int]]] = []
        self.eps: list[list[int]] = []
        self.starts: set[int] = set()
        self.accepts: set[int] = set()

    def new(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def add_pattern(self, parsed: _Parsed) -> None:
        start = self.new()
        cur = self.new()
        self.edges[start].append((_SLASH, cur))
        for element in parsed:
            entry = self.new()
            self.eps[cur].append(entry)
            if element is _GLOBSTAR:
                inner = self.new()
                self.edges[entry].append((_NONSLASH, inner))
                self.edges[inner].append((_NONSLASH, inner))
                self.edges[inner].append((_SLASH, entry))
                cur = entry
                continue
            assert isinstance(element, tuple)
            s = entry
            for token in element:
                if token is _STAR:
                    loop = self.new()
                    self.eps[s].append(loop)
                    self.edges[loop].append((_NONSLASH, loop))
                    s = loop
                else:
                    nxt = self.new()
                    self.edges[s].append((_NONSLASH if token is _ANY else token, nxt))
                    s = nxt
            end = self.new()
            self.edges[s].append((_SLASH, end))
            cur = end
        self.starts.add(start)
        self.accepts.add(cur)

    def closure(self, states: Iterable[int]) -> frozenset[int]:
        seen = set(states)
        todo = list(seen)
        while todo:
            for nxt in self.eps[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(seen)

    def step(self, states: frozenset[int], symbol: _Symbol) -> frozenset[int]:
        out: set[int] = set()
        for s in states:
            for label, dst in self.edges[s]:
                if (
                    label == symbol
                    or (label is _NONSLASH and symbol != _SLASH)
                    or (label is _NONSLASH_NONDOT and symbol != _SLASH and symbol != _DOT)
                ):
                    out.add(dst)
        return self.closure(out)


def _valid_paths() -> _NFA:
    """Wrapped normalized paths: no component is '.' or '..' (patterns already forbid '')."""
    nfa = _NFA()
    start, comp, dot, dotdot, name = (nfa.new() for _ in range(5))
    nfa.edges[start].append((_SLASH, comp))
    nfa.edges[comp] += [(_DOT, dot), (_NONSLASH_NONDOT, name)]
    nfa.edges[dot] += [(_DOT, dotdot), (_NONSLASH_NONDOT, name)]
    nfa.edges[dotdot].append((_NONSLASH, name))
    nfa.edges[name] += [(_NONSLASH, name), (_SLASH, comp)]
    nfa.starts.add(start)
    nfa.accepts.add(comp)
    return nfa


def _nfa(patterns: Iterable[_Parsed]) -> _NFA:
    nfa = _NFA()
    for parsed in patterns:
        nfa.add_pattern(parsed)
    return nfa


def _literals(patterns: Iterable[_Parsed]) -> set[str]:
    chars: set[str] = set()
    for parsed in patterns:
        for element in parsed:
            if isinstance(element, tuple):
                chars.update(t for t in element if isinstance(t, str))
    return chars


class _TooComplex(Exception):
    pass


def _find_path(
    nfas: Sequence[_NFA],
    literals: set[str],
    bad: Callable[[tuple[bool, ...]], bool],
) -> str | None:
    """A normalized path whose acceptance vector over `nfas` is `bad`, or None if there is none.

    `nfas[0]` must be the automaton whose acceptance `bad` requires: states where it is dead
    are not explored.
    """
    # Only normalized paths count: a '.' or '..' component never reaches `covers` as a match.
    nfas = [*nfas, _valid_paths()]
    alphabet: list[_Symbol] = [_SLASH, _OTHER, *sorted(literals | {_DOT})]
    start = tuple(n.closure(n.starts) for n in nfas)
    parents: dict[tuple[frozenset[int], ...], tuple[tuple[frozenset[int], ...], _Symbol] | None]
    parents = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        accepted = tuple(bool(s & n.accepts) for s, n in zip(state, nfas, strict=False))
        if accepted[-1] and bad(accepted[:-1]):
            return _witness(state, parents, literals)
        for symbol in alphabet:
            nxt = tuple(n.step(s, symbol) for s, n in zip(state, nfas, strict=False))
            if not nxt[0] or not nxt[-1] or nxt in parents:
                continue
            parents[nxt] = (state, symbol)
            if len(parents) > _MAX_PRODUCT_STATES:
                raise _TooComplex
            queue.append(nxt)
    return None


def _witness(
    state: tuple[frozenset[int], ...],
    parents: dict[tuple[frozenset[int], ...], tuple[tuple[frozenset[int], ...], _Symbol] | None],
    literals: set[str],
) -> str:
    other = next(c for c in ("z", "_", "0", *map(chr, range(0x100, 0x10000))) if c not in literals | {_DOT})
    symbols: list[str] = []
    link = parents[state]
    while link is not None:
        state, symbol = link
        symbols.append(other if symbol is _OTHER else str(symbol))
        link = parents[state]
    wrapped = "".join(reversed(symbols))
    return wrapped[1:-1]  # '/a/b/' -> 'a/b', '/' -> ''


def _glob_counterexample(child: str, parent: str) -> str | None:
    """A path matched by `child` and not by `parent`, or None when `child` is within `parent`."""
    c, p = _parse(child), _parse(parent)
    return _find_path([_nfa([c]), _nfa([p])], _literals([c, p]), lambda acc: acc[0] and not acc[1])


def glob_within(child: str, parent: str) -> bool:
    """True only if every path `child` matches is also matched by `parent`."""
    try:
        return _glob_counterexample(child, parent) is None
    except _TooComplex:
        return False


def _pathset_counterexample(child: PathSet, parent: PathSet, rebase: str) -> str | None:
    prefix: _Parsed = tuple(_literal_component(p) for p in _split_rel(rebase, "rebase"))
    if child._paths_parsed is None:
        child_paths: list[_Parsed] = [(*prefix, _GLOBSTAR)]
    else:
        child_paths = [(*prefix, *p) for p in child._paths_parsed]
    child_excl = [(*prefix, *_extend(p)) for p in child._exclude_parsed]
    parent_paths = [(_GLOBSTAR,)] if parent._paths_parsed is None else list(parent._paths_parsed)
    parent_excl = [_extend(p) for p in parent._exclude_parsed]
    groups = [child_paths, child_excl, parent_paths, parent_excl]
    nfas = [_nfa(g) for g in groups]
    literals = _literals(p for g in groups for p in g)

    def bad(acc: tuple[bool, ...]) -> bool:
        child_covers = acc[0] and not acc[1]
        parent_covers = acc[2] and not acc[3]
        return child_covers and not parent_covers

    return _find_path(nfas, literals, bad)


def pathset_within(child: PathSet, parent: PathSet, rebase: str = "") -> bool:
    """True only if every path `child` covers is covered by `parent`.

    `rebase` is the child's root relative to the parent's root ('' for the same root); a child
    path `r` is the parent path `rebase/r`. The check is exact (automata over both sets,
    excludes included); it answers False when the automata grow too large to decide.
    """
    try:
        return _pathset_counterexample(child, parent, rebase) is None
    except _TooComplex:
        return False
