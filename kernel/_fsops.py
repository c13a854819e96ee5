"""The fs effects, run on the directory fd and name that `resolve` produced and the kernel checked.

Every open uses O_NOFOLLOW relative to `res.parent_fd`, so a symlink swapped in after the check
makes the operation fail (EPERM) instead of being followed.
"""

from __future__ import annotations

import errno
import os
import stat as _stat
from typing import Any, Final, Literal

from agentlibos.bus._errors import KernelError
from agentlibos.kernel._paths import Resolution

__all__ = ["DEFAULT_MAX_READ_BYTES", "delete", "listdir", "mkdir", "read", "stat", "write"]

DEFAULT_MAX_READ_BYTES: Final = 4 * 1024 * 1024

_CHUNK: Final = 1 << 16


def _shown(res: Resolution) -> str:
    return res.rel or "."


def _os_error(exc: OSError, res: Resolution) -> KernelError:
    path = _shown(res)
    code = exc.errno
    if code == errno.ENOENT:
        return KernelError("ENOENT", f"{path!r}: no such file or directory")
    if code == errno.EEXIST:
        return KernelError("EEXIST", f"{path!r}: already exists")
    if code == errno.ELOOP:
        return KernelError("EPERM", f"{path!r}: is a symbolic link (changed after it was checked)")
    if code in (errno.EACCES, errno.EPERM):
        return KernelError("EPERM", f"{path!r}: permission denied")
    if code == errno.EISDIR:
        return KernelError("EINVAL", f"{path!r}: is a directory")
    if code == errno.ENOTDIR:
        return KernelError("EINVAL", f"{path!r}: not a directory")
    if code == errno.ENAMETOOLONG:
        return KernelError("EINVAL", f"{path!r}: name too long")
    if code == errno.ENOTEMPTY:
        return KernelError("EINVAL", f"{path!r}: directory not empty")
    return KernelError("EIO", f"{path!r}: {exc.strerror or exc}")


def _type(mode: int) -> Literal["file", "dir", "symlink", "other"]:
    if _stat.S_ISREG(mode):
        return "file"
    if _stat.S_ISDIR(mode):
        return "dir"
    if _stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _lstat(res: Resolution) -> os.stat_result:
    if res.name is None:
        return os.fstat(res.parent_fd)
    return os.stat(res.name, dir_fd=res.parent_fd, follow_symlinks=False)


def _require_regular(res: Resolution, mode: int) -> None:
    kind = _type(mode)
    if kind == "dir":
        raise KernelError("EINVAL", f"{_shown(res)!r}: is a directory")
    if kind == "symlink":
        raise KernelError("EPERM", f"{_shown(res)!r}: is a symbolic link (changed after it was checked)")
    if kind == "other":
        raise KernelError("EINVAL", f"{_shown(res)!r}: not a regular file")


