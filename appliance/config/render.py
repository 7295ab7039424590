"""From one topology to one configuration file per node (``qkdn topology render``).

Ports follow a fixed plan so an operator can read them: ``base + offset(service) + node
id``. Each link gets a secret for its emulated QKDM pair, created once and kept on later
renders (re-rendering must not change the keys a running pair agrees on), and a path for
its shared fault schedule. ``network.toml`` records the emulation start time, which later
renders reuse, and indexes the node files.

Nodes import this module for the port plan; writing files needs ``tomli_w`` (the
``provisioning`` extra), imported only by :func:`render`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from appliance.config.addresses import MAX_PORT, check_host, join_host_port
from appliance.config.schema import MAX_CONFIG_FILE, read_toml
from appliance.config.topology import Node, ResolvedLink, Topology
from appliance.errors import ApplianceError, ConfigError, UsageError
from appliance.files import read_bounded

SERVICE_OFFSETS = {
    "ukms": 0,
    "akms": 1000,
    "ckms": 2000,
    "etsi014": 3000,
    "snmp": 4000,
    "api": 5000,
    "gnmi": 6000,
    "web": 7000,
    "traps": 8000,
    "etsi004": 9000,
}
"""Port = base + offset + node id (node ids are below 1000)."""
MIN_BASE_PORT = 1024
MAX_BASE_PORT = MAX_PORT - max(SERVICE_OFFSETS.values()) - 999
"""The highest base port whose every derived port (node ids up to 999) is a real port."""
EPHEMERAL_START = 32768

ROLE_SERVICES = {
    "ukms": ("ukms", "etsi014", "etsi004", "snmp"),
    "akms": ("akms", "snmp"),
    "ckms": ("ckms", "snmp", "gnmi"),
    "controller": ("api", "gnmi"),
    "manager": ("web", "traps"),
    "aaa": ("snmp",),
}


def qkdm_url(
    link: ResolvedLink,
    end: str,
    *,
    secret_file: str | None = None,
    seed: str | None = None,
    start: float = 0.0,
    faults: str | None = None,
    state: str | None = None,
    speedup: float = 1.0,
) -> str:
    """The ``emulated://`` URL of one end of a link, in the driver's units (bit/s, fraction)."""
    emu = link.emulator
    params: dict[str, Any] = {
        "end": end,
        "skr": link.skr_kbps * 1000,
        "skr_std": emu.skr_std_kbps * 1000,
        "qber": link.qber_pct / 100,
        "qber_std": emu.qber_std_pct / 100,
        "qber_abort": emu.qber_abort_pct / 100,
        "tau": emu.tau_s,
        "epoch": emu.epoch_s,
        "key_size": link.key_size,
        "buffer": emu.buffer_keys,
        "start": start,
    }
    if emu.skr_max_kbps is not None:
        params["skr_max"] = emu.skr_max_kbps * 1000
    for key, value in (
        ("secret_file", secret_file),
        ("seed", seed),
        ("faults", faults),
        ("state", state),
    ):
        if value is not None:
            params[key] = value
    if speedup != 1.0:
        params["speedup"] = speedup
    return f"emulated://{link.id}?{urlencode(params)}"


@dataclass(frozen=True, kw_only=True)
class RenderPlan:
    """Where rendered files go and how addresses are assigned."""

    out: Path
    host: str = "127.0.0.1"
    base_port: int = 20000
    data_root: Path | None = None
    pki_dir: Path | None = None
    start: float | None = None
    speedup: float = 1.0
    """Emulated link time runs this many times faster than the wall clock (benches)."""

    def address(self, node: Node, service: str) -> str:
        """``host:port`` of a node's service; an IPv6 host in brackets."""
        return join_host_port(self.host, self.base_port + SERVICE_OFFSETS[service] + node.id)

    def check(self) -> None:
        """UsageError unless every address of the plan is a real host and port."""
        if not MIN_BASE_PORT <= self.base_port <= MAX_BASE_PORT:
            raise UsageError(
                f"--base-port: expected {MIN_BASE_PORT}..{MAX_BASE_PORT} (so that every "
                f"derived port fits in 1..{MAX_PORT}), got {self.base_port}"
            )
        try:
            check_host(self.host)
        except ValueError as exc:
            raise UsageError(f"--host: expected {exc}, got {self.host!r}") from None


def services_of(node: Node) -> list[str]:
    """The services a node listens on, from its roles."""
    out: list[str] = []
    for role in sorted(node.roles):
        out += [s for s in ROLE_SERVICES[role] if s not in out]
    return out


def _peer_service(me: Node, peer: Node) -> str:
    """Which of the neighbour's services this node's KMS talks to over their link."""
    if "ukms" in peer.roles:
        return "ukms"
    if "ukms" in me.roles:
        return "akms"
    return "ckms"


