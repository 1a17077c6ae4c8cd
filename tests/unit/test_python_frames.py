"""Python frame words: the record trailer, and their place in place of the interpreter's native frames."""

from __future__ import annotations

import struct

from agent.bpfload.records import (
    HEADER_SIZE,
    PY_ENTRY_BIT,
    PY_SHIM,
    PY_UNIT_SHIFT,
    CtxKind,
    RawRecord,
    RecordKind,
    parse_record,
)
from agent.probes.python_stacks import PythonStacks
from agent.python.frames import EVAL_FRAME, PythonFrames, split_word
from agent.python.layouts import LAYOUTS
from exporters.profile import Location
from symbolizer.frames import Frame, FrameKind

LAYOUT = LAYOUTS[(3, 11)]


def word(code: int, unit: int, entry: bool) -> int:
    return code | (unit << PY_UNIT_SHIFT) | (int(entry) << PY_ENTRY_BIT)


def test_python_trailer_parses_after_the_addresses():
    words = [word(0x7F0000001000, 5, False), word(0x7F0000002000, 0x3FFF, True)]
    head = struct.pack("<IIIIQQQHHhh16s", 1, 10, 11, 0, 1, 1, 0, 0, 2, 0, 0, b"python3")
    trailer = struct.pack("<II", CtxKind.PYTHON, 8 + 8 * len(words)) + struct.pack("<2Q", *words)
    rec = parse_record(head + struct.pack("<2Q", 0x401000, 0x402000) + trailer)
    assert len(head) == HEADER_SIZE
    assert rec.user_ips == (0x401000, 0x402000)
    assert rec.py_frames == tuple(words)
    assert split_word(words[1]) == (0x7F0000002000, 0x3FFF, True)


def native(name: str, address: int) -> Location:
    return Location(address=address, mapping=None,
                    frames=(Frame(function=name, kind=FrameKind.NATIVE, system_name=name),))


class Named(PythonFrames):
    """Code objects named by address, without a process to read them from."""

    def location(self, pid, w, layout):
        addr, unit, _ = split_word(w)
        return Location(address=addr, mapping=None,
                        frames=(Frame(function=f"py{addr:x}", kind=FrameKind.CPYTHON, line=unit),))


def names(stack) -> list[str]:
    return [loc.frames[0].function for loc in stack]


def test_each_eval_frame_is_replaced_by_the_frames_it_ran():
    # leaf first: a C function called from Python, called from Python again through a C call
    stack = (native("deflate", 1), native(EVAL_FRAME, 2), native("cfunction_call", 3), native(EVAL_FRAME, 4),
             native("main", 5))
    words = [word(0xA, 1, False), word(0xB, 2, True), word(0xC, 3, False), word(0xD, 4, True)]
    merged = Named().merge(1, stack, words, LAYOUT)
    assert names(merged) == ["deflate", "pya", "pyb", "cfunction_call", "pyc", "pyd", "main"]


def test_an_interpreter_call_without_frames_yet_keeps_the_innermost_native():
    # sampled between a _PyEval_EvalFrameDefault's entry and its first frame's push: the innermost one
    stack = (native(EVAL_FRAME, 2), native("call", 3), native(EVAL_FRAME, 4), native("main", 5))
    words = [word(0xA, 1, False), word(0xB, 1, True)]  # one complete run for two interpreter frames
    assert names(Named().merge(1, stack, words, LAYOUT)) == [EVAL_FRAME, "call", "pya", "pyb", "main"]
    # no interpreter frame at all: the native walk was cut (at its leaf, say) below them all
    assert names(Named().merge(1, (native("leaf", 5),), words, LAYOUT)) == ["leaf", "pya", "pyb"]


def test_a_cut_python_walk_fills_the_innermost():
    stack = (native(EVAL_FRAME, 2), native("call", 3), native(EVAL_FRAME, 4), native("main", 5))
    words = [word(0xA, 1, False)]  # its run never reached an entry frame: the BPF walk stopped
    assert names(Named().merge(1, stack, words, LAYOUT)) == ["pya", "call", EVAL_FRAME, "main"]


def test_more_runs_than_eval_frames_places_the_innermost_and_keeps_the_outer_after_the_cut():
    # the native walk stopped at x (cut, or a static function it could not name) below the outer
    # interpreter frames: their Python frames, read in BPF apart from it, still reach the top level
    stack = (native(EVAL_FRAME, 2), native("x", 3))
    words = [word(0xA, 1, True), word(0xB, 1, False), word(0xC, 1, True)]
    assert names(Named().merge(1, stack, words, LAYOUT)) == ["pya", "x", "pyb", "pyc"]


def test_unreadable_code_object_is_a_named_unknown_frame():
    frames = PythonFrames(proc_root="/nonexistent")
    loc = frames.location(1, word(0x1234, 0, False), LAYOUT)
    assert loc.frames[0].function == "<code 0x1234>" and loc.frames[0].kind is FrameKind.CPYTHON
    assert frames.unreadable == 1


def test_shim_words_end_runs_and_an_empty_run_keeps_its_native_frame():
    # 3.12+: [leaf shim: the innermost call popped its last frame], a, b, shim, c, shim
    stack = (native(EVAL_FRAME, 1), native("call", 2), native(EVAL_FRAME, 3), native("c_call", 4),
             native(EVAL_FRAME, 5), native("main", 6))
    words = [PY_SHIM, word(0xA, 1, False), word(0xB, 2, False), PY_SHIM, word(0xC, 3, False), PY_SHIM]
    frames = Named()
    assert names(frames.merge(1, stack, words, LAYOUT)) == [EVAL_FRAME, "call", "pya", "pyb", "c_call", "pyc",
                                                           "main"]
    frames.read_codes(1, [PY_SHIM], LAYOUT)  # no code object behind a shim
    assert frames.unreadable == 0


def test_samples_taken_before_the_interpreter_was_registered_are_counted():
    # a process is registered at its first record: its samples from before have no Python frame to read
    stacks = PythonStacks(lambda pid, value: None)
    stacks.registry.reading_since[7] = 1_000
    early = RawRecord(RecordKind.CPU, 7, 7, 0, 0, 1, 0, "app", (), (0x401000,))
    framed = RawRecord(RecordKind.CPU, 7, 7, 0, 0, 1, 0, "app", (), (0x401000,), py_frames=(word(0xA, 1, True),))
    other = RawRecord(RecordKind.CPU, 8, 8, 0, 0, 1, 0, "c", (), (0x401000,))  # not a Python process
    entries = [(early, [900, 999, 1_000, 5_000], [1] * 4), (framed, [800], [1]), (other, [10], [1])]
    assert stacks.comments(entries) == ["Python frames: 2 samples taken before their process's interpreter was "
                                        "registered (at its first record) have native frames only"]
    stacks.forget(7)
    assert stacks.comments(entries) == []
