"""LEB128 / Go uvarint decoding, shared by the DWARF, CFI and Go build-info parsers.

Hot in the DWARF and CFI decoders: the one-byte case returns first, and the
bounds check is an except clause, which costs nothing until it fires.
"""

from __future__ import annotations

from typing import Any

from symbolizer.errors import ElfParseError


def uleb128(buf: Any, pos: int) -> tuple[int, int]:
    """(value, position after it). ElfParseError past the buffer's end or beyond 64 bits."""
    try:
        b = buf[pos]
        if b < 0x80:
            return b, pos + 1
        result = b & 0x7F
        shift = 7
        pos += 1
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, pos
            shift += 7
            if shift > 63:
                raise ElfParseError("LEB128 longer than 64 bits")
    except IndexError:
        raise ElfParseError("LEB128 runs past the end of its data") from None


def sleb128(buf: Any, pos: int) -> tuple[int, int]:
    """Signed LEB128: (value, position after it). Same errors as uleb128."""
    try:
        result = shift = 0
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                if b & 0x40:
                    result -= 1 << shift
                return result, pos
            if shift > 63:
                raise ElfParseError("LEB128 longer than 64 bits")
    except IndexError:
        raise ElfParseError("LEB128 runs past the end of its data") from None
