"""Resolution of request paths inside a capability root, one component at a time on open fds.

Nothing here looks at path strings to decide containment: every step is an openat relative to an
O_PATH directory fd, `..` pops a stack of those fds, and symlinks are spliced in and re-walked.
"""

from __future__ import annotations

import errno
import os
import stat as _stat
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal, Self

from agentlibos.bus._errors import KernelError

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "MAX_SYMLINKS",
    "PathComponents",
    "Resolution",
    "Root",
    "resolve",
    "split_path",
    "strip_root",
]

MAX_PATH_BYTES: Final = 4096
MAX_NAME_BYTES: Final = 255
MAX_SYMLINKS: Final = 40

_KERNEL_FILESYSTEMS: Final = ("proc", "dev", "sys")

_O_DIR_PATH: Final = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_O_STEP: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

Kind = Literal["file", "dir", "other"]


class PathComponents(list[str]):
    """The components of a request path; `trailing_slash` records a final '/'.

    A trailing slash requires the final object, if it exists, to be a directory.
    """

    def __init__(self, components: Iterable[str] = (), *, trailing_slash: bool = False) -> None:
        super().__init__(components)
        self.trailing_slash = trailing_slash


def _encode(name: str, what: str) -> bytes:
    try:
        return os.fsencode(name)
    except UnicodeEncodeError:
        raise KernelError("EINVAL", f"{what} {name!r} cannot be encoded") from None


def split_path(path: str) -> PathComponents:
    """Split a request path (relative to the world root) into components.

    '' and '.' components are dropped; '..' is kept for `resolve` to apply.
    """
    if not isinstance(path, str):
        raise KernelError("EINVAL", f"path must be a string, not {type(path).__name__}")
    if "\x00" in path:
        raise KernelError("EINVAL", f"path {path!r} contains a NUL byte")
    if path == "":
        raise KernelError("EINVAL", "empty path")
    if path.startswith("/"):
        first = next((p for p in path.split("/") if p), "")
        if first in _KERNEL_FILESYSTEMS:
            raise KernelError("EPERM", f"path {path!r}: /{first} is never reachable")
        raise KernelError("EPERM", f"path {path!r} is absolute; paths are relative to the root")
    if len(_encode(path, "path")) > MAX_PATH_BYTES:
        raise KernelError("EINVAL", f"path is longer than {MAX_PATH_BYTES} bytes")
    parts = path.split("/")
    # "x/" and "x/." both require x to be a directory.
    components = PathComponents(trailing_slash=len(parts) > 1 and parts[-1] in ("", "."))
    for part in parts:
        if part in ("", "."):
            continue
        if len(_encode(part, "path component")) > MAX_NAME_BYTES:
            raise KernelError("EINVAL", f"a component of {path!r} is longer than {MAX_NAME_BYTES} bytes")
        components.append(part)
    return components


def strip_root(root_components: Sequence[str], path_components: Sequence[str]) -> list[str] | None:
    """The request components below the cap root, or None if the path does not start with it.

    The prefix must match exactly: a '..' inside it never matches, so `root/../root/x` is None.
    """
    n = len(root_components)
    if len(path_components) < n or list(path_components[:n]) != list(root_components):
        return None
    return PathComponents(
        path_components[n:], trailing_slash=bool(getattr(path_components, "trailing_slash", False))
    )


class Root:
    """An open capability root: an O_PATH fd on the directory, and its components in the world."""

    __slots__ = ("_closed", "components", "fd")

    def __init__(self, fd: int, components: tuple[str, ...]) -> None:
        self.fd = fd
        self.components = components
        self._closed = False

    @classmethod
    def open(cls, world_root: str | os.PathLike[str], rel: str) -> Root:
        """Open `rel` below `world_root`; a symlink or '..' anywhere in `rel` is EPERM."""
        if not isinstance(rel, str) or "\x00" in rel:
            raise KernelError("EINVAL", f"root {rel!r} is not a path")
        if rel.startswith("/"):
            raise KernelError("EPERM", f"root {rel!r} is absolute; roots are relative to the world")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise KernelError("EPERM", f"root {rel!r} contains '..'")
        try:
            # The world root is operator configuration: its own path may contain symlinks.
            fd = os.open(world_root, _O_DIR_PATH)
        except OSError as exc:
            raise KernelError("EIO", f"cannot open the world root: {exc.strerror}") from None
        try:
            for part in parts:
                dir_fd, fd = fd, -1
                fd = _open_root_step(dir_fd, part, rel)  # closes dir_fd, even on error
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return cls(fd, tuple(parts))

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"Root({'/'.join(self.components)!r}, {state})"


