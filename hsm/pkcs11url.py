"""RFC 7512 PKCS#11 URIs: which module, token and object a node's keystore uses, and its PIN.

Format (RFC 7512 sec. 2.3): ``pkcs11:`` then path attributes separated by ``;``, then
optionally ``?`` and query attributes separated by ``&``; every value is percent-encoded
UTF-8 (``id`` is percent-encoded bytes). For example::

    pkcs11:token=node-5;object=qkdn-kek?module-path=/usr/lib/softhsm/libsofthsm2.so
        &pin-source=file:/etc/qkdn/token.pin

Path attributes understood: the token's ``token`` (label), ``manufacturer``, ``model``,
``serial``; the slot's ``slot-id``, ``slot-description``, ``slot-manufacturer``; the
module's ``library-manufacturer``, ``library-description``, ``library-version``; the
object's ``object`` (label), ``id`` and ``type`` (only ``secret-key`` makes sense here).
Query attributes: ``module-path`` (absolute), ``module-name`` (looked up in the usual
module directories), ``pin-source`` (``file:/ABS/PATH`` or an absolute path) and
``pin-value``. An attribute given twice, an unknown or vendor attribute, or a bad
percent-escape is refused rather than ignored: a typo must not silently widen a match or
drop the PIN.

This module parses and never touches a token. It must never put a PIN in an error
message or a ``repr``: :meth:`Pkcs11Url.redacted` is the form to show.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes

from appliance.files import read_bounded
from hsm.errors import HsmError

SCHEME = "pkcs11:"
DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
MODULE_DIRS = ("/usr/lib/x86_64-linux-gnu/pkcs11", "/usr/lib/softhsm", "/usr/lib/pkcs11")
PATH_ATTRS = frozenset(
    {
        "token",
        "manufacturer",
        "model",
        "serial",
        "slot-id",
        "slot-description",
        "slot-manufacturer",
        "library-manufacturer",
        "library-description",
        "library-version",
        "object",
        "id",
        "type",
    }
)
QUERY_ATTRS = frozenset({"module-path", "module-name", "pin-source", "pin-value"})
OBJECT_TYPES = frozenset({"public", "private", "cert", "secret-key", "data"})
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PIN_VALUE = re.compile(r"([?&;:]pin-value=)[^&]*")
MAX_PIN_FILE = 1024
PIN_SOURCE = "HSM-P11-PIN-SOURCE"


class Pkcs11UrlError(HsmError):
    """A PKCS#11 URI is malformed (``HSM-P11-URL``), or its PIN file cannot be used
    (``HSM-P11-PIN-SOURCE``): caller misuse either way."""

    code = "HSM-P11-URL"


@dataclass(frozen=True, slots=True)
class Pkcs11Url:
    """A parsed PKCS#11 URI: decoded path and query attributes (``id`` kept as bytes)."""

    text: str = field(repr=False)
    """The URI as given (may hold a pin-value: show :meth:`redacted` instead)."""
    path: dict[str, str]
    """Percent-decoded path attributes, ``id`` excluded."""
    object_id: bytes | None
    """The ``id`` path attribute, decoded to bytes."""
    query: dict[str, str] = field(repr=False)
    """Percent-decoded query attributes (pin-value among them: never shown)."""

    @property
    def token(self) -> str | None:
        return self.path.get("token")

    @property
    def object(self) -> str | None:
        return self.path.get("object")

    def redacted(self) -> str:
        """The URI with any pin-value replaced, for messages and logs."""
        return _PIN_VALUE.sub(r"\1***", self.text)

    def module(self) -> str:
        """The module to load: module-path, else module-name looked up, else SoftHSM2."""
        if "module-path" in self.query:
            return self.query["module-path"]
        if "module-name" in self.query:
            return find_module(self.query["module-name"])
        return DEFAULT_MODULE

    def pin(self) -> str | None:
        """The user PIN from pin-value or pin-source, or None if the URI gives neither."""
        if "pin-value" in self.query:
            return self.query["pin-value"]
        if "pin-source" in self.query:
            return read_pin_file(pin_source_path(self.query["pin-source"]))
        return None


