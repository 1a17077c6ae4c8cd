"""Raw addresses -> Locations (mapping + frames), once per distinct address.

User addresses resolve through the process's snapshot (ProcessTracker),
kernel addresses through /proc/kallsyms. Each (pid, address) is resolved once
per resolver; a process whose address falls outside its snapshot gets its
maps re-read once (it mapped new code after first sight).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from agent.process_tracker import ProcessTracker
from exporters.profile import Location
from symbolizer.frames import BuildIdKind, Frame, FrameKind, Mapping
from symbolizer.kallsyms import KernelSymbols

log = logging.getLogger(__name__)

KERNEL_NOTES = Path("/sys/kernel/notes")
NT_GNU_BUILD_ID = 3


def kernel_build_id(notes_path: Path = KERNEL_NOTES) -> str:
    """The running kernel's GNU build id from /sys/kernel/notes, "" if unreadable."""
    try:
        data = notes_path.read_bytes()
    except OSError:
        return ""
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        name_off = off + 12
        desc_off = name_off + ((namesz + 3) & ~3)
        if data[name_off:name_off + namesz].rstrip(b"\0") == b"GNU" and ntype == NT_GNU_BUILD_ID:
            return data[desc_off:desc_off + descsz].hex()
        off = desc_off + ((descsz + 3) & ~3)
    return ""


@dataclass
class ResolverStats:
    user_addresses: int = 0
    user_unresolved: int = 0
    kernel_addresses: int = 0
    kernel_unresolved: int = 0


class StackResolver:
    """Turns a sample's kernel and user addresses into a leaf-first Location stack."""

    def __init__(self, tracker: ProcessTracker, kernel: KernelSymbols | None) -> None:
        self.tracker = tracker
        self.kernel = kernel
        self._user: dict[tuple[int, int, bool], Location] = {}
        self._kernel: dict[tuple[int, bool], Location] = {}
        self._refreshed: set[int] = set()
        self.kernel_mapping = Mapping(start=0, end=0, file_offset=0, path="[kernel.kallsyms]",
                                      build_id=kernel_build_id(),
                                      build_id_kind=BuildIdKind.GNU)
        self.stats = ResolverStats()

    def stack(self, pid: int, kernel_ips: tuple[int, ...], user_ips: tuple[int, ...]) -> tuple[Location, ...]:
        """Leaf-first locations: kernel frames (if any) above the user frames."""
        locs = [self._kernel_location(ip, i > 0) for i, ip in enumerate(kernel_ips)]
        # The first user address is the interrupted instruction only when the
        # sample hit user mode; under a kernel stack it is the syscall's return.
        user_leaf_is_pc = not kernel_ips
        for i, ip in enumerate(user_ips):
            locs.append(self._user_location(pid, ip, return_address=(i > 0 or not user_leaf_is_pc)))
        return tuple(locs)

    def _kernel_location(self, ip: int, return_address: bool) -> Location:
        key = (ip, return_address)
        loc = self._kernel.get(key)
        if loc is None:
            self.stats.kernel_addresses += 1
            frames: tuple[Frame, ...] = ()
            sym = self.kernel.lookup(ip - 1 if return_address else ip) if self.kernel else None
            if sym is not None:
                frames = (Frame(function=sym.name, kind=FrameKind.KERNEL, system_name=sym.name),)
            else:
                self.stats.kernel_unresolved += 1
            loc = Location(address=ip, mapping=self.kernel_mapping, frames=frames)
            self._kernel[key] = loc
        return loc

    def _user_location(self, pid: int, ip: int, return_address: bool) -> Location:
        key = (pid, ip, return_address)
        loc = self._user.get(key)
        if loc is not None:
            return loc
        self.stats.user_addresses += 1
        info = self.tracker.get(pid)
        mapping, frames = (None, ())
        if info is not None:
            if info.symbols.mapping_at(ip) is None and pid not in self._refreshed:
                self._refreshed.add(pid)
                info = self.tracker.refresh(pid) or info
            mapping, frames = info.symbols.resolve(ip, return_address)
        if not frames:
            self.stats.user_unresolved += 1
        loc = Location(address=ip, mapping=mapping, frames=frames)
        self._user[key] = loc
        return loc
