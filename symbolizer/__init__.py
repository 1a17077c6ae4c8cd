"""Address -> frames: ELF, Go pclntab, DWARF lines, kernel symbols, caches.

Plain Python: nothing here imports bcc or `agent`, so it runs without root.
"""
