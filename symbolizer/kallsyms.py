"""Kernel symbols from /proc/kallsyms.

kallsyms has no sizes: a symbol covers up to the next symbol's start (what
perf does too). Only text symbols (t, T, w, W) are kept, so data symbols
between functions do not steal addresses. Module symbols keep their module as
in kallsyms, as "name [module]".

With kptr_restrict (or without CAP_SYSLOG) every address reads as zero; such
a table is loaded but reports `usable == False` and resolves nothing.

Loading does no per-line Python work: the text is split once into columns
(core kernel lines "addr type name", then module lines "addr type name
[module]"), addresses are decoded by one unhexlify, names are kept as one
bytes blob with end offsets and decoded on lookup; sorting touches only the
unsorted module tail. Text that is laid out otherwise goes through one regex.

Measured (122k-line /proc/kallsyms, Python 3.11, bench/symbolizer_speed.py):
load 140 ms before (a split per line), 92 ms now, of which ~40 ms is the
kernel producing the text (parsing alone 92 -> 50 ms); names held in ~3 MB
instead of ~9 MB of str objects. A lookup is a bisect, about 1.3 us.
"""

from __future__ import annotations

import binascii
import bisect
import gc
import io
import operator
import re
import sys
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import accumulate, compress, islice
from operator import itemgetter
from typing import BinaryIO, NamedTuple

DEFAULT_PATH = "/proc/kallsyms"
CHUNK_BYTES = 256 * 1024  # read and split at a time: bounds the parse's peak memory
_TEXT_TYPES = b"tTwW"
# Any kallsyms line: "ffffffff81000000 T _stext" or "ffffffffc0a01000 t fn\t[module]".
_LINE = re.compile(rb"^([0-9a-fA-F]+) (\S) ([^\n]+)", re.MULTILINE)
_NON_TEXT = re.compile(rb"[^tTwW]")


def _rank(typ: int, name: bytes) -> tuple[bool, bool, int, int]:
    return (typ in b"TW", typ in b"tT", len(name.lstrip(b"_")) - len(name), len(name))


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic GC while ~10^5 objects are made: it would rescan them, and they hold no cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Lines(NamedTuple):
    """Every line of a kallsyms text, in file order: address, type letter, name (in one blob)."""

    addrs: array  # 'Q'
    types: bytes  # one type letter per line
    names: bytes  # the display names ("fn" or "fn [module]"), concatenated
    name_ends: array  # 'Q': end of line i's name in `names`


def _hex_column(hexes: list[bytes]) -> array:
    """Hex strings as integers: through one unhexlify when they all have 16 (or 8) digits."""
    widths = set(map(len, hexes))
    if widths == {16} or widths == {8}:
        raw = binascii.unhexlify(b"".join(hexes))
        out = array("Q" if widths == {16} else "I")
        out.frombytes(raw)
        if sys.byteorder == "little":
            out.byteswap()  # the digits are big-endian
        return out if out.typecode == "Q" else array("Q", out)
    return array("Q", [int(h, 16) for h in hexes])


def _split_columns(data: bytes) -> _Lines | None:
    """kallsyms as whitespace-separated columns, at C speed; None if the text is not laid out so.

    Core kernel lines have three fields ("addr type name") and come first;
    module (and bpf, ftrace) lines have four ("addr type name [module]") and
    follow. Each part is split once and sliced by stride.
    """
    tab = data.find(b"\t")
    cut = len(data) if tab < 0 else data.rfind(b"\n", 0, tab) + 1
    core = data[:cut].split()
    if len(core) % 3:
        return None
    hexes = core[0::3]
    types = b"".join(core[1::3])
    names = core[2::3]
    if len(types) != len(names):
        return None
    if cut < len(data):
        rest = data[cut:].split()
        mods = rest[3::4]
        if len(rest) % 4 or set(map(itemgetter(0), mods)) != {ord("[")}:
            return None
        more_types = b"".join(rest[1::4])
        if len(more_types) != len(mods):
            return None
        hexes += rest[0::4]
        types += more_types
        names += map(b" ".join, zip(rest[2::4], mods, strict=True))
    try:
        addrs = _hex_column(hexes)
    except (ValueError, binascii.Error):
        return None
    return _Lines(addrs, types, b"".join(names), array("Q", accumulate(map(len, names))))


def _split_any(data: bytes) -> _Lines:
    """The lines of any kallsyms text (other widths, odd spacing), through one regex."""
    rows = _LINE.findall(data)
    if not rows:
        return _Lines(array("Q"), b"", b"", array("Q"))
    hexes, types, names = zip(*rows, strict=True)
    names = [n.replace(b"\t", b" ") for n in names]  # "fn\t[module]" -> "fn [module]"
    return _Lines(array("Q", [int(h, 16) for h in hexes]), b"".join(types), b"".join(names),
                  array("Q", accumulate(map(len, names))))


class KernelSymbol(NamedTuple):
    """A kernel function: display name ("func" or "func [module]") and start address."""

    name: str
    start: int


