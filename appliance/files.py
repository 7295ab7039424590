"""Bounded reads of the files an operator hands to ``qkdn`` (topologies, configurations,
keys, keyrings, state files, audit logs, PIN files, sample files).

:func:`read_bounded` never reads more than its caller's limit plus one byte (so
``/dev/zero`` or a runaway file fails at once instead of filling memory), and never blocks
when it opens a FIFO that nobody writes to. Every problem is an :class:`OSError` carrying
``strerror`` and ``filename``, so that each caller keeps reporting it with its own error
code. This module must never trust a size the file itself declares.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

KiB, MiB = 1 << 10, 1 << 20


def describe_size(n: int) -> str:
    """``4 MiB``, ``64 KiB`` or ``100 bytes``: how a limit is shown in messages."""
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def read_bounded(path: Path, limit: int) -> bytes:
    """The whole content of ``path`` if it is at most ``limit`` bytes long.

    Raises OSError: the file's own errors (missing, a directory, unreadable), EINVAL for
    a name the OS cannot take (a NUL byte), EFBIG when there is more than ``limit`` bytes.
    """
    try:
        # O_NONBLOCK: opening a FIFO without a writer returns at once (reads then see EOF).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError:
        raise OSError(errno.EINVAL, "not a valid file name", str(path)) from None
    try:
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            block = os.read(fd, min(left, MiB))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise
    finally:
        os.close(fd)
    if left <= 0:
        raise OSError(errno.EFBIG, f"larger than {describe_size(limit)}", str(path))
    return b"".join(chunks)
