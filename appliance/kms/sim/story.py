"""One-line descriptions of what happens in a simulated schedule, for its story.

``bench/simulate.py --seed N --schedules 1 --verbose`` prints a schedule step by step:
each input an engine takes and the actions it answers with, store commits, faults. What
this module prints of them: types, request and ticket numbers, counts, key IDs' number,
error codes. It never prints bytes: no key bits, CN keys, channel keys or sealed
messages (simulated keys are not secret, but a habit that leaks them here would leak real
ones elsewhere).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from appliance.kms.engines.config import Policy
from appliance.kms.errors import KmsError
from appliance.kms.events import Action, Input, SaeKeys, StoreDone

_NUMBERS = ("req", "call", "ticket", "caller", "count", "number", "size", "ok")
_NAMES = ("link", "peer", "master", "slave", "session", "kind", "src", "dst", "code", "event")
_LISTS = ("keys", "ids", "key_ids", "gone")


def policy(p: Policy) -> str:
    return f"mode {p.mode.name}, stock {p.stock}, patience {p.patience:g} s"


def event(item: Input | Action) -> str:
    """``Type(field=value, ...)`` with only the fields that hold no key material."""
    parts: list[str] = []
    for name in item.__struct_fields__:
        value = getattr(item, name)
        if name in _NUMBERS or name in _NAMES:
            parts.append(f"{name}={value}")
        elif name in _LISTS:
            parts.append(f"{name}={len(value)}")
        elif name in ("message", "op"):
            parts.append(f"{name}={type(value).__name__}")
        elif name == "to":
            parts.append(f"to={value[0]}/{value[1]}")
        elif name == "error" and value is not None:
            parts.append(f"error={value.code}")
        elif name == "verdict":
            parts.append("verdict=denied" if value.denied is not None else "verdict=allowed")
        elif name == "path" and value:
            parts.append(f"path={'-'.join(map(str, value))}")
        elif name == "key" and isinstance(value, Hashable) and not isinstance(value, bytes):
            parts.append(f"timer={timer(value)}")
        elif name == "at":
            parts.append(f"at={value:.4f}")
    if isinstance(item, StoreDone):
        parts.append(f"result={result(item.result)}")
    if isinstance(item, SaeKeys):
        parts.append(f"key IDs {', '.join(k[:8] for k, _ in item.keys)}")
    return f"{type(item).__name__}({', '.join(parts)})"


def actions(items: Sequence[Action]) -> str:
    return "" if not items else " -> " + "; ".join(event(a) for a in items)


def timer(key: Any) -> str:
    """A timer's key: its names and numbers (request IDs as a short hex prefix)."""
    if isinstance(key, tuple):
        return "/".join(timer(k) for k in key)
    if isinstance(key, bytes | bytearray):
        return bytes(key[:4]).hex()
    return str(key)


def op(item: Any) -> str:
    """A store operation: its type, session and how many keys."""
    name = type(item).__name__
    session = getattr(item, "session", None)
    count = len(getattr(item, "keys", None) or getattr(item, "key_ids", None) or ())
    n = getattr(item, "n", None)
    detail = f" {session}" if session else ""
    detail += f" x{count}" if count else (f" n={n}" if n is not None else "")
    return name + detail


def result(value: Any) -> str:
    if isinstance(value, KmsError):
        return f"refused {value.code}"
    if isinstance(value, list):
        return f"{len(value)} keys ({', '.join(k.key_id[:8] for k in value)})"
    if isinstance(value, dict):
        return f"levels of {len(value)} sessions"
    return str(value)