def _chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    """The file in pieces of about `size` bytes, each ending at a line end (the last one may not)."""
    carry = b""
    while True:
        block = f.read(size)
        if not block:
            if carry:
                yield carry
            return
        block = carry + block
        end = block.rfind(b"\n") + 1
        if end == 0:
            carry = block
            continue
        carry = block[end:]
        yield block[:end]


def _split_chunks(chunks: Iterable[bytes]) -> _Lines:
    """The lines of kallsyms text given in pieces that end at line ends, joined into one _Lines.

    Split piece by piece, the ~10^5 short bytes objects a split makes live
    for one piece at a time: splitting the whole text at once peaked at
    ~40 MB of RSS for a 5 MB kallsyms, more than the rest of a capture.
    """
    addrs = array("Q")
    types, names = [], []
    name_ends = array("Q")
    for chunk in chunks:
        part = _split_columns(chunk) or _split_any(chunk)
        base = name_ends[-1] if name_ends else 0
        addrs.extend(part.addrs)
        types.append(part.types)
        names.append(part.names)
        name_ends.extend(e + base for e in part.name_ends)
    return _Lines(addrs, b"".join(types), b"".join(names), name_ends)


class KernelSymbols:
    """A sorted snapshot of the kernel's text symbols; reload to see modules loaded later."""

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        with open(path, "rb", buffering=0) as f:  # bytes: faster to split than text, names are ASCII
            self._load(_chunks(f, CHUNK_BYTES))

    @classmethod
    def from_text(cls, text: str) -> KernelSymbols:
        """A table from kallsyms-formatted text (for tests and recorded snapshots)."""
        self = cls.__new__(cls)
        self._load(_chunks(io.BytesIO(text.encode()), CHUNK_BYTES))
        return self

    def _load(self, chunks: Iterable[bytes]) -> None:
        with _no_gc():
            lines = _split_chunks(chunks)
        addrs, types = lines.addrs, lines.types
        self._names, self._name_ends = lines.names, lines.name_ends
        # order[i]: the line of the i-th symbol by address (None: line i itself). Arrays, not lists: a
        # list of 10^5 ints is ~4 MB of objects at the load's peak.
        order: array | None = None
        by_addr = addrs
        if _NON_TEXT.search(types):  # data symbols would split functions: drop them
            order = array("I", compress(range(len(addrs)), map(_TEXT_TYPES.__contains__, types)))
            by_addr = array("Q", map(addrs.__getitem__, order))
        first_descent = next(compress(range(len(by_addr)), map(operator.gt, by_addr, islice(by_addr, 1, None))),
                             None)
        if first_descent is not None:  # module symbols follow the core kernel's, unsorted
            if order is None:
                order = array("I", range(len(addrs)))
            head = first_descent + 1
            tail = sorted(order[head:], key=addrs.__getitem__)  # stable: file order among equals
            if addrs[tail[0]] >= by_addr[first_descent]:  # all above the sorted head: append
                order[head:] = array("I", tail)
                del by_addr[head:]
                by_addr.extend(map(addrs.__getitem__, tail))
            else:
                order = array("I", sorted(order, key=addrs.__getitem__))
                by_addr = array("Q", map(addrs.__getitem__, order))
        self._starts = by_addr
        self._types = types
        self._order = order

        self._best: dict[int, int] = {}  # last index of a group of equal addresses -> the index named
        self._count: int | None = None
        self.usable: bool = any(by_addr)
        """False when all addresses are zero (kptr_restrict): nothing can be resolved."""

    def _pick(self, i: int) -> int:
        """Several names often share an address (_text, _stext, ...) and bisect lands
        on the last of them: the one perf would name -- global over local, non-weak
        over weak, fewer leading underscores, longer name. Worked out on first use."""
        best = self._best.get(i)
        if best is None:
            starts, types = self._starts, self._types
            first = i
            while first and starts[first - 1] == starts[i]:
                first -= 1
            best = first
            for j in range(first + 1, i + 1):
                line, best_line = self._line(j), self._line(best)
                if _rank(types[line], self._name(line)) > _rank(types[best_line], self._name(best_line)):
                    best = j
            self._best[i] = best
        return best

    def _line(self, i: int) -> int:
        return self._order[i] if self._order is not None else i

    def _name(self, line: int) -> bytes:
        return self._names[self._name_ends[line - 1] if line else 0:self._name_ends[line]]

    def __len__(self) -> int:
        """Distinct symbol addresses."""
        if self._count is None:
            s = self._starts
            self._count = len(s) - sum(map(operator.eq, s[1:], s))
        return self._count

    def lookup(self, addr: int) -> KernelSymbol | None:
        """The text symbol at or before `addr`, or None (also when not `usable`)."""
        if not self.usable:
            return None
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        if i and self._starts[i - 1] == self._starts[i]:
            i = self._pick(i)
        return KernelSymbol(self._name(self._line(i)).decode("utf-8", "replace"), self._starts[i])
