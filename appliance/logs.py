"""Structured logging for every qkdn process, and the guard that keeps keys out of it.

Records carry their fields as ``extra=`` keyword data; ``--log-format json`` prints one JSON
object per line (timestamp, level, logger, message, fields), ``text`` a readable line.

Key material must never reach a log. Code logs key IDs, never keys, and :class:`QkdKey`
prints as its ID. As a second line of defence :class:`RedactKeyMaterial` replaces any
``bytes``/``bytearray``/``memoryview``/``QkdKey`` found in a record's arguments or fields
with a placeholder before any handler formats it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _redact(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<redacted {len(value)} bytes>"
    qkdm = sys.modules.get("hal.qkdm")  # no QKD key exists before hal is imported
    if qkdm is not None and isinstance(value, qkdm.QkdKey):
        return f"<key {value.key_id}>"
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    return value


class RedactKeyMaterial(logging.Filter):
    """Replace anything that may hold key bytes in a record's args and extra fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = _redact(record.args)
        for name in set(record.__dict__) - _STANDARD:
            record.__dict__[name] = _redact(record.__dict__[name])
        return True


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record was logged with."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in fields_of(record).items())
        line = f"{stamp} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        return f"{line} {extra}".rstrip()


def configure(level: str = "warning", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Install the qkdn handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_qkdn", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactKeyMaterial())
    handler._qkdn = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


def install_redaction() -> None:
    """Put the redaction filter on every logger record at creation, whatever the handler."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_qkdn_redacting", False):
        return
    guard = RedactKeyMaterial()

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        guard.filter(record)
        return record

    make._qkdn_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)
