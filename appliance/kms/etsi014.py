"""ETSI GS QKD 014 v1.1.1, the SAE-facing REST API of the UKMS, exact to the standard.

``GET /api/v1/keys/{slave_SAE_ID}/status``, ``GET|POST /api/v1/keys/{slave_SAE_ID}/enc_keys``
(called by the master SAE) and ``GET|POST /api/v1/keys/{master_SAE_ID}/dec_keys`` (called by
the slave SAE with the master's ID). The caller's SAE ID is the CN of its TLS client
certificate, never anything it writes in the request. Responses: the Status object with
its 11 fields plus ``status_extension``; the Key container ``{"keys": [{"key_ID", "key"}]}``
with UUID key IDs and padded base64 keys; errors ``{"message", "details"}`` with 400, 401 or
503 only.

What this module must never do: reveal a carrier node, link or route (errors say what was
wrong with the request, not where in the network something failed), accept key material
from a caller (invariant 3), or serve a key to an SAE other than the named one.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from appliance.kms import keyids
from appliance.kms.errors import KeyUnavailable, KmsError
from appliance.net.h2 import Request, Response

PATH = re.compile(r"^/api/v1/keys/(?P<sae>[^/]+)/(?P<op>status|enc_keys|dec_keys)$")


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


class KeyService(Protocol):
    """What the UKMS provides behind the API."""

    def limits(self, master: str, slave: str, *, caller_is_master: bool) -> Limits | None:
        """The limits for this SAE pair, or None if the pair is not registered, or if the
        calling end (master for status and enc_keys, slave for dec_keys) is not served here."""

    def stored(self, master: str, slave: str) -> int:
        """Keys ready for this pair."""

    async def enc_keys(
        self, master: str, slave: str, number: int, size: int
    ) -> list[tuple[str, bytes]]:
        """``number`` new keys of ``size`` bits for master -> slave (KeyUnavailable if none)."""

    async def dec_keys(
        self, slave: str, master: str, key_ids: list[str]
    ) -> list[tuple[str, bytes]]:
        """The named keys, issued by ``master`` to ``slave``; each is handed out once."""


class ApiError(Exception):
    """An error response: status 400, 401 or 503, message and details."""

    def __init__(
        self, status: int, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.details = status, message, details or []


def _json(status: int, doc: dict[str, Any]) -> Response:
    return Response(
        status,
        json.dumps(doc, separators=(",", ":")).encode(),
        {"content-type": "application/json"},
    )


def error_response(err: ApiError) -> Response:
    doc: dict[str, Any] = {"message": err.message}
    if err.details:
        doc["details"] = err.details
    return _json(err.status, doc)


class Etsi014Api:
    """Request -> Response for the three 014 operations over a :class:`KeyService`."""

    def __init__(self, service: KeyService) -> None:
        self.service = service

    async def handle(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except ApiError as err:
            return error_response(err)
        except KeyUnavailable:
            return error_response(
                ApiError(503, "Keys are not available at the moment; retry later")
            )
        except KmsError:
            return error_response(ApiError(503, "The key management system is unavailable"))

    async def _route(self, request: Request) -> Response:
        target = urlsplit(request.path)
        match = PATH.match(target.path)
        if match is None:
            raise ApiError(400, f"Unknown resource {target.path!r}")
        caller = request.peer
        if not caller:
            raise ApiError(401, "A client certificate identifying the SAE is required")
        sae, op = match["sae"], match["op"]
        allowed = ("GET",) if op == "status" else ("GET", "POST")
        if request.method not in allowed:
            raise ApiError(400, f"Method {request.method} is not allowed for {op}")
        params = _params(request, target.query)
        if op == "status":
            return self._status(caller, sae)
        if op == "enc_keys":
            return await self._enc_keys(caller, sae, params)
        return await self._dec_keys(caller, sae, params)

    def _limits(self, master: str, slave: str, *, caller_is_master: bool = True) -> Limits:
        limits = self.service.limits(master, slave, caller_is_master=caller_is_master)
        if limits is None:
            raise ApiError(401, f"SAE {master!r} is not authorised to share keys with {slave!r}")
        return limits

    def _status(self, master: str, slave: str) -> Response:
        lim = self._limits(master, slave)
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
        lim = self._limits(master, slave)
        number = _int(params, "number", 1)
        size = _int(params, "size", lim.key_size)
        if number < 1 or number > lim.max_key_per_request:
            raise ApiError(
                400,
                f"number must be between 1 and max_key_per_request "
                f"({lim.max_key_per_request}), got {number}",
            )
        if size % 8 or not lim.min_key_size <= size <= lim.max_key_size:
            raise ApiError(
                400,
                f"size must be a multiple of 8 between {lim.min_key_size} and "
                f"{lim.max_key_size} bits, got {size}",
            )
        extra = params.get("additional_slave_SAE_IDs", [])
        if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
            raise ApiError(400, "additional_slave_SAE_IDs must be a list of SAE IDs")
        if len(extra) > lim.max_sae_id_count:
            raise ApiError(
                400, f"at most {lim.max_sae_id_count} additional slave SAE IDs are supported"
            )
        mandatory = params.get("extension_mandatory", [])
        if not isinstance(mandatory, list) or mandatory:
            names = (
                [next(iter(e), "?") if isinstance(e, dict) else "?" for e in mandatory]
                if isinstance(mandatory, list)
                else ["?"]
            )
            raise ApiError(
                400,
                "not all mandatory extensions are supported",
                [{"extension_mandatory_unsupported": names}],
            )
        keys = await self.service.enc_keys(master, slave, number, size)
        return _json(200, {"keys": [_key(k, v) for k, v in keys]})

    async def _dec_keys(self, slave: str, master: str, params: dict[str, Any]) -> Response:
        self._limits(master, slave, caller_is_master=False)
        ids = _key_ids(params)
        try:
            keys = await self.service.dec_keys(slave, master, ids)
        except KeyUnavailable:  # unknown, already taken, or meant for another SAE: same answer
            raise ApiError(
                400, "One or more keys were not found for this SAE", [{"key_IDs_not_found": ids}]
            ) from None
        return _json(200, {"keys": [_key(k, v) for k, v in keys]})


def _key(key_id: str, material: bytes) -> dict[str, str]:
    return {"key_ID": key_id, "key": base64.b64encode(material).decode()}


def _params(request: Request, query: str) -> dict[str, Any]:
    """Query parameters for GET, the JSON object for POST."""
    if request.method == "GET":
        raw = parse_qs(query, keep_blank_values=True)
        return {k: v[0] if len(v) == 1 else v for k, v in raw.items()}
    if not request.body:
        return {}
    try:
        doc = json.loads(request.body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "The request body must be a JSON object")
    return doc


def _int(params: dict[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool):
        raise ApiError(400, f"{name} must be an integer")
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ApiError(400, f"{name} must be an integer, got {value!r}") from None
    if not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer")
    return value


def _key_ids(params: dict[str, Any]) -> list[str]:
    """key_ID (GET) or key_IDs (POST); each must be a UUID; unknown members are ignored."""
    if "key_ID" in params:
        raw: Any = params["key_ID"]
        raw_ids = raw if isinstance(raw, list) else [raw]
    else:
        entries = params.get("key_IDs")
        if not isinstance(entries, list) or not entries:
            raise ApiError(400, "key_ID or a non-empty key_IDs list is required")
        raw_ids = [e.get("key_ID") if isinstance(e, dict) else None for e in entries]
    ids = []
    for raw_id in raw_ids:
        key_id = keyids.canonical(raw_id) if isinstance(raw_id, str) else None
        if key_id is None:
            raise ApiError(400, f"key_ID {raw_id!r} is not a UUID")
        ids.append(key_id)
    if len(set(ids)) != len(ids):
        raise ApiError(400, "a key_ID is listed twice")
    return ids
