"""ETSI GS QKD 014 v1.1.1, the SAE-facing REST API of the UKMS, exact to the standard.

``GET /api/v1/keys/{slave_SAE_ID}/status``, ``GET|POST /api/v1/keys/{slave_SAE_ID}/enc_keys``
(called by the master SAE) and ``GET|POST /api/v1/keys/{master_SAE_ID}/dec_keys`` (called by
the slave SAE with the master's ID). The caller's SAE ID is the CN of its TLS client
certificate, never anything it writes in the request. Responses: the Status object with
its 11 fields plus ``status_extension``; the Key container ``{"keys": [{"key_ID", "key"}]}``
with UUID key IDs and padded base64 keys; errors ``{"message", "details"}`` with 400, 401 or
503 only, ``details`` always a list of objects (§6.5), most of them
``{"parameter", "reason"}``. ``dec_keys`` answers 401 for any key ID not held for the
caller's pair (never issued, another SAE's, already handed out: one answer, §5.4) and 400
with ``key_IDs_not_found`` for keys held for the pair but not servable now.

The SAE ID in the path is URL-encoded (``sae%2Dbonn%2D1`` is ``sae-bonn-1``) and decoded
strictly: a bad escape, bytes that are not UTF-8 or a control character get 400 with the
code ``SAE-ID-ENCODING`` in ``details``.

Inputs are bounded before they are used: ``number`` and ``size`` are ASCII digits only (no
sign, no ``_``, no other script's digits) of at most :data:`MAX_DIGITS`; a POST body is UTF-8
JSON whose arrays and objects nest at most :data:`MAX_DEPTH` deep (checked by a scan before
the parser runs, so it never recurses far) and whose integers have at most
:data:`MAX_DIGITS` digits (checked as the parser meets them); values echoed in messages are
cut to a few dozen characters.

What this module must never do: reveal a carrier node, link or route (errors say what was
wrong with the request, not where in the network something failed), accept key material
from a caller (invariant 3), or serve a key to an SAE other than the named one.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

import msgspec

from appliance.kms import keyids
from appliance.kms.errors import KeyUnavailable, KmsError
from appliance.kms.seams import Denial, Denied
from appliance.net.h2 import Request, Response

PATH = re.compile(r"^/api/v1/keys/(?P<sae>[^/]+)/(?P<op>status|enc_keys|dec_keys)$")
MSG_SIZE_MULTIPLE_OF_8 = "size shall be a multiple of 8"
MSG_EXTENSIONS = "not all extension_mandatory parameters are supported"
MSG_KEYS_NOT_FOUND = "one or more keys specified are not found on KME"
DENIAL_STATUS = {Denial.LIMITS: 400, Denial.UNAUTHORISED: 401, Denial.QUOTA: 503}
"""A request the contract does not allow: above its size or count limits 400; a suspended
user, an unknown pair or a day outside the validity window 401; a quota or rate exceeded
(or no quota to be had: the AAA device unreachable) 503."""
DENIAL_MESSAGE = {
    Denial.LIMITS: "The request exceeds the limits of the SAE pair's contract",
    Denial.UNAUTHORISED: "The SAE pair is not authorised to get keys now",
    Denial.QUOTA: "The contract's quota or rate does not allow more keys now; retry later",
}
"""Messages §6.2 and §6.4 fix word for word (what else there is to say goes in details).
§6.2's "not all extension_mandatory request options could be met" is never sent: this
KME supports no extension parameter, so any mandatory one is unsupported."""
MAX_SAE_ID = 256
"""Characters of an SAE ID in a path, once decoded."""
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_DEPTH = 16
"""Arrays and objects in a request body nest at most this deep."""
MAX_DIGITS = 18
"""Digits of an integer in a request (query or body)."""
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_INNERMOST = re.compile(r"\[\]|\{\}")
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_ASCII_NOT_BRACKET = {c: None for c in range(128) if chr(c) not in "[]{}"}
_JSON_KINDS: dict[type, str] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true or false",
    type(None): "null",
}


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the KME advertises in Status and enforces on requests."""

    source_kme: str
    target_kme: str
    key_size: int = 256
    max_key_count: int = 100_000
    max_key_per_request: int = 128
    max_key_size: int = 1024
    min_key_size: int = 64
    max_sae_id_count: int = 0
    """Additional slave SAEs an enc_keys may name (Annex B)."""


