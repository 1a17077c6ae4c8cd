"""Bounded reads of untrusted input: files users name on the command line, gzip from anyone.

The one home of both. read_bounded refuses what a read could block on or
that holds no bytes (a FIFO or socket, which would wait for a writer forever;
a directory) and stops at a size (/dev/zero never ends; /dev/null, an empty
config, stays fine). gunzip_limited inflates profiles sent to serve and files given to
convert: a gzip bomb is a few hundred KiB that inflate to gigabytes, and
zlib's max_length stops it after `limit` bytes instead of after all of them.
"""

from __future__ import annotations

import os
import stat
import zlib

from symbolizer.errors import ExportError, InputTooLarge


def read_bounded(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of a file of at most `max_bytes`, read without ever blocking.

    Raises OSError when it cannot be opened or read (a terminal: EAGAIN),
    ExportError for a FIFO, socket or directory and InputTooLarge past
    `max_bytes` (callers add which file and turn them into their own error
    type).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO opens without a writer
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISDIR(mode):
            raise ExportError("not a regular file (a FIFO, socket or directory)")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(max_bytes + 1 - size, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise InputTooLarge(f"larger than {max_bytes} bytes")
    return b"".join(chunks)


def gunzip_limited(data: bytes, limit: int, what: str = "body") -> bytes:
    """Decompress gzip `data` without ever holding more than `limit` + 1 bytes of output.

    Raises InputTooLarge over the limit, ExportError on bytes that are not
    (or are truncated) gzip. `what` names the input in the messages.
    """
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise ExportError(f"{what} is not valid gzip: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise InputTooLarge(f"decompressed {what} is over the {limit}-byte limit")
    if not d.eof:
        raise ExportError(f"{what} is truncated gzip")
    return out