def _open_regular(res: Resolution, flags: int, mode: int = 0o666) -> int:
    """Open the final component with O_NOFOLLOW and check that what was opened is a regular file.

    O_NONBLOCK keeps a FIFO swapped in from blocking the open; it has no effect on regular files.
    """
    assert res.name is not None
    fd = os.open(res.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=res.parent_fd)
    try:
        _require_regular(res, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def small_regular(res: Resolution, limit: int) -> bool:
    """A regular file of at most `limit` bytes as lstat sees it now (`read` checks again)."""
    if res.name is None:
        return False
    try:
        st = _lstat(res)
    except OSError:
        return False
    return _stat.S_ISREG(st.st_mode) and st.st_size <= limit


def read(res: Resolution, *, max_bytes: int = DEFAULT_MAX_READ_BYTES) -> dict[str, Any]:
    """`{"text": str}` for UTF-8 content, else `{"bytes": bytes}`."""
    if res.name is None:
        raise KernelError("EINVAL", f"{_shown(res)!r}: is a directory")
    try:
        # Refuse non-regular files before opening: opening a device can have side effects.
        _require_regular(res, _lstat(res).st_mode)
        fd = _open_regular(res, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size > max_bytes:
                raise KernelError("EINVAL", f"{_shown(res)!r}: {size} bytes is larger than the {max_bytes}-byte read limit")
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise KernelError("EINVAL", f"{_shown(res)!r}: larger than the {max_bytes}-byte read limit")
        finally:
            os.close(fd)
    except OSError as exc:
        raise _os_error(exc, res) from None
    data = b"".join(chunks)
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"bytes": data}


def write(
    res: Resolution, data: str | bytes, mode: Literal["w", "a"] = "w", *, create: bool
) -> dict[str, Any]:
    """Overwrite ('w') or append to ('a') the file; `create` makes a new one (O_EXCL) instead.

    Returns `{"bytes": n}`, the number of bytes written.
    """
    if mode not in ("w", "a"):
        raise KernelError("EINVAL", f"write mode must be 'w' or 'a', not {mode!r}")
    if isinstance(data, str):
        payload = data.encode("utf-8")
    elif isinstance(data, bytes | bytearray | memoryview):
        payload = bytes(data)
    else:
        raise KernelError("EINVAL", f"write data must be str or bytes, not {type(data).__name__}")
    if res.name is None:
        raise KernelError("EINVAL", f"{_shown(res)!r}: is a directory")
    if res.trailing_slash:
        raise KernelError("EINVAL", f"{_shown(res)!r}/: a file name cannot end with '/'")
    flags = os.O_WRONLY | (os.O_APPEND if mode == "a" else 0)
    try:
        if create:
            fd = _open_regular(res, flags | os.O_CREAT | os.O_EXCL, 0o644)
        else:
            _require_regular(res, _lstat(res).st_mode)
            fd = _open_regular(res, flags)
        try:
            if mode == "w" and not create:
                # Truncate only once the opened object is known to be a regular file.
                os.ftruncate(fd, 0)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as exc:
        raise _os_error(exc, res) from None
    return {"bytes": len(payload)}


def listdir(res: Resolution) -> dict[str, Any]:
    """`{"entries": [{"name", "type"}]}` sorted by name; type is file, dir, symlink or other."""
    try:
        if res.name is None:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=res.parent_fd)
        else:
            try:
                fd = os.open(
                    res.name,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=res.parent_fd,
                )
            except NotADirectoryError:
                # O_DIRECTORY|O_NOFOLLOW reports a symlink as ENOTDIR; say what happened.
                if _stat.S_ISLNK(_lstat(res).st_mode):
                    raise KernelError(
                        "EPERM", f"{_shown(res)!r}: is a symbolic link (changed after it was checked)"
                    ) from None
                raise
        try:
            entries = []
            for name in os.listdir(fd):
                try:
                    mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                except FileNotFoundError:
                    continue  # removed while listing
                entries.append({"name": name, "type": _type(mode)})
        finally:
            os.close(fd)
    except OSError as exc:
        raise _os_error(exc, res) from None
    entries.sort(key=lambda e: e["name"])
    return {"entries": entries}


def stat(res: Resolution) -> dict[str, Any]:
    """`{"type", "size", "mtime"}` of the final component itself (a symlink is not followed)."""
    try:
        st = _lstat(res)
    except OSError as exc:
        raise _os_error(exc, res) from None
    return {"type": _type(st.st_mode), "size": st.st_size, "mtime": st.st_mtime}


def delete(res: Resolution) -> dict[str, Any]:
    """Unlink a file (or a symlink itself), or remove an empty directory."""
    if res.name is None:
        raise KernelError("EPERM", "the capability root cannot be deleted")
    try:
        if _stat.S_ISDIR(_lstat(res).st_mode):
            os.rmdir(res.name, dir_fd=res.parent_fd)
        else:
            os.unlink(res.name, dir_fd=res.parent_fd)
    except OSError as exc:
        raise _os_error(exc, res) from None
    return {}


def mkdir(res: Resolution) -> dict[str, Any]:
    """Create the directory; EEXIST if anything is already there."""
    if res.name is None:
        raise KernelError("EEXIST", "the capability root already exists")
    try:
        os.mkdir(res.name, 0o755, dir_fd=res.parent_fd)
    except OSError as exc:
        raise _os_error(exc, res) from None
    return {}
