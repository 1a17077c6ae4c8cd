"""CPython frame words (bpf/python.bpf.h) -> Frames, and their place in the native stack.

A word names a code object by address and the code unit its frame ran. The
code object is read once per (pid, address) from /proc/PID/mem with bounded
reads (name, file, first line, line table); the line of a code unit is
decoded from the version's line table: 3.9's co_lnotab and 3.10's co_linetable
(Objects/lnotab_notes.txt of each), 3.11-3.13's location table
(Objects/locations.md). 3.9 and 3.10 code objects have no co_qualname: their
frames are named by co_name (`spin`, not `Worker.spin`). A code object freed and another allocated at the same
address within one process would be misnamed until the cache is dropped
(per capture); py-spy and the OpenTelemetry profiler accept the same risk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from agent.bpfload.records import PY_CODE_MASK, PY_ENTRY_BIT, PY_SHIM, PY_UNIT_MASK, PY_UNIT_SHIFT
from agent.processes.memory import ProcessMemory
from agent.python.layouts import LINE_LNOTAB, LINE_LOCATIONS, LINE_TABLE_310, PyLayout
from exporters.profile import Location
from symbolizer.frames import Frame, FrameKind

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 1024  # longer names and paths are cut
MAX_LINETABLE_BYTES = 1 << 20
EVAL_FRAME = "_PyEval_EvalFrameDefault"  # the native frame that runs a run of Python frames


@dataclass(frozen=True)
class CodeInfo:
    qualname: str
    filename: str
    firstlineno: int
    linetable: bytes


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    pos += 1
    val = b & 63
    shift = 6
    while b & 64:
        b = data[pos]
        pos += 1
        val |= (b & 63) << shift
        shift += 6
    return val, pos


def _svarint(data: bytes, pos: int) -> tuple[int, int]:
    val, pos = _varint(data, pos)
    return (-(val >> 1) if val & 1 else val >> 1), pos


def line_of(linetable: bytes, firstlineno: int, unit: int) -> int:
    """The source line of code unit `unit`, 0 if none (CPython 3.11+ location table)."""
    line = firstlineno
    addr = 0
    pos = 0
    n = len(linetable)
    try:
        while pos < n:
            first = linetable[pos]
            pos += 1
            code = (first >> 3) & 15
            length = (first & 7) + 1
            has_line = True
            if code == 15:
                has_line = False
            elif code == 14:
                delta, pos = _svarint(linetable, pos)
                line += delta
                for _ in range(3):
                    _, pos = _varint(linetable, pos)
            elif code == 13:
                delta, pos = _svarint(linetable, pos)
                line += delta
            elif code >= 10:
                line += code - 10
                pos += 2
            else:
                pos += 1
            if addr <= unit < addr + length:
                return line if has_line else 0
            addr += length
    except IndexError:
        pass
    return 0


def line_of_lnotab(lnotab: bytes, firstlineno: int, unit: int) -> int:
    """The source line of code unit `unit` from a 3.9 co_lnotab: (byte delta, signed line delta) pairs,
    the line changing at each pair's address (as 3.9's PyCode_Addr2Line)."""
    target = unit * 2
    line = firstlineno
    addr = 0
    for i in range(0, len(lnotab) - 1, 2):
        addr += lnotab[i]
        if addr > target:
            break
        delta = lnotab[i + 1]
        line += delta - 256 if delta >= 128 else delta
    return line


def line_of_linetable_310(linetable: bytes, firstlineno: int, unit: int) -> int:
    """The source line of code unit `unit` from a 3.10 co_linetable: (byte length, signed line delta)
    pairs, each a range of bytecode; -128 is a range without a line (0 here)."""
    target = unit * 2
    line = firstlineno
    end = 0
    for i in range(0, len(linetable) - 1, 2):
        start = end
        end += linetable[i]
        delta = linetable[i + 1]
        has_line = delta != 128
        if has_line:
            line += delta - 256 if delta >= 128 else delta
        if start <= target < end:
            return line if has_line else 0
    return 0


LINE_DECODERS = {LINE_LNOTAB: line_of_lnotab, LINE_TABLE_310: line_of_linetable_310, LINE_LOCATIONS: line_of}


def split_word(word: int) -> tuple[int, int, bool]:
    """(code address, code unit, entry frame) of a frame word."""
    return word & PY_CODE_MASK, (word >> PY_UNIT_SHIFT) & PY_UNIT_MASK, bool(word >> PY_ENTRY_BIT & 1)


class PythonFrames:
    """Code objects of one capture's processes, read once each; frame words -> Locations."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self._proc_root = proc_root
        # pid -> code address -> what it names; pid -> frame word -> its Location (forget() drops a pid)
        self._codes: dict[int, dict[int, CodeInfo | None]] = {}
        self._locations: dict[int, dict[int, Location]] = {}
        self.unreadable = 0

    def forget(self, pid: int) -> None:
        """Drop what was read of `pid` (the process table evicted it: it exited, or its pid is reused)."""
        self._codes.pop(pid, None)
        self._locations.pop(pid, None)

    def __len__(self) -> int:
        """Code objects held, of every process."""
        return sum(len(c) for c in list(self._codes.values()))

    def code(self, pid: int, addr: int, layout: PyLayout) -> CodeInfo | None:
        codes = self._codes.setdefault(pid, {})
        if addr in codes:
            return codes[addr]
        info = None
        try:
            with ProcessMemory(pid, self._proc_root) as mem:
                info = self._read_code(mem, addr, layout)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            self.unreadable += 1
            log.debug("pid %d: code object 0x%x unreadable: %s", pid, addr, e)
        codes[addr] = info
        return info

    @staticmethod
    def _read_code(mem: ProcessMemory, addr: int, lay: PyLayout) -> CodeInfo:
        filename = _read_str(mem, mem.u64(addr + lay.code_filename), lay)
        qualname = _read_str(mem, mem.u64(addr + lay.code_qualname), lay)
        first = int.from_bytes(mem.read(addr + lay.code_firstlineno, 4), "little", signed=True)
        table = mem.u64(addr + lay.code_linetable)
        size = mem.i64(table + lay.bytes_size)
        if not 0 <= size <= MAX_LINETABLE_BYTES:
            raise ValueError(f"line table of {size} bytes")
        return CodeInfo(qualname, filename, first, mem.read(table + lay.bytes_sval, size))

    def read_codes(self, pid: int, words: Sequence[int], layout: PyLayout) -> None:
        """Read the code objects of a record's frames now (cached), while its process is alive."""
        codes = self._codes.get(pid)
        for w in words:
            if w == PY_SHIM:  # a 3.12+ shim frame: no code object
                continue
            addr = w & PY_CODE_MASK
            if codes is None or addr not in codes:
                self.code(pid, addr, layout)
                codes = self._codes.get(pid)

    def location(self, pid: int, word: int, layout: PyLayout) -> Location:
        """The Location of one frame word (a frame named by its address when the code is unreadable)."""
        addr, unit, _entry = split_word(word)
        key = word & ~(1 << PY_ENTRY_BIT)
        locations = self._locations.setdefault(pid, {})
        loc = locations.get(key)
        if loc is None:
            info = self.code(pid, addr, layout)
            if info is None:
                frame = Frame(function=f"<code 0x{addr:x}>", kind=FrameKind.CPYTHON)
            else:
                frame = Frame(function=info.qualname, kind=FrameKind.CPYTHON, file=info.filename,
                              line=LINE_DECODERS[layout.line_table](info.linetable, info.firstlineno, unit),
                              start_line=info.firstlineno,
                              system_name=info.qualname)
            loc = locations[key] = Location(address=addr, mapping=None, frames=(frame,))
        return loc

    def merge(self, pid: int, stack: tuple[Location, ...], words: Sequence[int],
              layout: PyLayout) -> tuple[Location, ...]:
        """`stack` (leaf first) with each _PyEval_EvalFrameDefault frame replaced by the Python frames it
        ran: the run of words up to and including the next entry frame, in order.

        When the counts disagree: more runs than interpreter frames means the native walk was cut (or
        stopped at a frame it could not name): the innermost runs take the interpreter frames there are
        and the others follow the walk's last frame, outermost last, so the sample still reaches the
        module's top level (all of them, when the walk was cut below the first interpreter frame).
        Fewer runs, the last one complete (its outermost word an entry frame), means an interpreter call was sampled between its entry and its first
        frame's push (or its last pop and its return): that is the innermost call, so the runs take the
        outermost interpreter frames and the innermost keeps its native name. A cut Python walk (the
        last run incomplete) takes the innermost ones."""
        groups: list[list[Location]] = [[]]
        for w in words:
            if w != PY_SHIM:  # a shim ends its call's run; it has no frame (3.12+)
                groups[-1].append(self.location(pid, w, layout))
            if split_word(w)[2]:
                groups.append([])
        if not groups[-1]:
            groups.pop()
        evals = [i for i, loc in enumerate(stack) if _is_eval(loc)]
        if not groups:
            return stack
        if not evals:  # the native walk was cut below every interpreter frame: all the runs follow it
            return stack + tuple(loc for run in groups for loc in run)
        if len(groups) < len(evals) and split_word(words[-1])[2]:
            evals = evals[len(evals) - len(groups):]
        runs = dict(zip(evals, groups, strict=False))
        out: list[Location] = []
        for i, loc in enumerate(stack):
            run = runs.get(i)
            if not run:  # not an interpreter frame, or one whose call has no frame (3.12+: a shim only)
                out.append(loc)
            else:
                out.extend(run)
        for run in groups[len(evals):]:  # a cut native walk: the outer Python frames after its last frame
            out.extend(run)
        return tuple(out)


def _is_eval(loc: Location) -> bool:
    return bool(loc.frames) and loc.frames[-1].system_name == EVAL_FRAME


def _read_str(mem: ProcessMemory, addr: int, lay: PyLayout) -> str:
    """A compact str object's text (cut at MAX_NAME_CHARS)."""
    length = mem.i64(addr + lay.unicode_length)
    state = int.from_bytes(mem.read(addr + lay.unicode_state, 4), "little")
    kind = (state >> 2) & 7
    compact = (state >> 5) & 1
    ascii_ = (state >> 6) & 1
    if not compact or kind not in (1, 2, 4) or length < 0:
        raise ValueError("not a compact str")
    n = min(length, MAX_NAME_CHARS)
    data = mem.read(addr + (lay.ascii_data if ascii_ else lay.compact_data), n * kind)
    codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
    return data.decode(codec, errors="replace")
