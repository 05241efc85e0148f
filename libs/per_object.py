"""Values derived from a config, kept for as long as the config cache hands out that same object.

A config is parsed once and then handed out unchanged until a save replaces it with a new object,
so what a call derives from it (compiled paths and a decryption key, an OAuth config's fingerprint)
holds for as long as that very object is in use: working it out again on every call cost the
resolver 5-10 µs a call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
V = TypeVar("V")

KEPT = 256  # configs in use at once; past that, everything is worked out afresh


class PerObject(Generic[T, V]):
    """`derive(obj)`, remembered by the object's identity. The object is held with its value, so its
    `id` cannot pass to another object while remembered. Only for objects nobody changes once
    handed out, as the config stores' are."""

    def __init__(self, derive: Callable[[T], V], kept: int = KEPT) -> None:
        self._derive = derive
        self._kept = kept
        self._values: dict[int, tuple[T, V]] = {}

    def __call__(self, obj: T) -> V:
        entry = self._values.get(id(obj))
        if entry is not None and entry[0] is obj:
            return entry[1]
        value = self._derive(obj)
        if len(self._values) >= self._kept:
            self._values.clear()
        self._values[id(obj)] = (obj, value)
        return value
