"""/proc/PID/maps entries, and reading the files behind them without leaving the process's root.

Containment rule: a file another process mapped is read either through
/proc/PID/map_files/<start>-<end> (bound by the kernel to the mapped inode:
works for deleted and memfd files, needs CAP_SYS_ADMIN) or through
/proc/PID/root/<path> with every symlink resolved by us, relative to that
root. Letting the kernel follow an absolute symlink found inside a container
would resolve it against *our* root, i.e. read a host file the container
named.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
from dataclasses import dataclass

DELETED_SUFFIX = " (deleted)"
MEMFD_PREFIX = "/memfd:"
# Symlinks followed per path before giving up, as the kernel's ELOOP limit.
MAX_SYMLINKS = 40
# Most of /proc/PID/maps read: ~100k mappings. A process can make as many as vm.max_map_count allows
# (65530 by default, but raised on some hosts) with paths up to PATH_MAX each; past it, an OSError.
MAX_MAPS_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class MapsEntry:
    """One line of /proc/PID/maps. `path` has any " (deleted)" suffix removed (see `deleted`)."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str
    deleted: bool = False

    @property
    def is_executable(self) -> bool:
        return "x" in self.perms

    @property
    def is_anonymous(self) -> bool:
        """No backing file and no kernel-given name (JIT code, heap from mmap)."""
        return self.path == "" or self.path.startswith("[anon:")

    @property
    def is_special(self) -> bool:
        """A kernel-named region: [vdso], [vsyscall], [heap], [stack], [vvar], [uprobes]..."""
        return self.path.startswith("[")

    @property
    def is_vdso(self) -> bool:
        return self.path == "[vdso]"

    @property
    def is_vsyscall(self) -> bool:
        return self.path == "[vsyscall]"

    @property
    def is_memfd(self) -> bool:
        """Backed by a memfd_create() file ("/memfd:name (deleted)"); readable via map_files only."""
        return self.path.startswith(MEMFD_PREFIX)

    @property
    def is_file(self) -> bool:
        """Backed by a file with an inode (possibly deleted or a memfd)."""
        return self.inode != 0 and self.path.startswith("/")


def parse_maps(text: str) -> list[MapsEntry]:
    """Parse the text of /proc/PID/maps. Malformed lines are skipped, not fatal."""
    out: list[MapsEntry] = []
    for line in text.splitlines():
        # "start-end perms offset dev inode<spaces>path" -- path may hold spaces.
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        try:
            lo, hi = fields[0].split("-", 1)
            start, end = int(lo, 16), int(hi, 16)
            offset = int(fields[2], 16)
            inode = int(fields[4])
        except ValueError:
            continue
        path = fields[5] if len(fields) == 6 else ""
        deleted = path.endswith(DELETED_SUFFIX)
        if deleted:
            path = path[: -len(DELETED_SUFFIX)]
        out.append(MapsEntry(start, end, fields[1], offset, fields[3], inode, path, deleted))
    return out


def read_maps(pid: int | str, proc_root: str = "/proc") -> list[MapsEntry]:
    """The maps of process `pid`. Raises OSError (e.g. FileNotFoundError once it exited, EFBIG past
    MAX_MAPS_BYTES)."""
    with open(f"{proc_root}/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
        text = f.read(MAX_MAPS_BYTES + 1)
    if len(text) > MAX_MAPS_BYTES:
        raise OSError(errno.EFBIG, f"/proc/{pid}/maps is larger than {MAX_MAPS_BYTES >> 20} MiB")
    return parse_maps(text)


def file_base(pid: int | str, path: str, proc_root: str = "/proc") -> int:
    """Start of the mapping of `path`'s file offset 0 in `pid` (the load base of a PIE or library).

    Matched by inode, so any path to the file will do. OSError if it is not mapped.
    """
    inode = os.stat(path).st_ino
    for entry in read_maps(pid, proc_root):
        if entry.offset == 0 and entry.inode == inode:
            return entry.start
    raise OSError(f"{path} is not mapped in {pid}")


def resolve_in_root(root: str, path: str) -> str:
    """`path` as seen by a process whose root is `root`, with symlinks resolved inside `root`.

    Returns root + the resolved path; "..", and absolute link targets, never
    climb above `root`. Raises OSError (FileNotFoundError, ELOOP, ...).
    The result's last component is not a symlink, so opening it follows
    nothing; a container racing to swap a directory for a link between our
    check and the open is not defended against (openat2 RESOLVE_IN_ROOT would).
    """
    pending = collections.deque(p for p in path.split("/") if p not in ("", "."))
    resolved: list[str] = []
    links = 0
    while pending:
        name = pending.popleft()
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, name)
        if stat.S_ISLNK(os.lstat(candidate).st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
        else:
            resolved.append(name)
    return os.path.join(root, *resolved)


def open_mapped_file(pid: int | str, entry: MapsEntry, proc_root: str = "/proc") -> str | None:
    """A path on this host through which the file behind `entry` can be read, or None.

    Prefers /proc/PID/map_files/<start>-<end> (the exact mapped inode; deleted
    and memfd files included), else /proc/PID/root/<path> resolved with
    resolve_in_root(). The second is only returned when its inode is the
    mapped one, so a file replaced since it was mapped is not misread.
    None: no backing file, the process is gone, or no permission.
    """
    if not entry.is_file:
        return None
    map_file = f"{proc_root}/{pid}/map_files/{entry.start:x}-{entry.end:x}"
    try:
        st = os.stat(map_file)
        if st.st_ino == entry.inode:
            return map_file
    except OSError:
        pass  # not root (needs CAP_SYS_ADMIN), or the mapping is gone
    if entry.is_memfd or entry.deleted:
        return None  # no name in the filesystem refers to that inode any more
    try:
        path = resolve_in_root(f"{proc_root}/{pid}/root", entry.path)
        if os.stat(path).st_ino == entry.inode:
            return path
    except OSError:
        pass
    return None