def _open_root_step(dir_fd: int, part: str, rel: str) -> int:
    """Open `part` under `dir_fd` as a directory, closing `dir_fd` (ownership moves on)."""
    try:
        if len(_encode(part, "root component")) > MAX_NAME_BYTES:
            raise KernelError("EINVAL", f"a component of root {rel!r} is too long")
        try:
            fd = os.open(part, _O_STEP, dir_fd=dir_fd)
        except FileNotFoundError:
            raise KernelError("ENOENT", f"root {rel!r} does not exist") from None
        except OSError as exc:
            raise KernelError("EIO", f"cannot open root {rel!r}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if _stat.S_ISLNK(mode):
            raise KernelError("EPERM", f"root {rel!r} passes through a symbolic link ({part!r})")
        if not _stat.S_ISDIR(mode):
            raise KernelError("EINVAL", f"root {rel!r} is not a directory ({part!r})")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(eq=False, slots=True)
class Resolution:
    """Where a request path landed: the final component `name` inside directory `parent_fd`.

    `rel` is the canonical path relative to the cap root after following links ('' for the
    root itself, whose `name` is None and whose `parent_fd` is the root). The Resolution owns
    `parent_fd`; close it.
    """

    rel: str
    parent_fd: int
    name: str | None
    exists: bool
    kind: Kind | None
    trailing_slash: bool = False
    _closed: bool = field(default=False, init=False, repr=False)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.parent_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _kind(mode: int) -> Kind:
    if _stat.S_ISREG(mode):
        return "file"
    if _stat.S_ISDIR(mode):
        return "dir"
    return "other"


def _walk_error(exc: OSError, shown: str) -> KernelError:
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return KernelError("ENOENT", f"{shown!r}: no such file or directory")
    if isinstance(exc, PermissionError):
        return KernelError("EPERM", f"{shown!r}: permission denied")
    if exc.errno == errno.ENAMETOOLONG:
        return KernelError("EINVAL", f"{shown!r}: name too long")
    if exc.errno == errno.ELOOP:  # only a racing swap can produce it with O_PATH|O_NOFOLLOW
        return KernelError("EPERM", f"{shown!r}: symbolic link changed during resolution")
    return KernelError("EIO", f"{shown!r}: {exc.strerror}")


def resolve(root: Root, components: Sequence[str], *, max_symlinks: int = MAX_SYMLINKS) -> Resolution:
    """Walk `components` (already stripped of the root's own) from `root`, never leaving it.

    `..` pops a directory (popping past the root is EPERM); a symlink, in the middle or at the
    end, is read relative to its own directory and its target's components are walked in its
    place (an absolute target is EPERM). A missing final component is fine (exists=False); a
    missing or non-directory intermediate one is ENOENT.
    """
    if root.closed:
        raise KernelError("EIO", "the capability root is closed")
    shown = "/".join(components) or "."
    trailing = bool(getattr(components, "trailing_slash", False))
    pending: deque[str] = deque(components)
    # stack[i] is an owned O_PATH fd on directory names[i]; the root itself is root.fd.
    stack: list[int] = []
    names: list[str] = []
    links = 0

    try:
        while pending:
            name = pending.popleft()
            if name in ("", "."):
                continue
            dir_fd = stack[-1] if stack else root.fd
            if name == "..":
                if not names:
                    raise KernelError("EPERM", f"{shown!r}: path leaves the capability root")
                os.close(stack.pop())
                names.pop()
                continue
            if "\x00" in name or "/" in name:
                raise KernelError("EINVAL", f"{shown!r}: invalid component {name!r}")
            try:
                fd = os.open(name, _O_STEP, dir_fd=dir_fd)
            except FileNotFoundError:
                if pending:
                    raise KernelError("ENOENT", f"{shown!r}: no such directory {name!r}") from None
                return _finish(root, stack, names, name, exists=False, kind=None, trailing=trailing)
            except OSError as exc:
                raise _walk_error(exc, shown) from None
            try:
                mode = os.fstat(fd).st_mode
                if _stat.S_ISLNK(mode):
                    # Read the link we opened (readlinkat on the O_PATH fd), not whatever the
                    # name points at now.
                    target = os.readlink("", dir_fd=fd)
            except OSError as exc:
                os.close(fd)
                raise _walk_error(exc, shown) from None
            except BaseException:
                os.close(fd)
                raise
            if _stat.S_ISLNK(mode):
                os.close(fd)
                links += 1
                if links > max_symlinks:
                    raise KernelError("EPERM", f"{shown!r}: too many symbolic links")
                if target.startswith("/"):
                    raise KernelError("EPERM", f"{shown!r}: symbolic link {name!r} is absolute")
                if target == "":
                    raise KernelError("ENOENT", f"{shown!r}: symbolic link {name!r} is empty")
                pending.extendleft(reversed(target.split("/")))
                continue
            if _stat.S_ISDIR(mode):
                stack.append(fd)
                names.append(name)
                continue
            os.close(fd)
            if pending:
                raise KernelError("ENOENT", f"{shown!r}: {name!r} is not a directory")
            return _finish(root, stack, names, name, exists=True, kind=_kind(mode), trailing=trailing)

        # The walk ended on a directory: the root, or the top of the stack.
        if not names:
            parent_fd = os.dup(root.fd)
            return Resolution("", parent_fd, None, True, "dir", trailing)
        os.close(stack.pop())
        name = names.pop()
        return _finish(root, stack, names, name, exists=True, kind="dir", trailing=trailing)
    finally:
        for fd in stack:
            os.close(fd)


def _finish(
    root: Root,
    stack: list[int],
    names: list[str],
    name: str,
    *,
    exists: bool,
    kind: Kind | None,
    trailing: bool,
) -> Resolution:
    """Build the Resolution, moving the parent fd out of `stack` (the caller closes the rest)."""
    rel = "/".join([*names, name])
    if trailing and exists and kind != "dir":
        raise KernelError("EINVAL", f"{rel!r} is not a directory")
    parent_fd = stack.pop() if stack else os.dup(root.fd)
    return Resolution(rel, parent_fd, name, exists, kind, trailing)