def parse(text: str) -> Pkcs11Url:
    """Parse a PKCS#11 URI (see the module docstring); Pkcs11UrlError if malformed."""
    if not text.startswith(SCHEME):
        raise Pkcs11UrlError(f"not a PKCS#11 URI (expected '{SCHEME}...'): {_shown(text)}")
    body = text[len(SCHEME) :]
    path_part, _, query_part = body.partition("?")
    path = _attributes(path_part, ";", PATH_ATTRS, "path", text)
    query = _attributes(query_part, "&", QUERY_ATTRS, "query", text)
    raw_id = path.pop("id", None)
    url = Pkcs11Url(
        text=text,
        path={k: _decode(v, k, text) for k, v in path.items()},
        object_id=None if raw_id is None else unquote_to_bytes(raw_id),
        query={k: _decode(v, k, text) for k, v in query.items()},
    )
    _check_values(url)
    return url


def _attributes(
    part: str, sep: str, known: frozenset[str], where: str, text: str
) -> dict[str, str]:
    """Split one component into raw (still percent-encoded) attributes, each at most once."""
    found: dict[str, str] = {}
    for item in part.split(sep) if part else []:
        name, eq, value = item.partition("=")
        if not eq or not _NAME.fullmatch(name):
            raise Pkcs11UrlError(
                f"malformed {where} attribute {name[:40]!r} (expected NAME=VALUE) in {_shown(text)}"
            )
        if name not in known:
            raise Pkcs11UrlError(f"unsupported {where} attribute {name!r} in {_shown(text)}")
        if name in found:
            raise Pkcs11UrlError(f"{where} attribute {name!r} given twice in {_shown(text)}")
        found[name] = value
    return found


def _decode(value: str, name: str, text: str) -> str:
    if _BAD_ESCAPE.search(value):
        raise Pkcs11UrlError(f"bad percent-escape in attribute {name!r} of {_shown(text)}")
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise Pkcs11UrlError(f"attribute {name!r} is not UTF-8 in {_shown(text)}") from None


def _check_values(url: Pkcs11Url) -> None:
    shown = url.redacted()
    if url.path.get("type", "secret-key") not in OBJECT_TYPES:
        raise Pkcs11UrlError(f"type must be one of {sorted(OBJECT_TYPES)} in {shown}")
    if "slot-id" in url.path and not url.path["slot-id"].isdigit():
        raise Pkcs11UrlError(f"slot-id must be a decimal number in {shown}")
    if "pin-value" in url.query and "pin-source" in url.query:
        raise Pkcs11UrlError(f"give pin-source or pin-value, not both, in {shown}")
    if "module-path" in url.query and "module-name" in url.query:
        raise Pkcs11UrlError(f"give module-path or module-name, not both, in {shown}")
    if "module-path" in url.query and not os.path.isabs(url.query["module-path"]):
        raise Pkcs11UrlError(f"module-path must be absolute in {shown}")


def _shown(text: str) -> str:
    """A URI for an error message, before it parsed: pin-value masked, length capped."""
    masked = _PIN_VALUE.sub(r"\1***", text)
    return masked if len(masked) <= 200 else masked[:200] + "..."


def find_module(name: str) -> str:
    """The path of the module called ``name`` (RFC 7512: no directory, no suffix)."""
    if "/" in name or not name:
        raise Pkcs11UrlError(f"module-name {name!r} must be a bare name (use module-path)")
    for folder in MODULE_DIRS:
        for candidate in (f"{name}.so", f"lib{name}.so"):
            path = os.path.join(folder, candidate)
            if os.path.exists(path):
                return path
    raise Pkcs11UrlError(f"module-name {name!r}: no such module in {', '.join(MODULE_DIRS)}")


def pin_source_path(source: str) -> Path:
    """The file a pin-source names: ``file:/ABS``, ``file:///ABS`` or ``/ABS``."""
    path = source.removeprefix("file://") if source.startswith("file:///") else source
    path = path.removeprefix("file:")
    if not os.path.isabs(path):
        raise Pkcs11UrlError(
            f"pin-source must be file:/ABSOLUTE/PATH (programs are not run), got {source!r}"
        )
    return Path(path)


def read_pin_file(path: Path) -> str:
    """The PIN in ``path`` (one line; a final newline is dropped), owner-readable only."""
    try:
        info = path.stat()
        data = read_bounded(path, MAX_PIN_FILE)
    except OSError as exc:
        raise Pkcs11UrlError(
            f"PIN file {path}: unreadable ({exc.strerror})", code=PIN_SOURCE
        ) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise Pkcs11UrlError(f"PIN file {path}: readable by others (chmod 600 it)", code=PIN_SOURCE)
    text = data.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r")
    if not text or "\n" in text or "\ufffd" in text:
        raise Pkcs11UrlError(f"PIN file {path}: expected one line of UTF-8 text", code=PIN_SOURCE)
    return text
