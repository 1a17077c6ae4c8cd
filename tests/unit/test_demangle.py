"""demangle() on hand-written C++ and Rust names with known display forms."""

from __future__ import annotations

import pytest

from symbolizer.demangle import demangle


@pytest.mark.parametrize("mangled, shown", [
    # C++ (Itanium)
    ("_ZN3foo3barEv", "foo::bar()"),
    ("_ZN5outer5inner7sum_allIlEET_RKSt6vectorIS2_SaIS2_EE",
     "long outer::inner::sum_all<long>(std::vector<long, std::allocator<long> > const&)"),
    ("_ZN5outer5inner11AccumulatorIlE3addEl", "outer::inner::Accumulator<long>::add(long)"),
    ("_Z3foov.cold", "foo() [clone .cold]"),
    # Rust legacy: the 17h<hash>E suffix is dropped for display, $-escapes decoded
    ("_ZN4core3fmt5write17h0123456789abcdefE", "core::fmt::write"),
    ("_ZN4core3fmt5write17h0123456789abcdefE.llvm.8765", "core::fmt::write"),
    ("_ZN66_$LT$alloc..vec..Vec$LT$T$GT$$u20$as$u20$core..ops..drop..Drop$GT$4drop17h5b6b2d0a0e5d5bd2E",
     "<alloc::vec::Vec<T> as core::ops::drop::Drop>::drop"),
    # Rust v0: crate disambiguators dropped, closures as rustc-demangle prints them
    ("_RNvCs1234_7mycrate3foo", "mycrate::foo"),
    ("_RNvMsr_NtCs3ssYzQotkvD_3std4pathNtB5_7PathBuf3newCs15kBYyAo9fc_7mycrate", "<std::path::PathBuf>::new"),
    ("_RNCNvCs1234_7mycrate3foo0B3_", "mycrate::foo::{closure#0}"),
])
def test_known_names(mangled, shown):
    assert demangle(mangled) == shown


@pytest.mark.parametrize("name", ["main", "malloc", "__vdso_clock_gettime", "_Zbad", "_R", "_ZN3foo", "", "runtime.main"])
def test_unmangled_or_invalid_names_come_back_unchanged(name):
    assert demangle(name) == name


def test_cached():
    demangle.cache_clear()
    demangle("_ZN3foo3barEv")
    demangle("_ZN3foo3barEv")
    assert demangle.cache_info().hits == 1
