"""`cached_property` with a lock per instance and attribute, not one per class.

Python 3.11's functools.cached_property computes under one lock per
descriptor, shared by every instance: while the unwind-table worker parsed a
large library's CFI (libLLVM: 180k FDEs, seconds), every other file's
`unwind_table`, on every thread, waited for it, and a capture's drain thread
stopped consuming the ring buffer. 3.12 dropped the lock (two threads may
then compute the same value twice, which for a whole-file parse is seconds
of waste). This one serialises only the computations of one attribute of one
object: the same file's table is built once, other files go on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")

_LOCKS = "_cached_property_locks"
_MISSING: Any = object()


class cached_property(Generic[T]):  # noqa: N801  (named like the functools one it replaces)
    """Computed on first access, stored in the instance's __dict__ (later reads skip the descriptor)."""

    def __init__(self, func: Callable[[Any], T]) -> None:
        self.func = func
        self.attrname = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.attrname = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> cached_property[T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> T | cached_property[T]:
        if instance is None:
            return self
        d = instance.__dict__
        name = self.attrname
        value = d.get(name, _MISSING)  # one lookup: FileSymbols.release() pops names from other threads
        if value is not _MISSING:
            return value
        # dict.setdefault is atomic under the GIL: two threads get the same lock.
        lock = d.setdefault(_LOCKS, {}).setdefault(name, threading.RLock())
        with lock:
            if name in d:  # computed by the thread we waited for
                return d[name]
            value = self.func(instance)
            d[name] = value
            return value


def computed(instance: object, name: str) -> bool:
    """Whether `instance.name` has been computed (reading it would not compute it now)."""
    return name in instance.__dict__


def locks(instance: object) -> list[Any]:  # threading.RLock objects (RLock is a factory, not a type)
    """The locks of `instance`'s attributes computed or being computed (release() takes them all
    without waiting, so it never drops state another thread is building)."""
    return list(instance.__dict__.get(_LOCKS, {}).values())