class KeyService(Protocol):
    """What the UKMS provides behind the API."""

    def limits(
        self, master: str, slave: str, *, caller_is_master: bool
    ) -> Limits | Awaitable[Limits | None] | None:
        """The limits for this SAE pair, or None if the pair is not registered, or if the
        calling end (master for status and enc_keys, slave for dec_keys) is not served here
        (at once, or awaitable: the contract's terms may have to be asked for)."""

    def stored(self, master: str, slave: str) -> int:
        """Keys ready for this pair."""

    async def enc_keys(
        self, master: str, slave: str, number: int, size: int, *, also: tuple[str, ...] = ()
    ) -> list[tuple[str, bytes]]:
        """``number`` new keys of ``size`` bits for master -> slave, and the same keys for
        each slave in ``also`` (KeyUnavailable if none)."""

    async def dec_keys(
        self, slave: str, master: str, key_ids: list[str]
    ) -> list[tuple[str, bytes]]:
        """The named keys, issued by ``master`` to ``slave``; each is handed out once. A
        service that keeps taken keys until their answer has left returns a :class:`Taken`,
        and hears whether it did."""


@runtime_checkable
class ImmediateKeys(Protocol):
    """What a key service that can serve some enc_keys at once (from memory, asking no
    one) adds to :class:`KeyService`: the API's direct path (:meth:`Etsi014Api.handle_now`)."""

    def limits_now(self, master: str, slave: str) -> Limits | None:
        """The pair's limits if known at once and a request may be served at once, else
        None (the request then takes the full path, which answers it as usual). Asked
        before the request's parameters are read: a None here (e.g. nothing in memory for
        the pair) spares the direct path's work to a request that goes the full way."""

    def enc_keys_now(
        self, master: str, slave: str, number: int, size: int
    ) -> list[tuple[str, bytes]] | None:
        """``number`` keys of ``size`` bits at once, or None having taken nothing."""


class Taken(list[tuple[str, bytes]]):
    """Keys from :meth:`KeyService.dec_keys`, with ``written(bool)``: called once the answer
    carrying them was handed to the SAE's connection (True) or could not be (False)."""

    def __init__(self, keys: list[tuple[str, bytes]], written: Callable[[bool], None]) -> None:
        super().__init__(keys)
        self.written = written


class ApiError(Exception):
    """An error response: status 400, 401 or 503, message and details (§6.5: a list of
    objects; never empty here, never naming a carrier node, link or route)."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.status, self.message, self.details = status, message, details


def bad(parameter: str, message: str, reason: str, status: int = 400) -> ApiError:
    """An error about one request parameter."""
    return ApiError(status, message, [{"parameter": parameter, "reason": reason}])


def _show(value: Any) -> str:
    """``value`` for a message: its repr, cut to a few dozen characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_ENCODE = msgspec.json.Encoder().encode
"""Compact JSON, UTF-8 (a 1,024-key answer in a quarter of json.dumps's time)."""


def _json(status: int, doc: dict[str, Any]) -> Response:
    return Response(
        status,
        _ENCODE(doc),
        {"content-type": "application/json"},
    )


def error_response(err: ApiError) -> Response:
    return _json(err.status, {"message": err.message, "details": err.details})


