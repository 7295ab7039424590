"""Read-only memory maps of a region of a file: bundle payloads and slot read-back read
through them without copying hundreds of megabytes."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager, suppress


@contextmanager
def map_region(fd: int, offset: int, size: int) -> Iterator[memoryview]:
    """A read-only view of ``size`` bytes at ``offset`` of the open file ``fd`` (any offset:
    the map itself starts at the allocation boundary below it)."""
    lead = offset % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(fd, lead + size, access=mmap.ACCESS_READ, offset=offset - lead)
    view = memoryview(m)
    part = view[lead : lead + size]
    try:
        yield part
    finally:
        part.release()
        view.release()
        with suppress(BufferError):  # a traceback may still hold a slice; GC closes it
            m.close()
