"""Demangle C++ (Itanium) and Rust (legacy and v0) symbol names for display.

Frames keep the raw name as `system_name`; this only makes `function`
readable. Rust is recognised before C++ because legacy Rust names are valid
Itanium names (`_ZN...17h<hash>E`) that C++ demangling would render with the
hash as a path component.
"""

from __future__ import annotations

import functools
import re

# Legacy Rust: the last path component is "h" + 16 hex digits (17 chars),
# optionally followed by an LLVM suffix such as ".llvm.1234".
_RUST_LEGACY = re.compile(r"^_ZN.*17h[0-9a-f]{16}E(?:\.|$)")
_RUST_HASH_SUFFIX = re.compile(r"::h[0-9a-f]{16}$")
# rust_demangler prints "{closure:#0}"; rustc-demangle (and c++filt) print "{closure#0}".
_RUST_SHIM = re.compile(r"\{([A-Za-z_]*):#")

# Enough for the hot set of a host's native frames; names are short strings.
DEMANGLE_CACHE_ENTRIES = 65536


@functools.lru_cache(maxsize=DEMANGLE_CACHE_ENTRIES)
def demangle(name: str) -> str:
    """The display form of `name`; `name` itself if it is not mangled or does not demangle.

    Never raises: a name a demangler rejects is shown raw.
    """
    if not name.startswith(("_Z", "_R")):
        return name
    # Imported at the first mangled name: cxxfilt loads libstdc++ through ctypes (~10 ms of every start).
    import cxxfilt  # noqa: PLC0415
    import rust_demangler  # noqa: PLC0415

    try:
        if name.startswith("_R"):
            return _RUST_SHIM.sub(r"{\1#", rust_demangler.demangle(name))
        if _RUST_LEGACY.match(name):
            return _RUST_HASH_SUFFIX.sub("", rust_demangler.demangle(name))
        if name.startswith("_Z"):
            return cxxfilt.demangle(name)
    except Exception:  # noqa: BLE001 -- both libraries raise assorted types on bad input
        return name
    return name
