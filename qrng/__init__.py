"""PTG.3 random number generation (BSI AIS 20/31): raw source -> health tests ->
conditioning -> SP 800-90A DRBG -> output. Every key the network creates comes from here.

A node has exactly one generator: :func:`node_generator` opens it on first use from the
node's QRNG URL and hands the same object to every caller afterwards.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qrng.ptg3 import Ptg3Generator

_node: tuple[str, Ptg3Generator] | None = None
_node_lock = threading.Lock()


def node_generator(url: str, **options: Any) -> Ptg3Generator:
    """The node's one PTG.3 generator, opened from ``url`` the first time."""
    global _node
    import hal
    from qrng.errors import QrngUsageError
    from qrng.ptg3 import Ptg3Generator

    with _node_lock:
        if _node is None:
            _node = (url, Ptg3Generator(hal.open_entropy_source(url), **options))
        elif _node[0] != url:
            raise QrngUsageError(f"this node's generator already runs on {_node[0]!r}")
        return _node[1]
