"""KernelSymbols on hand-written tables and on this machine's /proc/kallsyms."""

from __future__ import annotations

import pytest

from symbolizer import kallsyms
from symbolizer.kallsyms import KernelSymbols

SAMPLE = """\
ffffffff81000000 T _text
ffffffff81000000 T _stext
ffffffff81000000 t __pi__text
ffffffff81001000 T do_one
ffffffff81001800 D some_data
ffffffff81002000 W weak_fn
ffffffff81002000 t local_alias
ffffffff81003000 t last_core
ffffffffc0a01000 t ext4_helper\t[ext4]
ffffffffc0a00000 T ext4_init\t[ext4]
"""


def test_lookup_picks_the_symbol_at_or_before():
    k = KernelSymbols.from_text(SAMPLE)
    assert k.usable
    assert k.lookup(0xFFFFFFFF81001234) == ("do_one", 0xFFFFFFFF81001000)
    # data symbols do not split functions
    assert k.lookup(0xFFFFFFFF81001900).name == "do_one"
    assert k.lookup(0xFFFFFFFF80000000) is None


def test_aliases_resolve_like_perf():
    k = KernelSymbols.from_text(SAMPLE)
    assert k.lookup(0xFFFFFFFF81000010).name == "_stext"  # global, fewest underscores, then longest
    assert k.lookup(0xFFFFFFFF81002010).name == "weak_fn"  # global weak beats local


def test_module_symbols_keep_module_and_sort():
    k = KernelSymbols.from_text(SAMPLE)
    assert k.lookup(0xFFFFFFFFC0A00010) == ("ext4_init [ext4]", 0xFFFFFFFFC0A00000)
    assert k.lookup(0xFFFFFFFFC0A01010).name == "ext4_helper [ext4]"


@pytest.mark.parametrize("chunk", [7, 40, 64, 1 << 20])
def test_pieces_of_any_size_parse_like_one(monkeypatch, chunk):
    """The text is read and split in pieces (bounded peak memory): lines cut across pieces, a piece
    holding core and module lines, or none whole, give the same table."""
    monkeypatch.setattr(kallsyms, "CHUNK_BYTES", chunk)
    k = KernelSymbols.from_text(SAMPLE)
    assert k.lookup(0xFFFFFFFF81001234) == ("do_one", 0xFFFFFFFF81001000)
    assert k.lookup(0xFFFFFFFF81000010).name == "_stext"
    assert k.lookup(0xFFFFFFFF81002010).name == "weak_fn"
    assert k.lookup(0xFFFFFFFFC0A00010) == ("ext4_init [ext4]", 0xFFFFFFFFC0A00000)
    assert k.lookup(0xFFFFFFFFC0A01010).name == "ext4_helper [ext4]"
    assert len(k) == len(KernelSymbols.from_text(SAMPLE.replace("\t", " ")))


def test_restricted_kallsyms_is_not_usable(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text("0000000000000000 T _text\n0000000000000000 T do_one\n")
    k = KernelSymbols(str(path))
    assert not k.usable
    assert k.lookup(0xFFFFFFFF81000000) is None


def test_real_kallsyms():
    k = KernelSymbols()
    if not k.usable:
        pytest.skip("kallsyms addresses are hidden (kptr_restrict, not root)")
    text = {}
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, typ, name = line.split()[:3]
            if typ in "tT" and "\t" not in line:
                text.setdefault(name, int(addr, 16))
    assert len(k) > 10000
    for name in ("schedule", "_raw_spin_lock", "do_idle"):
        if name not in text:
            continue
        hit = k.lookup(text[name] + 1)
        # An alias at the same address may be chosen; it must start where `name` does.
        assert hit is not None and hit.start == text[name]


def test_column_split_and_regex_fallback_agree():
    """The fast column split and the general regex path give the same table (also when unsorted, 32-bit)."""
    core = [line for line in SAMPLE.splitlines(keepends=True) if "\t" not in line]
    modules = [line for line in SAMPLE.splitlines(keepends=True) if "\t" in line]
    modules += ["ffffffffc0b00000 t z_last\t[zmod]\n", "ffffffffc0a00800 d mod_data\t[ext4]\n",
                "ffffffffc0a00000 t _ext4_alias\t[ext4]\n"]
    texts = {
        "sample": "".join(core + modules),
        "modules first": "".join(modules + core),  # not the column layout: regex path
        "32-bit": "".join(line[8:] for line in core + modules),
    }
    probes = [0xFFFFFFFF81000010, 0xFFFFFFFF81001900, 0xFFFFFFFF81002010, 0xFFFFFFFF81003005,
              0xFFFFFFFFC0A00010, 0xFFFFFFFFC0A00900, 0xFFFFFFFFC0A01010, 0xFFFFFFFFC0B00001]
    expected = None
    for what, text in texts.items():
        k = KernelSymbols.from_text(text)
        got = [k.lookup(a if what != "32-bit" else a & 0xFFFFFFFF) for a in probes]
        got = [(s.name, s.start & 0xFFFFFFFF) for s in got]
        if expected is None:
            expected = got
        assert got == expected, what
        assert len(k) == 7, what
    assert expected[4] == ("ext4_init [ext4]", 0xC0A00000)  # global beats local alias in a module too
    assert expected[5] == ("ext4_init [ext4]", 0xC0A00000)  # module data symbols do not split functions
