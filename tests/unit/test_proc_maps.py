"""parse_maps, and reading mapped files without escaping the process's root."""

from __future__ import annotations

import mmap
import os
import shutil

import pytest

from fixtures.builder import build_c
from symbolizer.elf import ElfFile
from symbolizer.proc_maps import (
    open_mapped_file,
    parse_maps,
    read_maps,
    resolve_in_root,
)

MAPS = """\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1311 /usr/bin/my prog
55d0c0a02000-55d0c0a05000 r-xp 00002000 fd:01 1311 /usr/bin/my prog
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000001000 r-xp 00000000 00:00 0 
7f0000001000-7f0000002000 r-xp 00000000 00:01 4242                       /memfd:jit-code (deleted)
7f0000002000-7f0000003000 r-xp 00001000 fd:01 777                        /opt/app/lib/libgone.so (deleted)
7f0000003000-7f0000004000 rw-p 00000000 00:00 0                          [anon:scudo:primary]
7ffd5a1f0000-7ffd5a1f2000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
garbage line
"""


def test_parse_maps_fields_and_flags():
    entries = parse_maps(MAPS)
    assert len(entries) == 9
    exe = entries[1]
    assert (exe.start, exe.end, exe.perms, exe.offset, exe.dev, exe.inode, exe.path) == (
        0x55D0C0A02000, 0x55D0C0A05000, "r-xp", 0x2000, "fd:01", 1311, "/usr/bin/my prog")
    assert exe.is_executable and exe.is_file and not exe.deleted
    assert not entries[0].is_executable
    heap, anon, memfd, gone, named_anon, vdso, vsyscall = entries[2:]
    assert heap.is_special and not heap.is_file
    assert anon.is_anonymous and anon.is_executable and anon.path == ""
    assert memfd.is_memfd and memfd.deleted and memfd.path == "/memfd:jit-code" and memfd.is_file
    assert gone.deleted and gone.path == "/opt/app/lib/libgone.so" and gone.offset == 0x1000
    assert named_anon.is_anonymous
    assert vdso.is_vdso and vdso.is_special and not vdso.is_file
    assert vsyscall.is_vsyscall and vsyscall.start == 0xFFFFFFFFFF600000


def test_read_maps_self_and_open_libc():
    entries = read_maps("self")
    libc = next(e for e in entries if e.is_executable and e.path.endswith("/libc.so.6"))
    path = open_mapped_file("self", libc)
    assert path is not None
    assert os.stat(path).st_ino == libc.inode
    if os.geteuid() == 0:
        assert "/map_files/" in path  # the inode-bound route is preferred


@pytest.fixture
def fake_proc(tmp_path):
    """A /proc with process 42 whose root is a directory: the kernel's magic link is absent,
    so only our own symlink resolution keeps reads inside the "container"."""
    root = tmp_path / "proc" / "42" / "root"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "etc").mkdir()
    lib = root / "usr" / "lib" / "libfoo.so"
    lib.write_bytes(b"container's libfoo")
    (root / "lib").symlink_to("/usr/lib")  # absolute: must resolve inside root
    (root / "usr" / "lib" / "libevil.so").symlink_to("/etc/passwd")  # exists on the host only
    climb = "../" * (len(root.parts) + 2)  # more than enough to reach the host's /
    (root / "usr" / "lib" / "libclimb.so").symlink_to(climb + "etc/passwd")
    (root / "loop").symlink_to("/loop")
    return tmp_path / "proc", root


def entry_for(path: str, inode: int, deleted: bool = False):
    line = f"7f0000000000-7f0000001000 r-xp 00000000 fd:01 {inode} {path}{' (deleted)' if deleted else ''}\n"
    return parse_maps(line)[0]


def test_absolute_symlink_resolves_inside_root(fake_proc):
    proc_root, root = fake_proc
    ino = (root / "usr" / "lib" / "libfoo.so").stat().st_ino
    path = open_mapped_file(42, entry_for("/lib/libfoo.so", ino), proc_root=str(proc_root))
    assert path == str(root / "usr" / "lib" / "libfoo.so")
    with open(path, "rb") as f:
        assert f.read() == b"container's libfoo"


@pytest.mark.parametrize("name", ["libevil.so", "libclimb.so"])
def test_symlinks_cannot_escape_to_host(fake_proc, name):
    proc_root, root = fake_proc
    host_ino = os.stat("/etc/passwd").st_ino
    # Naively letting the kernel follow the link would reach the host's file with this inode.
    assert os.stat(root / "usr" / "lib" / name).st_ino == host_ino
    assert open_mapped_file(42, entry_for(f"/usr/lib/{name}", host_ino), proc_root=str(proc_root)) is None
    with pytest.raises(FileNotFoundError):
        resolve_in_root(str(root), f"/usr/lib/{name}")
    (root / "etc" / "passwd").write_text("container's passwd")
    assert resolve_in_root(str(root), f"/usr/lib/{name}") == str(root / "etc" / "passwd")


def test_symlink_loop_and_replaced_file(fake_proc):
    proc_root, root = fake_proc
    with pytest.raises(OSError):
        resolve_in_root(str(root), "/loop/x")
    ino = (root / "usr" / "lib" / "libfoo.so").stat().st_ino
    # The file at the path is not the mapped inode any more (replaced on upgrade).
    assert open_mapped_file(42, entry_for("/usr/lib/libfoo.so", ino + 1), proc_root=str(proc_root)) is None
    # Deleted and without map_files access: nothing names that inode.
    assert open_mapped_file(42, entry_for("/usr/lib/libfoo.so", ino, deleted=True), proc_root=str(proc_root)) is None


def map_exec(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)


@pytest.mark.skipif(os.geteuid() != 0, reason="map_files needs CAP_SYS_ADMIN")
def test_deleted_and_memfd_files_are_read_through_map_files(tmp_path):
    binary = build_c("symtest")
    build_id = ElfFile(binary).gnu_build_id
    data = binary.read_bytes()

    copy = tmp_path / "deleted-copy"
    shutil.copy(binary, copy)
    fd = os.open(copy, os.O_RDONLY)
    memfd = os.memfd_create("bpfprof-test")
    os.write(memfd, data)
    maps = []
    try:
        maps = [map_exec(fd, len(data)), map_exec(memfd, len(data))]
        os.unlink(copy)
        entries = read_maps("self")
        deleted = next(e for e in entries if e.deleted and e.path == str(copy))
        memfd_entry = next(e for e in entries if e.is_memfd and e.path == "/memfd:bpfprof-test")
        for entry in (deleted, memfd_entry):
            path = open_mapped_file("self", entry)
            assert path is not None and "/map_files/" in path
            assert ElfFile(path).gnu_build_id == build_id
    finally:
        for m in maps:
            m.close()
        os.close(fd)
        os.close(memfd)
