"""C BPF programs shipped as package data; only `agent` compiles them."""

from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent


def source_path(name: str) -> Path:
    """Path of a BPF source file shipped with bpfprof, e.g. ``cpu.bpf.c``."""
    return BPF_DIR / name
