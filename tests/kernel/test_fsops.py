"""The fs effects on resolved paths: each operation's result and each of its error codes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentlibos.bus._errors import KernelError
from agentlibos.kernel import _fsops as fsops
from agentlibos.kernel._paths import Resolution, Root, resolve, split_path


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "dir" / "nested").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "file.txt").write_text("hello")
    (root / "dir" / "a.txt").write_text("a")
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00bin")
    (root / "big.txt").write_bytes(b"x" * 1000)
    os.symlink("file.txt", root / "link")
    os.mkfifo(root / "fifo")
    (tmp_path / "secret.txt").write_text("SECRET")
    return root


@pytest.fixture
def at(root_dir: Path, fd_guard: None) -> Iterator[Callable[[str], Resolution]]:
    """`at(path)` resolves a path relative to the cap root; every Resolution is closed after."""
    opened: list[Resolution] = []
    with Root.open(root_dir.parent, "root") as root:

        def _at(path: str) -> Resolution:
            res = resolve(root, split_path(path))
            opened.append(res)
            return res

        yield _at
        for res in opened:
            res.close()


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(KernelError) as info:
        fn()
    return info.value.code


# --- read -------------------------------------------------------------------------------------


def test_read(at: Callable[[str], Resolution]) -> None:
    assert fsops.read(at("file.txt")) == {"text": "hello"}
    assert fsops.read(at("link")) == {"text": "hello"}
    assert fsops.read(at("binary.bin")) == {"bytes": b"\xff\xfe\x00bin"}
    assert fsops.read(at("big.txt"), max_bytes=1000) == {"text": "x" * 1000}


def test_read_errors(at: Callable[[str], Resolution]) -> None:
    assert code_of(lambda: fsops.read(at("nothere"))) == "ENOENT"
    assert code_of(lambda: fsops.read(at("dir"))) == "EINVAL"
    assert code_of(lambda: fsops.read(at("."))) == "EINVAL"
    assert code_of(lambda: fsops.read(at("fifo"))) == "EINVAL"
    with pytest.raises(KernelError) as info:
        fsops.read(at("big.txt"), max_bytes=999)
    assert info.value.code == "EINVAL"
    assert "1000 bytes" in info.value.message and "999" in info.value.message


def test_read_of_a_vanished_file(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    res = at("file.txt")
    os.unlink(root_dir / "file.txt")
    with pytest.raises(KernelError) as info:
        fsops.read(res)
    assert info.value.code == "ENOENT"
    assert "file.txt" in info.value.message


# --- write ------------------------------------------------------------------------------------


def test_write_create_overwrite_append(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    assert fsops.write(at("new.txt"), "héllo", "w", create=True) == {"bytes": 6}
    assert (root_dir / "new.txt").read_text() == "héllo"
    assert fsops.write(at("new.txt"), b"\x00\x01", "a", create=False) == {"bytes": 2}
    assert (root_dir / "new.txt").read_bytes() == "héllo".encode() + b"\x00\x01"
    assert fsops.write(at("new.txt"), "x", "w", create=False) == {"bytes": 1}
    assert (root_dir / "new.txt").read_text() == "x"
    assert fsops.write(at("dir/nested/n.txt"), "", "a", create=True) == {"bytes": 0}
    assert (root_dir / "dir" / "nested" / "n.txt").read_text() == ""
    assert fsops.write(at("link"), "via link", "w", create=False) == {"bytes": 8}
    assert (root_dir / "file.txt").read_text() == "via link"
    assert os.path.islink(root_dir / "link")


def test_write_errors(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    assert code_of(lambda: fsops.write(at("file.txt"), "x", "w", create=True)) == "EEXIST"
    assert code_of(lambda: fsops.write(at("nothere"), "x", "w", create=False)) == "ENOENT"
    assert code_of(lambda: fsops.write(at("dir"), "x", "w", create=False)) == "EINVAL"
    assert code_of(lambda: fsops.write(at("dir"), "x", "w", create=True)) == "EEXIST"
    assert code_of(lambda: fsops.write(at("."), "x", "w", create=False)) == "EINVAL"
    assert code_of(lambda: fsops.write(at("fifo"), "x", "w", create=False)) == "EINVAL"
    assert code_of(lambda: fsops.write(at("new/"), "x", "w", create=True)) == "EINVAL"
    assert code_of(lambda: fsops.write(at("file.txt"), "x", "r", create=False)) == "EINVAL"  # type: ignore[arg-type]
    assert code_of(lambda: fsops.write(at("file.txt"), 42, "w", create=False)) == "EINVAL"  # type: ignore[arg-type]
    assert (root_dir / "file.txt").read_text() == "hello"
    assert not (root_dir / "new").exists()


def test_write_create_loses_a_race_with_a_creator(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    res = at("race.txt")
    (root_dir / "race.txt").write_text("first")
    assert code_of(lambda: fsops.write(res, "second", "w", create=True)) == "EEXIST"
    assert (root_dir / "race.txt").read_text() == "first"


def test_write_existing_loses_a_race_with_a_deleter(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    res = at("file.txt")
    os.unlink(root_dir / "file.txt")
    assert code_of(lambda: fsops.write(res, "x", "w", create=False)) == "ENOENT"
    assert not (root_dir / "file.txt").exists()


# --- listdir ----------------------------------------------------------------------------------


def test_listdir(at: Callable[[str], Resolution]) -> None:
    assert fsops.listdir(at(".")) == {
        "entries": [
            {"name": "big.txt", "type": "file"},
            {"name": "binary.bin", "type": "file"},
            {"name": "dir", "type": "dir"},
            {"name": "empty", "type": "dir"},
            {"name": "fifo", "type": "other"},
            {"name": "file.txt", "type": "file"},
            {"name": "link", "type": "symlink"},
        ]
    }
    assert fsops.listdir(at("dir")) == {
        "entries": [{"name": "a.txt", "type": "file"}, {"name": "nested", "type": "dir"}]
    }
    assert fsops.listdir(at("empty/")) == {"entries": []}


def test_listdir_errors(at: Callable[[str], Resolution]) -> None:
    assert code_of(lambda: fsops.listdir(at("nothere"))) == "ENOENT"
    assert code_of(lambda: fsops.listdir(at("file.txt"))) == "EINVAL"


# --- stat -------------------------------------------------------------------------------------


def test_stat(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    st = fsops.stat(at("file.txt"))
    assert st == {"type": "file", "size": 5, "mtime": os.stat(root_dir / "file.txt").st_mtime}
    assert fsops.stat(at("dir"))["type"] == "dir"
    assert fsops.stat(at("."))["type"] == "dir"
    assert fsops.stat(at("fifo"))["type"] == "other"
    # `link` resolves to file.txt; stat describes what the resolution reached.
    assert fsops.stat(at("link"))["type"] == "file"
    assert code_of(lambda: fsops.stat(at("nothere"))) == "ENOENT"


# --- delete -----------------------------------------------------------------------------------


def test_delete(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    assert fsops.delete(at("dir/a.txt")) == {}
    assert not (root_dir / "dir" / "a.txt").exists()
    assert fsops.delete(at("empty")) == {}
    assert not (root_dir / "empty").exists()
    assert fsops.delete(at("fifo")) == {}
    assert not (root_dir / "fifo").exists()


def test_delete_errors(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    with pytest.raises(KernelError) as info:
        fsops.delete(at("dir"))
    assert info.value.code == "EINVAL" and "not empty" in info.value.message
    assert code_of(lambda: fsops.delete(at("nothere"))) == "ENOENT"
    assert code_of(lambda: fsops.delete(at("."))) == "EPERM"
    assert (root_dir / "dir").is_dir()


# --- mkdir ------------------------------------------------------------------------------------


def test_mkdir(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    assert fsops.mkdir(at("made")) == {}
    assert (root_dir / "made").is_dir()
    assert fsops.mkdir(at("dir/nested/deeper/")) == {}
    assert (root_dir / "dir" / "nested" / "deeper").is_dir()


def test_mkdir_errors(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    assert code_of(lambda: fsops.mkdir(at("dir"))) == "EEXIST"
    assert code_of(lambda: fsops.mkdir(at("file.txt"))) == "EEXIST"
    assert code_of(lambda: fsops.mkdir(at("."))) == "EEXIST"
    res = at("later")
    os.symlink("../elsewhere", root_dir / "later")
    assert code_of(lambda: fsops.mkdir(res)) == "EEXIST"
    assert not (root_dir.parent / "elsewhere").exists()


# --- the swapped-in symlink, for every operation ---------------------------------------------


def test_every_operation_refuses_a_symlink_swapped_in(root_dir: Path, at: Callable[[str], Resolution]) -> None:
    res = at("file.txt")
    os.unlink(root_dir / "file.txt")
    os.symlink("../secret.txt", root_dir / "file.txt")
    assert code_of(lambda: fsops.read(res)) == "EPERM"
    assert code_of(lambda: fsops.write(res, "x", "w", create=False)) == "EPERM"
    assert code_of(lambda: fsops.write(res, "x", "a", create=False)) == "EPERM"
    assert code_of(lambda: fsops.write(res, "x", "w", create=True)) == "EEXIST"
    assert code_of(lambda: fsops.listdir(res)) == "EPERM"
    assert fsops.stat(res)["type"] == "symlink"
    assert code_of(lambda: fsops.mkdir(res)) == "EEXIST"
    assert fsops.delete(res) == {}
    assert (root_dir.parent / "secret.txt").read_text() == "SECRET"
