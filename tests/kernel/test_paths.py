"""Path resolution inside a capability root: a corpus of hostile paths, races, and random walks.

Every case either lands on an exact object inside the root or fails with an exact code; no case
may reach anything outside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentlibos.bus._errors import KernelError
from agentlibos.kernel import _fsops as fsops
from agentlibos.kernel._paths import (
    MAX_SYMLINKS,
    PathComponents,
    Resolution,
    Root,
    resolve,
    split_path,
    strip_root,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SECRET = "SECRET: must never be read"
LONG_NAME = "a" * 255
UNICODE_NAME = "héllo_世界.txt"
NEWLINE_NAME = "new\nline.txt"


def build_world(base: Path) -> Path:
    """world/secret.txt and world/outside/ outside the cap root world/root/, and a root full of links."""
    world = base / "world"
    root = world / "root"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "sub" / "sub").mkdir()
    (root / "empty_dir").mkdir()
    (root / "proc" / "self").mkdir(parents=True)
    (world / "outside").mkdir()
    files = {
        world / "secret.txt": SECRET,
        world / "outside" / "o.txt": "OUTSIDE",
        root / "file.txt": "hello",
        root / "sub" / "inner.txt": "inner",
        root / "sub" / "file.txt": "sub file",
        root / "sub" / "deep" / "d.txt": "deep",
        root / "sub" / "sub" / "file.txt": "subsub",
        root / LONG_NAME: "long",
        root / UNICODE_NAME: "unicode",
        root / NEWLINE_NAME: "newline",
        root / "spaced name.txt": "spaced",
        root / "...": "dots",
        root / "proc" / "self" / "environ": "not the real environ",
    }
    for path, text in files.items():
        path.write_text(text)
    os.mkfifo(root / "fifo")
    links = {
        "link_in": "file.txt",
        "link_in_sub": "sub",
        "link_in_deep": "sub/deep/d.txt",
        "link_out": "../secret.txt",
        "link_out_dir": "../outside",
        "link_abs": "/etc/passwd",
        "link_abs_root_file": str(root / "file.txt"),
        "link_proc": "/proc/self/environ",
        "link_dev": "/dev/null",
        "chain1": "chain2",
        "chain2": "chain3",
        "chain3": "file.txt",
        "chain_out1": "chain_out2",
        "chain_out2": "../secret.txt",
        "loop": "loop_b",
        "loop_b": "loop",
        "self_loop": "self_loop",
        "link_dot": ".",
        "link_dotdot": "..",
        "link_sub_dotdot": "sub/..",
        "link_escape_via_sub": "sub/../../secret.txt",
        "link_inside_via_dotdot": "sub/../file.txt",
        "dangling": "nothere",
        "dangling_out": "../nothere",
        "link_file_slash": "file.txt/",
        "link_chain_dir": "link_in_sub/deep",
        "link_to_link_out": "link_out",
        "link_root_name": "../root/file.txt",
        "link_to_sub_trailing": "sub/",
        "sub/link_up_file": "../file.txt",
        "sub/link_escape": "../../secret.txt",
        "sub/link_out": "../../secret.txt",
        "sub/link_in": "../sub",
        "sub/loop": "../loop",
        "sub/sub/link_out": "../../../secret.txt",
        "sub/sub/link_in": "../../file.txt",
        "sub/sub/loop": "loop",
    }
    for name, target in links.items():
        os.symlink(target, root / name)
    return world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_world(tmp_path_factory.mktemp("paths"))


@pytest.fixture
def root(world: Path) -> Iterator[Root]:
    with Root.open(world, "root") as r:
        yield r


def _exact_length_path(total: int) -> str:
    """A world-relative path of exactly `total` bytes below root/, with 200-byte components."""
    path = "root"
    while len(path) + 1 + 200 < total:
        path += "/" + "b" * 200
    return path + "/" + "c" * (total - len(path) - 1)


# (request path relative to the world root, expectation). An expectation is an error code, or
# (kind, rel, text): kind "file" (text is the content), "dir", "missing" (exists=False), "other".
CORPUS: list[tuple[str, object]] = [
    # plain paths and normalization
    ("root/file.txt", ("file", "file.txt", "hello")),
    ("root/./file.txt", ("file", "file.txt", "hello")),
    ("root//file.txt", ("file", "file.txt", "hello")),
    ("./root/file.txt", ("file", "file.txt", "hello")),
    ("root/sub//deep///d.txt", ("file", "sub/deep/d.txt", "deep")),
    ("root/sub/inner.txt", ("file", "sub/inner.txt", "inner")),
    ("root/sub/deep/d.txt", ("file", "sub/deep/d.txt", "deep")),
    ("root/sub/deep/./../inner.txt", ("file", "sub/inner.txt", "inner")),
    ("root", ("dir", "", None)),
    ("root/", ("dir", "", None)),
    ("root/.", ("dir", "", None)),
    ("root/./", ("dir", "", None)),
    ("root/sub", ("dir", "sub", None)),
    ("root/sub/", ("dir", "sub", None)),
    ("root/empty_dir", ("dir", "empty_dir", None)),
    ("root/nothere", ("missing", "nothere", None)),
    ("root/sub/nothere.txt", ("missing", "sub/nothere.txt", None)),
    ("root/FILE.TXT", ("missing", "FILE.TXT", None)),
    ("root/ file.txt", ("missing", " file.txt", None)),
    ("root/file.txt ", ("missing", "file.txt ", None)),
    ("root/\\..\\secret.txt", ("missing", "\\..\\secret.txt", None)),
    ("root/nothere/", ("missing", "nothere", None)),
    ("root/fifo", ("other", "fifo", None)),
    # '..' that stays inside
    ("root/sub/../file.txt", ("file", "file.txt", "hello")),
    ("root/sub/deep/../../file.txt", ("file", "file.txt", "hello")),
    ("root/sub/..", ("dir", "", None)),
    ("root/sub/../sub/../sub/inner.txt", ("file", "sub/inner.txt", "inner")),
    ("root/empty_dir/../file.txt", ("file", "file.txt", "hello")),
    ("root/proc/../file.txt", ("file", "file.txt", "hello")),
    ("root/sub/deep/..", ("dir", "sub", None)),
    # '..' that leaves, or a path that never enters the root
    ("root/..", "EPERM"),
    ("root/../", "EPERM"),
    ("root/../secret.txt", "EPERM"),
    ("root/sub/../../secret.txt", "EPERM"),
    ("root/sub/../../root/file.txt", "EPERM"),
    ("root/sub/deep/../../..", "EPERM"),
    ("root/../../etc/passwd", "EPERM"),
    ("root/../root/file.txt", "EPERM"),
    ("secret.txt", "EPERM"),
    ("outside/o.txt", "EPERM"),
    ("..", "EPERM"),
    ("../world/secret.txt", "EPERM"),
    ("ROOT/file.txt", "EPERM"),
    ("rootx/file.txt", "EPERM"),
    (".", "EPERM"),
    # absolute paths and kernel filesystems
    ("/etc/passwd", "EPERM"),
    ("/proc/self/environ", "EPERM"),
    ("/proc", "EPERM"),
    ("/dev/null", "EPERM"),
    ("/sys", "EPERM"),
    ("/sys/kernel", "EPERM"),
    ("//proc/self/environ", "EPERM"),
    ("/root/file.txt", "EPERM"),
    ("/", "EPERM"),
    # malformed
    ("", "EINVAL"),
    ("root/fi\x00le.txt", "EINVAL"),
    ("root/..\x00", "EINVAL"),
    ("\x00", "EINVAL"),
    # name and path lengths
    ("root/" + LONG_NAME, ("file", LONG_NAME, "long")),
    ("root/" + "a" * 256, "EINVAL"),
    ("root/" + "é" * 127, ("missing", "é" * 127, None)),
    ("root/" + "é" * 128, "EINVAL"),
    ("root/" + LONG_NAME + "/", "EINVAL"),
    (_exact_length_path(4096), "ENOENT"),
    (_exact_length_path(4097), "EINVAL"),
    # unusual but legal names
    ("root/" + UNICODE_NAME, ("file", UNICODE_NAME, "unicode")),
    ("root/" + NEWLINE_NAME, ("file", NEWLINE_NAME, "newline")),
    ("root/spaced name.txt", ("file", "spaced name.txt", "spaced")),
    ("root/...", ("file", "...", "dots")),
    ("root/proc/self/environ", ("file", "proc/self/environ", "not the real environ")),
    # non-directories in the middle, trailing slashes on files
    ("root/file.txt/", "EINVAL"),
    ("root/file.txt/.", "EINVAL"),
    ("root/file.txt/x", "ENOENT"),
    ("root/file.txt/..", "ENOENT"),
    ("root/sub/inner.txt/..", "ENOENT"),
    ("root/nothere/x", "ENOENT"),
    ("root/nothere/..", "ENOENT"),
    ("root/.../", "EINVAL"),
    ("root/fifo/x", "ENOENT"),
    # symlinks that stay inside
    ("root/link_in", ("file", "file.txt", "hello")),
    ("root/link_in_sub", ("dir", "sub", None)),
    ("root/link_in_sub/", ("dir", "sub", None)),
    ("root/link_in_sub/inner.txt", ("file", "sub/inner.txt", "inner")),
    ("root/link_in_sub/../file.txt", ("file", "file.txt", "hello")),
    ("root/link_in_sub/link_up_file", ("file", "file.txt", "hello")),
    ("root/link_in_sub/sub/link_in", ("file", "file.txt", "hello")),
    ("root/link_in_deep", ("file", "sub/deep/d.txt", "deep")),
    ("root/sub/link_up_file", ("file", "file.txt", "hello")),
    ("root/sub/link_in/inner.txt", ("file", "sub/inner.txt", "inner")),
    ("root/sub/sub/link_in", ("file", "file.txt", "hello")),
    ("root/chain1", ("file", "file.txt", "hello")),
    ("root/link_dot", ("dir", "", None)),
    ("root/link_dot/file.txt", ("file", "file.txt", "hello")),
    ("root/link_dot/link_dot/link_dot/file.txt", ("file", "file.txt", "hello")),
    ("root/link_sub_dotdot", ("dir", "", None)),
    ("root/link_sub_dotdot/file.txt", ("file", "file.txt", "hello")),
    ("root/link_inside_via_dotdot", ("file", "file.txt", "hello")),
    ("root/link_chain_dir/d.txt", ("file", "sub/deep/d.txt", "deep")),
    ("root/link_to_sub_trailing/inner.txt", ("file", "sub/inner.txt", "inner")),
    ("root/dangling", ("missing", "nothere", None)),
    ("root/link_in/", "EINVAL"),
    ("root/chain1/", "EINVAL"),
    ("root/link_file_slash", "ENOENT"),
    # symlinks that leave, are absolute, or never end
    ("root/link_out", "EPERM"),
    ("root/link_out/..", "EPERM"),
    ("root/link_out_dir", "EPERM"),
    ("root/link_out_dir/o.txt", "EPERM"),
    ("root/link_abs", "EPERM"),
    ("root/link_abs/..", "EPERM"),
    ("root/link_abs_root_file", "EPERM"),
    ("root/link_proc", "EPERM"),
    ("root/link_dev", "EPERM"),
    ("root/chain_out1", "EPERM"),
    ("root/link_to_link_out", "EPERM"),
    ("root/link_root_name", "EPERM"),
    ("root/link_dotdot", "EPERM"),
    ("root/link_dotdot/secret.txt", "EPERM"),
    ("root/link_dot/..", "EPERM"),
    ("root/link_escape_via_sub", "EPERM"),
    ("root/link_in_sub/../../secret.txt", "EPERM"),
    ("root/link_in_sub/sub/link_out", "EPERM"),
    ("root/sub/link_escape", "EPERM"),
    ("root/sub/link_escape/..", "EPERM"),
    ("root/sub/link_out", "EPERM"),
    ("root/sub/sub/link_out", "EPERM"),
    ("root/dangling_out", "EPERM"),
    ("root/loop", "EPERM"),
    ("root/loop/x", "EPERM"),
    ("root/self_loop", "EPERM"),
    ("root/sub/loop", "EPERM"),
    ("root/sub/sub/loop", "EPERM"),
]


def open_fds() -> set[str]:
    """Open descriptors, without the listing's own (see conftest.open_fds)."""
    return {fd for fd in os.listdir("/proc/self/fd") if os.path.lexists(f"/proc/self/fd/{fd}")}


