"""Helpers of this folder: a running SDN agent on a free port, and node telemetry."""

from __future__ import annotations

import socket

from appliance.control import agent, model
from appliance.control.client import AgentClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def telemetry(
    *,
    status: model.LinkStatus = model.LinkStatus.ACTIVE,
    bits: int = 8192,
    routes: tuple[model.Route, ...] = (),
) -> model.NodeTelemetry:
    """Node 4 of a small network: two physical links, and the routes given."""
    links = (
        model.PhysLink(
            link="L3-4",
            peer=3,
            status=status,
            skr=1000,
            eskr=900,
            qber=0.031,
            available_bits=bits,
            rate_bps=-20,
        ),
        model.PhysLink(
            link="L4-16",
            peer=16,
            status=model.LinkStatus.ACTIVE,
            skr=2000,
            eskr=2000,
            qber=0.02,
            available_bits=65536,
            rate_bps=100,
        ),
    )
    return model.NodeTelemetry(
        node=4, links=links, routes=routes, relayed=7, batches=3, uptime_s=12
    )


class Served:
    """A running agent, its published telemetry and a client with the network's cert."""

    def __init__(self, pki: dict, port: int) -> None:
        self.telemetry = agent.Telemetry(telemetry())
        self.server = agent.serve(
            agent.GnmiAgent(self.telemetry),
            f"127.0.0.1:{port}",
            cert=pki["node-a"].cert,
            key=pki["node-a"].key,
            ca=pki["node-a"].ca,
        )
        self.address = f"127.0.0.1:{port}"
        who = pki["node-b"]
        self.client = AgentClient(self.address, cert=who.cert, key=who.key, ca=who.ca, timeout=20.0)


LIBRARY = {
    "ietf-yang-library:modules-state": {
        "module-set-id": "qkdn-control",
        "module": [
            {
                "name": "ietf-yang-types",
                "revision": "2013-07-15",
                "namespace": "urn:ietf:params:xml:ns:yang:ietf-yang-types",
                "conformance-type": "import",
            },
            {
                "name": "etsi-qkd-node-types",
                "revision": "2022-01-30",
                "namespace": "urn:etsi:qkd:yang:etsi-qkd-node-types",
                "conformance-type": "implement",
            },
            {
                "name": "etsi-qkd-sdn-node",
                "revision": "2022-01-30",
                "namespace": "urn:etsi:qkd:yang:etsi-qkd-node",
                "conformance-type": "implement",
            },
            {
                "name": "qkdn-control",
                "revision": "2026-12-03",
                "namespace": "urn:qkdn:yang:qkdn-control",
                "conformance-type": "implement",
            },
        ],
    }
}


def data_model():  # type: ignore[no-untyped-def]
    """The yangson data model of the shipped modules (ietf-yang-types from pyang's copy)."""
    import json
    import sys
    from pathlib import Path

    from yangson import DataModel

    import appliance.control

    here = Path(appliance.control.__file__).parent / "yang"
    ietf = Path(sys.prefix) / "share" / "yang" / "modules" / "ietf"
    return DataModel(json.dumps(LIBRARY), [str(here), str(ietf)])


def validate(dm, doc) -> None:  # type: ignore[no-untyped-def]
    """Raise unless ``doc`` is valid under the data model (all content, all scopes)."""
    from yangson.enumerations import ContentType, ValidationScope

    dm.from_raw(doc).validate(ValidationScope.all, ContentType.all)
