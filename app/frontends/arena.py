"""Shared memory for decoded clips between one front end and the engine.

The engine creates one arena per front end (``os.memfd_create``: memory that belongs to no file
system, so a container's small ``/dev/shm`` does not bound it) and hands its descriptor to the
front end it starts. The front end writes each decoded clip into a block of it and sends the
block's offset; the engine maps the same memory and wraps the block as the clip's tensor without a
copy. A block is the front end's to reuse only once the engine has answered the request that
holds it, so the engine never reads memory that has been written over for another clip.
Untouched pages cost nothing: the arena's size is a bound, not an allocation.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading

import numpy as np

ALIGN = 64  # a block starts on a cache line


def create(size: int, name: str = "fusionserve-clips") -> int:
    """A new arena of ``size`` bytes; its file descriptor, inheritable by the front end it is made for."""
    fd = os.memfd_create(name, 0)  # no MFD_CLOEXEC: the front end inherits it
    os.ftruncate(fd, size)
    return fd


def mapping(fd: int) -> mmap.mmap:
    """The arena behind ``fd``, mapped shared and writable."""
    return mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def view(memory: mmap.mmap, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array of ``shape`` at ``offset``: the arena's memory itself, not a copy."""
    count = int(np.prod(shape))
    return np.frombuffer(memory, dtype=np.uint8, count=count, offset=offset).reshape(shape)


class Blocks:
    """First-fit allocation of blocks in an arena of ``size`` bytes, from any thread; free blocks merge
    with their neighbours."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts = [0]  # free blocks, by offset
        self._sizes = {0: size}
        self._taken: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return sum(self._taken.values())

    def take(self, nbytes: int) -> int | None:
        """The offset of a block of at least ``nbytes``; None when no free block is large enough."""
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        with self._lock:
            for i, start in enumerate(self._starts):
                size = self._sizes[start]
                if size < need:
                    continue
                del self._starts[i], self._sizes[start]
                if size > need:
                    bisect.insort(self._starts, start + need)
                    self._sizes[start + need] = size - need
                self._taken[start] = need
                return start
        return None

    def give_back_all(self, offsets: list[int]) -> None:
        for offset in offsets:
            self.give_back(offset)

    def give_back(self, offset: int) -> None:
        with self._lock:
            size = self._taken.pop(offset)
            i = bisect.bisect(self._starts, offset)
            if i < len(self._starts) and self._starts[i] == offset + size:  # the next block is free: merged
                size += self._sizes.pop(self._starts.pop(i))
            if i > 0 and self._starts[i - 1] + self._sizes[self._starts[i - 1]] == offset:  # so is the one before
                self._sizes[self._starts[i - 1]] += size
                return
            self._starts.insert(i, offset)
            self._sizes[offset] = size