def _case_id(case: tuple[str, object]) -> str:
    path = repr(case[0])
    return path if len(path) <= 60 else path[:40] + f"...({len(case[0])} chars)"


def run_request(root: Root, path: str) -> Resolution:
    """What the kernel does with a request path before checking coverage."""
    components = strip_root(root.components, split_path(path))
    if components is None:
        raise KernelError("EPERM", f"{path!r} is outside the capability root")
    return resolve(root, components)


def _inodes_under(top: Path) -> set[tuple[int, int]]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            found.add((st.st_dev, st.st_ino))
    return found


def reached(res: Resolution) -> os.stat_result:
    """The object a resolution names (not following a final symlink)."""
    if res.name is None:
        return os.fstat(res.parent_fd)
    return os.stat(res.name, dir_fd=res.parent_fd, follow_symlinks=False)


def check_inside(world: Path, res: Resolution) -> None:
    """The global invariant: the directory reached, and the object if it exists, lie inside root."""
    inside = _inodes_under(world / "root")
    parent = os.fstat(res.parent_fd)
    assert (parent.st_dev, parent.st_ino) in inside
    if res.exists:
        st = reached(res)
        assert (st.st_dev, st.st_ino) in inside
        # The canonical rel names the same object.
        by_rel = os.lstat(world / "root" / res.rel) if res.rel else os.lstat(world / "root")
        assert (by_rel.st_dev, by_rel.st_ino) == (st.st_dev, st.st_ino)


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 100
    assert len({path for path, _ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=_case_id)
def test_corpus(world: Path, root: Root, case: tuple[str, object], fd_guard: None) -> None:
    path, expected = case
    if isinstance(expected, str):
        with pytest.raises(KernelError) as info:
            run_request(root, path).close()
        assert info.value.code == expected, info.value
        return
    kind, rel, text = expected  # type: ignore[misc]
    with run_request(root, path) as res:
        assert res.rel == rel
        check_inside(world, res)
        if kind == "missing":
            assert not res.exists and res.kind is None
            return
        assert res.exists and res.kind == kind
        if kind == "file":
            assert fsops.read(res) == {"text": text}
            # What read opened is a file under root, and it is the file the rel names.
            st = reached(res)
            assert (st.st_dev, st.st_ino) in _inodes_under(world / "root")
        elif kind == "dir":
            assert res.name == (rel.rsplit("/", 1)[-1] if rel else None)


def test_secret_is_never_reachable(world: Path, root: Root) -> None:
    secret = os.stat(world / "secret.txt")
    outside = _inodes_under(world / "outside")
    for path, _ in CORPUS:
        try:
            res = run_request(root, path)
        except KernelError:
            continue
        with res:
            st = reached(res) if res.exists else os.fstat(res.parent_fd)
            assert (st.st_dev, st.st_ino) != (secret.st_dev, secret.st_ino)
            assert (st.st_dev, st.st_ino) not in outside


def test_corpus_leaks_no_descriptors(root: Root) -> None:
    before = len(open_fds())
    for _ in range(3):
        for path, _expected in CORPUS:
            try:
                run_request(root, path).close()
            except KernelError:
                pass
    assert len(open_fds()) == before


# --- split_path and strip_root ----------------------------------------------------------------


def test_split_path_drops_empty_and_dot_and_keeps_dotdot() -> None:
    assert split_path("a//./b/../c") == ["a", "b", "..", "c"]
    assert split_path(".") == []
    assert split_path("a/b/").trailing_slash
    assert not split_path("a/b").trailing_slash
    assert split_path("a/b/") == ["a", "b"]


@pytest.mark.parametrize("path", ["/etc", "/proc/self/environ", "/dev/null", "/sys", "//proc", "/"])
def test_split_path_refuses_absolute(path: str) -> None:
    with pytest.raises(KernelError) as info:
        split_path(path)
    assert info.value.code == "EPERM"


def test_split_path_limits() -> None:
    assert split_path("x" * 255) == ["x" * 255]
    assert len(split_path(_exact_length_path(4096))) > 1
    for bad in ["x" * 256, "é" * 128, _exact_length_path(4097), "", "a\x00b", "\ud800"]:
        with pytest.raises(KernelError) as info:
            split_path(bad)
        assert info.value.code == "EINVAL"


def test_strip_root() -> None:
    assert strip_root(("root",), ["root", "a"]) == ["a"]
    assert strip_root(("root",), ["root"]) == []
    assert strip_root((), ["a"]) == ["a"]
    assert strip_root(("root", "sub"), ["root"]) is None
    assert strip_root(("root",), ["..", "root", "a"]) is None
    assert strip_root(("root",), ["rootx"]) is None
    stripped = strip_root(("root",), split_path("root/a/"))
    assert isinstance(stripped, PathComponents) and stripped.trailing_slash


# --- Root.open --------------------------------------------------------------------------------


def test_root_open(world: Path, fd_guard: None) -> None:
    with Root.open(world, "root/sub") as r:
        assert r.components == ("root", "sub")
        with resolve(r, ["inner.txt"]) as res:
            assert fsops.read(res) == {"text": "inner"}
    with Root.open(world, "") as r, resolve(r, ["secret.txt"]) as res:
        assert r.components == ()
        assert fsops.read(res) == {"text": SECRET}
    r = Root.open(str(world), "./root/")
    r.close()
    r.close()
    assert r.closed
    with pytest.raises(KernelError) as info:
        resolve(r, ["file.txt"])
    assert info.value.code == "EIO"


@pytest.mark.parametrize(
    ("rel", "code"),
    [
        ("root/link_in_sub", "EPERM"),
        ("root/link_dot", "EPERM"),
        ("root/link_out_dir", "EPERM"),
        ("root/sub/../sub", "EPERM"),
        ("/root", "EPERM"),
        ("root/nothere", "ENOENT"),
        ("root/file.txt", "EINVAL"),
        ("root/\x00", "EINVAL"),
    ],
)
def test_root_open_refuses(world: Path, rel: str, code: str, fd_guard: None) -> None:
    with pytest.raises(KernelError) as info:
        Root.open(world, rel)
    assert info.value.code == code


# --- symlink budget ---------------------------------------------------------------------------


def test_symlink_limit(tmp_path: Path, fd_guard: None) -> None:
    (tmp_path / "target.txt").write_text("end")
    previous = "target.txt"
    for i in range(MAX_SYMLINKS + 1):
        os.symlink(previous, tmp_path / f"l{i}")
        previous = f"l{i}"
    with Root.open(tmp_path, "") as r:
        with resolve(r, [f"l{MAX_SYMLINKS - 1}"]) as res:
            assert res.rel == "target.txt"
        with pytest.raises(KernelError) as info:
            resolve(r, [f"l{MAX_SYMLINKS}"])
        assert info.value.code == "EPERM"
        assert "too many symbolic links" in info.value.message
        with pytest.raises(KernelError):
            resolve(r, ["l3"], max_symlinks=3)
        resolve(r, ["l2"], max_symlinks=3).close()


# --- races: the check and the use act on the same opened object ------------------------------


@pytest.fixture
def fresh_world(tmp_path: Path) -> Path:
    return build_world(tmp_path)


def _swap_for_link(path: Path, target: str) -> None:
    tmp = path.with_name(path.name + ".swap")
    os.symlink(target, tmp)
    os.replace(tmp, path)


def test_swap_final_component_for_link_before_read_and_write(fresh_world: Path, fd_guard: None) -> None:
    world = fresh_world
    with Root.open(world, "root") as r, resolve(r, ["file.txt"]) as res:
        assert res.exists and res.kind == "file"
        _swap_for_link(world / "root" / "file.txt", "../secret.txt")
        for op in (
            lambda: fsops.read(res),
            lambda: fsops.write(res, "pwned", "w", create=False),
            lambda: fsops.write(res, "pwned", "a", create=False),
            lambda: fsops.listdir(res),
        ):
            with pytest.raises(KernelError) as info:
                op()
            assert info.value.code == "EPERM"
        with pytest.raises(KernelError) as info:
            fsops.write(res, "pwned", "w", create=True)
        assert info.value.code == "EEXIST"
        assert fsops.stat(res)["type"] == "symlink"
        fsops.delete(res)  # removes the link itself, never its target
    assert (world / "secret.txt").read_text() == SECRET


def test_swap_missing_name_for_link_before_create(fresh_world: Path, fd_guard: None) -> None:
    world = fresh_world
    with Root.open(world, "root") as r, resolve(r, ["new.txt"]) as res:
        assert not res.exists
        os.symlink("../secret.txt", world / "root" / "new.txt")
        with pytest.raises(KernelError) as info:
            fsops.write(res, "pwned", "w", create=True)
        assert info.value.code == "EEXIST"
        with pytest.raises(KernelError) as info:
            fsops.write(res, "pwned", "w", create=False)
        assert info.value.code == "EPERM"
    assert (world / "secret.txt").read_text() == SECRET


def test_swap_directory_for_link_before_listdir(fresh_world: Path, fd_guard: None) -> None:
    world = fresh_world
    with Root.open(world, "root") as r, resolve(r, ["empty_dir"]) as res:
        os.rmdir(world / "root" / "empty_dir")
        os.symlink("../outside", world / "root" / "empty_dir")
        with pytest.raises(KernelError) as info:
            fsops.listdir(res)
        assert info.value.code == "EPERM"


def test_swap_intermediate_directory_keeps_the_resolved_one(fresh_world: Path, fd_guard: None) -> None:
    """The parent fd pins the directory that was checked; a link swapped in for it is not used."""
    world = fresh_world
    with Root.open(world, "root") as r, resolve(r, ["sub", "inner.txt"]) as res:
        os.rename(world / "root" / "sub", world / "root" / "sub_old")
        os.symlink("../outside", world / "root" / "sub")
        (world / "outside" / "inner.txt").write_text("OUTSIDE INNER")
        assert fsops.read(res) == {"text": "inner"}
        fsops.write(res, "changed", "w", create=False)
    assert (world / "root" / "sub_old" / "inner.txt").read_text() == "changed"
    assert (world / "outside" / "inner.txt").read_text() == "OUTSIDE INNER"


def test_swap_root_path_component_after_open(fresh_world: Path, fd_guard: None) -> None:
    world = fresh_world
    with Root.open(world, "root") as r:
        os.rename(world / "root", world / "root_old")
        os.symlink("outside", world / "root")
        with resolve(r, ["file.txt"]) as res:
            assert fsops.read(res) == {"text": "hello"}
        with resolve(r, ["o.txt"]) as res:  # the root fd still names the real root
            assert not res.exists


# --- random walks -----------------------------------------------------------------------------

ALPHABET = ["..", ".", "sub", "link_out", "link_in", "loop", "file.txt", "secret.txt", ""]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(ALPHABET), max_size=8))
def test_random_walks_never_leave_root(world: Path, components: list[str]) -> None:
    inside = _inodes_under(world / "root")
    secret = os.stat(world / "secret.txt")
    before = len(open_fds())
    with Root.open(world, "root") as r:
        try:
            res = resolve(r, components)
        except KernelError as exc:
            assert exc.code in {"EPERM", "ENOENT", "EINVAL"}
        else:
            with res:
                parent = os.fstat(res.parent_fd)
                assert (parent.st_dev, parent.st_ino) in inside
                if res.exists:
                    st = reached(res)
                    assert (st.st_dev, st.st_ino) in inside
                    assert (st.st_dev, st.st_ino) != (secret.st_dev, secret.st_ino)
                    if res.kind == "file":
                        assert fsops.read(res)["text"] != SECRET
                else:
                    assert not (world / "root" / res.rel).exists()
        # The same walk through the request-path front door agrees.
        joined = "/".join(["root", *components])
        try:
            via_split = run_request(r, joined)
        except KernelError:
            pass
        else:
            with via_split:
                if via_split.exists:
                    st = reached(via_split)
                    assert (st.st_dev, st.st_ino) in inside
    assert len(open_fds()) == before