class Etsi014Api:
    """Request -> Response for the three 014 operations over a :class:`KeyService`."""

    def __init__(self, service: KeyService) -> None:
        self.service = service
        self._immediate = service if isinstance(service, ImmediateKeys) else None

    def handle_now(self, request: Request) -> Response | None:
        """The direct path: the answer at once when the request is a well-formed enc_keys
        for the pair of the caller's certificate, with no parameter beyond ``number`` and
        ``size``, that the service serves from memory; else None, nothing having been
        done: the request then goes to :meth:`handle` (which also answers every error,
        so both paths check alike and refuse alike)."""
        if self._immediate is None or not request.peer or request.method not in ("GET", "POST"):
            return None
        try:
            match, query = _resource(request.path)
            if match["op"] != "enc_keys":
                return None
            slave = _sae_id(match["sae"], "slave_SAE_ID")
            if slave == request.peer:
                return None
            lim = self._immediate.limits_now(request.peer, slave)  # first: the cheap refusal
            if lim is None:
                return None
            params = _params(request, query)
            if any(
                params.get(name, []) != []
                for name in ("additional_slave_SAE_IDs", "extension_mandatory")
            ):
                return None
            number, size = _enc_numbers(params, lim)
        except ApiError:
            return None
        keys = self._immediate.enc_keys_now(request.peer, slave, number, size)
        if keys is None:
            return None
        return _json(200, {"keys": [_key(k, v) for k, v in keys]})

    async def handle(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except ApiError as err:
            return error_response(err)
        except Denied as exc:  # the contract's rule, in words that name no part of the network
            return error_response(
                ApiError(DENIAL_STATUS[exc.why], DENIAL_MESSAGE[exc.why], [{"reason": exc.message}])
            )
        except KeyUnavailable:  # its text may name the network's parts: not shown
            return error_response(
                ApiError(
                    503,
                    "Keys are not available at the moment; retry later",
                    [{"reason": "no key is ready for this SAE pair yet"}],
                )
            )
        except KmsError:
            return error_response(
                ApiError(
                    503,
                    "The key management system is unavailable",
                    [{"reason": "the KME cannot serve keys now; retry later"}],
                )
            )

    async def _route(self, request: Request) -> Response:
        match, query = _resource(request.path)
        caller = request.peer
        if not caller:
            raise bad(
                "client certificate",
                "A client certificate identifying the SAE is required",
                "no certificate with a common name was presented",
                401,
            )
        op = match["op"]
        sae = _sae_id(match["sae"], "master_SAE_ID" if op == "dec_keys" else "slave_SAE_ID")
        allowed = ("GET",) if op == "status" else ("GET", "POST")
        if request.method not in allowed:
            raise bad(
                "method",
                f"Method {request.method} is not allowed for {op}",
                f"{op} accepts {' or '.join(allowed)}",
            )
        params = _params(request, query)
        if op == "status":
            return await self._status(caller, sae)
        if op == "enc_keys":
            return await self._enc_keys(caller, sae, params)
        return await self._dec_keys(caller, sae, params)

    async def _limits(self, master: str, slave: str, *, caller_is_master: bool = True) -> Limits:
        found = self.service.limits(master, slave, caller_is_master=caller_is_master)
        # Limits or None at once (the common case) before the dearer awaitable check
        limits = found if found is None or isinstance(found, Limits) else await found
        if limits is None:
            raise bad(
                "slave_SAE_ID" if caller_is_master else "master_SAE_ID",
                f"SAE {_show(master)} is not authorised to share keys with {_show(slave)}",
                "this KME serves no such SAE pair for this caller",
                401,
            )
        return limits

    async def _status(self, master: str, slave: str) -> Response:
        lim = await self._limits(master, slave)
        return _json(
            200,
            {
                "source_KME_ID": lim.source_kme,
                "target_KME_ID": lim.target_kme,
                "master_SAE_ID": master,
                "slave_SAE_ID": slave,
                "key_size": lim.key_size,
                "stored_key_count": min(self.service.stored(master, slave), lim.max_key_count),
                "max_key_count": lim.max_key_count,
                "max_key_per_request": lim.max_key_per_request,
                "max_key_size": lim.max_key_size,
                "min_key_size": lim.min_key_size,
                "max_SAE_ID_count": lim.max_sae_id_count,
                "status_extension": {},
            },
        )

    async def _enc_keys(self, master: str, slave: str, params: dict[str, Any]) -> Response:
        lim = await self._limits(master, slave)
        number, size = _enc_numbers(params, lim)
        extra = await self._additional_slaves(master, slave, params, lim, number, size)
        mandatory = params.get("extension_mandatory", [])
        if not isinstance(mandatory, list):
            message = "extension_mandatory must be a list of objects"
            raise bad("extension_mandatory", message, "not a list")
        if mandatory:  # this KME supports no extension parameter
            names = [_name(e) for e in mandatory[:16]]
            raise ApiError(400, MSG_EXTENSIONS, [{"extension_mandatory_unsupported": names}])
        if extra:
            keys = await self.service.enc_keys(master, slave, number, size, also=tuple(extra))
        else:
            keys = await self.service.enc_keys(master, slave, number, size)
        return _json(200, {"keys": [_key(k, v) for k, v in keys]})

    async def _additional_slaves(
        self, master: str, slave: str, params: dict[str, Any], lim: Limits, number: int, size: int
    ) -> list[str]:
        """Annex B's ``additional_slave_SAE_IDs``: at most ``max_SAE_ID_count`` SAE IDs,
        none of them the master, the slave or another twice, each paired with the master
        under a contract that allows this request (else 401, as for the slave itself)."""
        name = "additional_slave_SAE_IDs"
        extra = params.get(name, [])
        if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
            raise bad(name, f"{name} must be a list of SAE IDs", "not a list of strings")
        if len(extra) > lim.max_sae_id_count:
            message = f"at most {lim.max_sae_id_count} additional slave SAE IDs are supported"
            raise bad(name, message, f"{len(extra)} given")
        if len({master, slave, *extra}) != len(extra) + 2:
            message = f"{name} repeats an SAE ID, or names the master or the slave"
            raise bad(name, message, "each additional slave SAE must be another SAE, once")
        for other in extra:
            if len(other) > MAX_SAE_ID or _CONTROL.search(other):
                raise bad(name, f"{name} holds a malformed SAE ID", "at most 256 characters")
            theirs = await self._limits(master, other)
            if number > theirs.max_key_per_request or not size <= theirs.max_key_size:
                message = f"the request exceeds the limits of SAE {_show(other)}'s contract"
                raise bad(name, message, "out of range")
        return extra

    async def _dec_keys(self, slave: str, master: str, params: dict[str, Any]) -> Response:
        await self._limits(master, slave, caller_is_master=False)
        ids = _key_ids(params)
        try:
            keys = await self.service.dec_keys(slave, master, ids)
        except KeyUnavailable as exc:
            raise _not_served(ids, exc) from None
        response = _json(200, {"keys": [_key(k, v) for k, v in keys]})
        response.on_written = getattr(keys, "written", None)
        return response


def _enc_numbers(params: dict[str, Any], lim: Limits) -> tuple[int, int]:
    """An enc_keys's ``number`` and ``size``, checked against the pair's limits."""
    number = _int(params, "number", 1)
    size = _int(params, "size", lim.key_size)
    if number < 1 or number > lim.max_key_per_request:
        message = (
            f"number must be between 1 and max_key_per_request "
            f"({lim.max_key_per_request}), got {number}"
        )
        raise bad("number", message, "out of range")
    if size % 8:
        raise bad("size", MSG_SIZE_MULTIPLE_OF_8, f"got {size}, not a multiple of 8")
    if not lim.min_key_size <= size <= lim.max_key_size:
        message = f"size must be between {lim.min_key_size} and {lim.max_key_size} bits, got {size}"
        raise bad("size", message, "out of range")
    return number, size


def _not_served(ids: list[str], exc: KeyUnavailable) -> Exception:
    """The answer to a dec_keys whose keys could not all be served (§5.4): 401 if any ID
    is not held for this SAE pair, whether it was never issued, issued to another SAE, or
    already handed out, one answer for all (so that a 401 never says whether an ID exists
    elsewhere); 400 if every missing ID is held for the pair but not available now. An
    error that names no key (the key service failed) stays what it is: 503, retry."""
    if not exc.missing:
        return exc
    missing, held = set(exc.missing), set(exc.held)
    not_given = [k for k in ids if k in missing and k not in held]
    if not_given:
        return ApiError(
            401,
            "The requesting SAE was not given one or more of the keys requested",
            [
                {
                    "parameter": "key_IDs",
                    "reason": "not issued to this SAE by this master SAE, or already delivered",
                    "key_IDs": not_given,
                }
            ],
        )
    return ApiError(
        400, MSG_KEYS_NOT_FOUND, [{"key_IDs_not_found": [k for k in ids if k in missing]}]
    )


def _resource(target: str) -> tuple[re.Match[str], str]:
    """The 014 resource named by the request target, and the query."""
    try:
        parts = urlsplit(target)
    except ValueError:  # e.g. an unclosed "[" in an authority
        parts = None
    match = PATH.match(parts.path) if parts is not None else None
    if parts is None or match is None:
        raise bad(
            "resource",
            f"Unknown resource {_show(target)}",
            "not /api/v1/keys/{SAE_ID}/status, enc_keys or dec_keys",
        )
    return match, parts.query


def _sae_id(raw: str, parameter: str) -> str:
    """The SAE ID a path segment names: a URL-encoded SAE ID (Tables 3, 5, 7), decoded
    strictly: ASCII only, each ``%`` followed by two hex digits, UTF-8 once decoded, no
    control character, at most :data:`MAX_SAE_ID` characters."""
    if len(raw) > 3 * MAX_SAE_ID or not raw.isascii():
        raise _encoding(parameter, "at most 256 characters, URL-encoded in ASCII")
    if "%" not in raw:
        text = raw
    elif _BAD_ESCAPE.search(raw):
        raise _encoding(parameter, "each '%' must be followed by two hexadecimal digits")
    else:
        try:
            text = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise _encoding(parameter, "the decoded bytes are not UTF-8") from None
    if len(text) > MAX_SAE_ID or _CONTROL.search(text):
        raise _encoding(parameter, "at most 256 characters, none of them a control character")
    return text


def _encoding(parameter: str, reason: str) -> ApiError:
    return ApiError(
        400,
        f"{parameter} is not a correctly URL-encoded SAE ID",
        [{"parameter": parameter, "reason": reason, "code": "SAE-ID-ENCODING"}],
    )


def _key(key_id: str, material: bytes) -> dict[str, str]:
    return {"key_ID": key_id, "key": base64.b64encode(material).decode()}


def _params(request: Request, query: str) -> dict[str, Any]:
    """Query parameters for GET, the JSON object for POST."""
    if request.method == "GET":
        raw = parse_qs(query, keep_blank_values=True)
        return {k: v[0] if len(v) == 1 else v for k, v in raw.items()}
    if not request.body:
        return {}
    doc = _load_json(request.body)
    if not isinstance(doc, dict):
        kind = _JSON_KINDS.get(type(doc), "another JSON value")
        raise bad("body", "The request body must be a JSON object", f"it is {kind}")
    return doc


def _load_json(body: bytes) -> Any:
    """The JSON document, its nesting and integers bounded (no RecursionError, no int
    conversion past Python's digit limit)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("body", "The request body is not valid JSON", "it is not UTF-8") from None
    _check_nesting(text)
    try:
        return json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise bad("body", "The request body is not valid JSON", str(exc)) from None


def _check_nesting(text: str) -> None:
    """Refuse ``text`` unless its arrays and objects balance within :data:`MAX_DEPTH`
    levels: strings are removed, then the innermost pairs, one level per pass."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    # without escapes, strings are exactly what lies between quotes (the fast way)
    outside = _STRING.sub("", text) if "\\" in text else "".join(text.split('"')[::2])
    brackets = outside.translate(_ASCII_NOT_BRACKET)
    if not brackets.isascii():  # not JSON, but the parser may recurse before it sees that
        brackets = _NOT_BRACKET.sub("", brackets)
    for _ in range(MAX_DEPTH):
        brackets, removed = _INNERMOST.subn("", brackets)
        if not brackets:
            return
        if not removed:
            raise bad("body", "The request body is not valid JSON", "its brackets do not balance")
    raise bad(
        "body",
        "The request body is nested too deeply",
        f"arrays and objects nest more than {MAX_DEPTH} deep",
    )


def _bounded_int(text: str) -> int:
    if len(text) - text.startswith("-") > MAX_DIGITS:
        raise bad(
            "body",
            "A number in the request body is too long",
            f"integers have at most {MAX_DIGITS} digits",
        )
    return int(text)


def _int(params: dict[str, Any], name: str, default: int) -> int:
    """A count in ASCII digits (JSON integers are bounded by the parser)."""
    value = params.get(name, default)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= MAX_DIGITS:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise bad(
        name,
        f"{name} must be an integer, got {_show(value)}",
        f"a non-negative integer of at most {MAX_DIGITS} ASCII digits is required",
    )


def _name(extension: Any) -> str:
    """The name of an extension parameter (the first key of its object), for a message."""
    name = next(iter(extension), "?") if isinstance(extension, dict) else "?"
    return name if len(name) <= 40 else name[:37] + "..."


def _key_ids(params: dict[str, Any]) -> list[str]:
    """key_ID (GET) or key_IDs (POST); each must be a UUID; unknown members are ignored."""
    if "key_ID" in params:
        raw: Any = params["key_ID"]
        raw_ids = raw if isinstance(raw, list) else [raw]
    else:
        entries = params.get("key_IDs")
        if not isinstance(entries, list) or not entries:
            message = "key_ID or a non-empty key_IDs list is required"
            raise bad("key_IDs", message, "missing, empty or not a list")
        raw_ids = [e.get("key_ID") if isinstance(e, dict) else None for e in entries]
    ids = []
    for raw_id in raw_ids:
        key_id = keyids.canonical(raw_id) if isinstance(raw_id, str) else None
        if key_id is None:
            raise bad("key_ID", f"key_ID {_show(raw_id)} is not a UUID", "not a UUID")
        ids.append(key_id)
    if len(set(ids)) != len(ids):
        raise bad("key_IDs", "a key_ID is listed twice", "each key may be asked for once")
    return ids