def render_node(topo: Topology, node: Node, plan: RenderPlan, start: float) -> dict[str, Any]:
    """The configuration document of one node."""
    out = plan.out.resolve()
    pki = (plan.pki_dir or out / "pki").resolve()
    data_root = (plan.data_root or out / "data").resolve()
    doc: dict[str, Any] = {
        "node": {
            "id": node.id,
            "name": node.name,
            "site": node.site,
            "role": node.role,
            "network": topo.name,
            "topology": str(out / "topology.toml"),
            "virtual": node.virtual,
        },
        "devices": {"qrng": f"emulated-qrng://{node.name}?bits=16"},
        "paths": {
            "data_dir": str(data_root / node.name),
            "ca_cert": str(pki / "ca.pem"),
            "cert": str(pki / "nodes" / f"{node.name}.pem"),
            "key": str(pki / "nodes" / f"{node.name}.key"),
        },
        "plan": {"host": plan.host, "base_port": plan.base_port},
        "listen": {s: plan.address(node, s) for s in services_of(node)},
        "services": _services(topo, node, plan),
        "neighbours": [],
        "saes": [],
    }
    for link, peer in topo.neighbours(node.id):
        end = "a" if link.a == node.id else "b"
        url = qkdm_url(
            link,
            end,
            secret_file=str(out / "secrets" / f"{link.id}.secret"),
            start=start,
            faults=str(out / "faults" / f"{link.id}.json"),
            state=str(data_root / node.name / f"qkdm-{link.id}.state"),
            speedup=plan.speedup,
        )
        doc["neighbours"].append(
            {
                "node": peer.id,
                "name": peer.name,
                "role": peer.role,
                "address": plan.address(peer, _peer_service(node, peer)),
                "link": link.id,
                "length_km": link.length_km,
                "qkdm": url,
            }
        )
    if "akms" in node.roles:
        doc["psk"] = {
            peer.name: f"file:{out / 'secrets' / psk_file_name(node, peer)}"
            for peer in topo.nodes_with("akms")
            if peer.id != node.id
        }
    for sae in topo.spec.saes:
        if sae.node == node.id:
            doc["saes"].append(
                {
                    "id": sae.id,
                    "user": sae.user,
                    "contract": sae.contract,
                    "cert": str(pki / "saes" / f"{sae.id}.pem"),
                }
            )
    return {k: v for k, v in doc.items() if v not in ([], {})}


def psk_file_name(a: Node, b: Node) -> str:
    """The provisioning file of the PSK shared by two access nodes (one file, both ends)."""
    low, high = sorted((a, b), key=lambda n: n.id)
    return f"psk-{low.name}-{high.name}.hex"


def _services(topo: Topology, node: Node, plan: RenderPlan) -> dict[str, str]:
    """Data-centre services: the manager for every operator node, the controller for
    CKMS nodes, the AAA for AKMS nodes. Never the controller for an AKMS alone."""
    out: dict[str, str] = {}
    if "ukms" in node.roles:
        return out
    wanted = [("manager", "traps")]
    if "ckms" in node.roles:
        wanted.append(("controller", "api"))
    if "akms" in node.roles:
        wanted.append(("aaa", "snmp"))
    for role, service in wanted:
        providers = topo.nodes_with(role)
        if providers and providers[0].id != node.id:
            out[role] = plan.address(providers[0], service)
    return out


def _ensure_secret(path: Path) -> None:
    """A 256-bit link secret, created once with mode 0600 and never overwritten.

    It stands for the physics that makes both QKDMs of a link agree, not for a key the
    KMS generates, so it comes from the OS CSPRNG rather than the node's PTG.3 generator.
    """
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(32).hex() + "\n")


def _start_time(plan: RenderPlan) -> float:
    """The emulation start: as given, else the one of an earlier render, else now."""
    if plan.start is not None:
        return plan.start
    index = plan.out / "network.toml"
    if index.exists():
        value = read_toml(index).get("emulation_start")
        if isinstance(value, int | float):
            return float(value)
        raise ConfigError(str(index), "emulation_start", "expected a number")
    return float(int(time.time()))


def render(topo: Topology, plan: RenderPlan) -> list[Path]:
    """Write every node's configuration under ``plan.out``; return the files written."""
    try:
        return _render(topo, plan)
    except OSError as exc:
        where = exc.filename or plan.out
        raise ApplianceError(f"cannot write {where}: {exc.strerror}", code="IO") from None


def _render(topo: Topology, plan: RenderPlan) -> list[Path]:
    import tomli_w  # the provisioning extra: nodes read configurations, never write them

    plan.check()
    start = _start_time(plan)
    nodes_dir = plan.out / "nodes"
    nodes_dir.mkdir(parents=True, exist_ok=True)
    for link in topo.links:
        _ensure_secret(plan.out / "secrets" / f"{link.id}.secret")
    (plan.out / "faults").mkdir(exist_ok=True)
    (plan.out / "topology.toml").write_bytes(read_bounded(Path(topo.source), MAX_CONFIG_FILE))
    written = []
    for node in topo.spec.nodes:
        path = nodes_dir / f"{node.name}.toml"
        path.write_text(tomli_w.dumps(render_node(topo, node, plan, start)), encoding="utf-8")
        written.append(path)
    index = {
        "network": topo.name,
        "topology": topo.source,
        "emulation_start": start,
        "nodes": {n.name: f"nodes/{n.name}.toml" for n in topo.spec.nodes},
    }
    (plan.out / "network.toml").write_text(tomli_w.dumps(index), encoding="utf-8")
    return written


def find_free_base_port(node_ids: range = range(1, 23), host: str = "127.0.0.1") -> int:
    """A base port whose every planned port (base + offset + node id) binds right now.

    Candidates stay below the kernel's ephemeral range (32768 and up), where outgoing
    connections would keep taking ports from under a plan, and are tried from a random
    start (not a secret), so that networks started at the same moment by different runs
    rarely pick the same range."""
    import socket

    step = max(node_ids) + 1
    top = EPHEMERAL_START - max(SERVICE_OFFSETS.values()) - step
    candidates = list(range(10000, top, step))
    first = int.from_bytes(os.urandom(2), "big") % len(candidates)
    for base in candidates[first:] + candidates[:first]:
        try:
            for off in SERVICE_OFFSETS.values():
                for node in node_ids:
                    with socket.socket() as sock:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        sock.bind((host, base + off + node))
        except OSError:
            continue
        return base
    raise UsageError("no free port range for the network on this machine")
