"""The hardening profile of a node image: sandboxed units, firewall, sysctl, mounts.

Everything here is derived from the node's roles and the topology: one systemd unit per
role with an empty capability set and a syscall allow-list; an nftables ruleset whose
input chain opens only the role's ports (from :func:`appliance.config.render.services_of`)
and only to the peers that use them, and whose output chain reaches only the node's
neighbours and data-centre services; kernel hardening through sysctl; a read-only root
and a separate data partition in fstab; no login shell for any account.

This module returns file contents; it never writes files and never opens a port that no
role of the node serves.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from appliance.config.render import RenderPlan, services_of
from appliance.config.topology import Node, Topology
from images.errors import BuildError

UDP_SERVICES = frozenset({"snmp", "traps"})
"""SNMP and its traps run over UDP; every other service is HTTP/2 or gRPC over TCP."""

FORBIDDEN_TOOLS = frozenset(
    {
        "sh",
        "bash",
        "dash",
        "zsh",
        "ksh",
        "csh",
        "tcsh",
        "fish",
        "busybox",
        "toybox",
        "ssh",
        "sshd",
        "scp",
        "sftp",
        "sftp-server",
        "dropbear",
        "dbclient",
        "telnet",
        "telnetd",
        "nc",
        "ncat",
        "netcat",
        "socat",
        "gdb",
        "gdbserver",
        "strace",
        "ltrace",
        "perf",
        "tcpdump",
        "valgrind",
        "bpftrace",
        "su",
        "sudo",
    }
)
"""Executables an appliance image must not contain: shells, remote access, debuggers."""

SANDBOX = [
    ("NoNewPrivileges", "yes"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectProc", "invisible"),
    ("ProcSubset", "pid"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("RemoveIPC", "yes"),
    ("UMask", "0077"),
    ("SystemCallArchitectures", "native"),
    ("SystemCallFilter", "@system-service"),
    (
        "SystemCallFilter",
        "~@privileged @resources @mount @debug @module @raw-io @reboot "
        "@swap @obsolete @cpu-emulation @clock",
    ),
    ("SystemCallErrorNumber", "EPERM"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("ReadWritePaths", "/var/lib/qkdn"),
]
"""Directives every service unit carries (duplicates such as SystemCallFilter accumulate)."""

KMS_DEVICES = ["char-ttyUSB rw", "char-ttyACM rw", "char-usb_device rw"]
"""QKD modules on serial or USB; the smartcard is reached through pcscd's socket."""

SYSCTL = {
    "kernel.kptr_restrict": "2",
    "kernel.dmesg_restrict": "1",
    "kernel.yama.ptrace_scope": "3",
    "kernel.unprivileged_bpf_disabled": "1",
    "net.core.bpf_jit_harden": "2",
    "kernel.kexec_load_disabled": "1",
    "kernel.sysrq": "0",
    "kernel.perf_event_paranoid": "3",
    "kernel.core_pattern": "|/bin/false",
    "fs.suid_dumpable": "0",
    "fs.protected_hardlinks": "1",
    "fs.protected_symlinks": "1",
    "fs.protected_fifos": "2",
    "fs.protected_regular": "2",
    "net.ipv4.ip_forward": "0",
    "net.ipv6.conf.all.forwarding": "0",
    "net.ipv4.conf.all.rp_filter": "1",
    "net.ipv4.conf.default.rp_filter": "1",
    "net.ipv4.conf.all.accept_redirects": "0",
    "net.ipv4.conf.default.accept_redirects": "0",
    "net.ipv6.conf.all.accept_redirects": "0",
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.all.accept_source_route": "0",
    "net.ipv6.conf.all.accept_source_route": "0",
    "net.ipv6.conf.all.accept_ra": "0",
    "net.ipv4.conf.all.log_martians": "1",
    "net.ipv4.icmp_echo_ignore_broadcasts": "1",
    "net.ipv4.tcp_syncookies": "1",
    "net.ipv4.tcp_rfc1337": "1",
}

FSTAB = """\
# Root: the slot's squashfs, read-only, verified block by block by dm-verity.
/dev/mapper/root      /              squashfs  ro,nodev                    0 0
# The only writable storage: key stores and logs on the data partition.
PARTLABEL=qkdn-data   /var/lib/qkdn  ext4      rw,nodev,nosuid,noexec      0 2
tmpfs                 /tmp           tmpfs     rw,nodev,nosuid,noexec,mode=1777  0 0
"""

PASSWD = """\
root:x:0:0:root:/root:/usr/sbin/nologin
qkdn:x:990:990:QKD node services:/var/lib/qkdn:/usr/sbin/nologin
"""
GROUP = "root:x:0:\nqkdn:x:990:\n"


def unit(node: Node, role: str) -> str:
    """The systemd unit running one role of the node, sandboxed."""
    lines = [
        "[Unit]",
        f"Description=QKDN {role} of node {node.name} ({node.id})",
        "After=network-online.target nftables.service",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        "User=qkdn",
        "Group=qkdn",
        "Environment=PYTHONPATH=/usr/lib/qkdn/site-packages",
        f"ExecStart=/usr/lib/qkdn/bin/qkdn node run --role {role} --config /etc/qkdn/node.toml",
        "Restart=on-failure",
        "RestartSec=2",
    ]
    lines += [f"{k}={v}" for k, v in SANDBOX]
    if role in ("ukms", "akms", "ckms"):
        lines += ["PrivateDevices=no", "DevicePolicy=closed"]
        lines += [f"DeviceAllow={d}" for d in KMS_DEVICES]
    else:
        lines.append("PrivateDevices=yes")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def units(node: Node) -> dict[str, str]:
    """File name -> unit text, one unit per role of the node."""
    return {f"qkdn-{role}.service": unit(node, role) for role in sorted(node.roles)}


def sysctl() -> str:
    return "".join(f"{k} = {v}\n" for k, v in SYSCTL.items())


@dataclass(frozen=True)
class Rule:
    """One accept rule: ``direction`` in/out, the peer hosts, the protocol and port."""

    direction: str
    service: str
    proto: str
    port: int
    hosts: tuple[str, ...]
    comment: str


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _ip_family(host: str) -> str:
    try:
        return "ip6" if ipaddress.ip_address(host).version == 6 else "ip"
    except ValueError:
        raise BuildError(f"the firewall needs IP addresses, not host names ({host!r})") from None


def _callers(topo: Topology, node: Node, service: str) -> list[Node]:
    """The nodes that connect to ``service`` of ``node``."""
    neighbours = [peer for _, peer in topo.neighbours(node.id)]
    others = [n for n in topo.spec.nodes if n.id != node.id]
    wanted = {
        "ukms": [p for p in neighbours if "akms" in p.roles],
        "akms": [p for p in neighbours if "ukms" in p.roles]
        + [n for n in others if "akms" in n.roles],
        "ckms": [p for p in neighbours if "ckms" in p.roles],
        "snmp": [n for n in others if "manager" in n.roles]
        + ([n for n in others if "akms" in n.roles] if "aaa" in node.roles else []),
        "api": [n for n in others if "ckms" in n.roles],
        "gnmi": [
            n for n in others if ("controller" if "ckms" in node.roles else "ckms") in n.roles
        ],
        "traps": [n for n in others if services_of(n) and "snmp" in services_of(n)],
    }
    return sorted(set(wanted.get(service, [])), key=lambda n: n.id)


def input_rules(
    topo: Topology, node: Node, plan: RenderPlan, client_nets: dict[str, list[str]]
) -> list[Rule]:
    """Accept rules of the input chain: one per listening service of the node."""
    rules = []
    for service in services_of(node):
        _, port = _host_port(plan.address(node, service))
        proto = "udp" if service in UDP_SERVICES else "tcp"
        if service in ("etsi014", "etsi004", "web"):
            hosts = tuple(client_nets.get(service, []))
            comment = f"{service} from operator-given networks"
        else:
            peers = _callers(topo, node, service)
            hosts = tuple(sorted({_host_port(plan.address(p, service))[0] for p in peers}))
            comment = f"{service} from " + (", ".join(f"{p.name}({p.id})" for p in peers) or "-")
        rules.append(Rule("in", service, proto, port, hosts, comment))
    return rules


def output_rules(
    topo: Topology, node: Node, plan: RenderPlan, doc: dict[str, object]
) -> list[Rule]:
    """Accept rules of the output chain: the node's neighbours and data-centre services."""
    targets: dict[str, str] = {}
    for n in doc.get("neighbours", []):  # type: ignore[attr-defined]
        targets[n["address"]] = f"{n['name']}({n['node']})"
    for role, address in doc.get("services", {}).items():  # type: ignore[attr-defined]
        targets[address] = role
    others = [n for n in topo.spec.nodes if n.id != node.id]
    if "akms" in node.roles:  # the AKMS-AKMS channel spans the network end to end
        targets |= {
            plan.address(n, "akms"): f"{n.name}({n.id})" for n in others if "akms" in n.roles
        }
    if "manager" in node.roles:  # SNMP polling of every managed node
        targets |= {
            plan.address(n, "snmp"): f"{n.name}({n.id})" for n in others if "snmp" in services_of(n)
        }
    rules = []
    for address, name in sorted(targets.items()):
        host, port = _host_port(address)
        service = _service_of_port(port, plan)
        proto = "udp" if service in UDP_SERVICES else "tcp"
        rules.append(Rule("out", service, proto, port, (host,), f"{service} of {name}"))
    return rules


def _service_of_port(port: int, plan: RenderPlan) -> str:
    from appliance.config.render import SERVICE_OFFSETS

    offset = (port - plan.base_port) // 1000 * 1000
    return next((s for s, o in SERVICE_OFFSETS.items() if o == offset), "unknown")


def _rule_line(rule: Rule) -> str:
    key = "saddr" if rule.direction == "in" else "daddr"
    by_family: dict[str, list[str]] = {}
    for host in rule.hosts:
        fam = "ip6" if ":" in host else "ip"
        by_family.setdefault(fam, []).append(host)
    lines = []
    for fam, hosts in sorted(by_family.items()):
        for h in hosts:
            _ip_family(h.split("/")[0])
        lines.append(
            f"\t\t{fam} {key} {{ {', '.join(hosts)} }} {rule.proto} dport {rule.port} "
            f'accept comment "{rule.comment}"'
        )
    if not lines:
        lines.append(f"\t\t# {rule.service} ({rule.proto}/{rule.port}): no peers, stays closed")
    return "\n".join(lines)


ICMP = (
    "\t\tmeta l4proto icmp icmp type { echo-request, destination-unreachable, time-exceeded }"
    " limit rate 10/second accept\n"
    "\t\tmeta l4proto ipv6-icmp icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert,"
    " nd-router-advert, destination-unreachable, packet-too-big, time-exceeded } accept\n"
)


def nftables(node: Node, inputs: list[Rule], outputs: list[Rule]) -> str:
    """The whole ruleset: default drop in every chain, loopback and established allowed."""
    head = (
        "#!/usr/sbin/nft -f\n"
        f"# qkdn hardening profile of node {node.name} ({node.id}), roles {node.role}\n"
        "flush ruleset\n\ntable inet qkdn {\n"
    )
    chain_in = (
        "\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n"
        '\t\tiif "lo" accept\n\t\tct state established,related accept\n'
        "\t\tct state invalid drop\n" + ICMP + "\n".join(_rule_line(r) for r in inputs) + "\n\t}\n"
    )
    chain_fwd = (
        "\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n"
    )
    chain_out = (
        "\tchain output {\n\t\ttype filter hook output priority filter; policy drop;\n"
        '\t\toif "lo" accept\n\t\tct state established,related accept\n'
        "\t\tmeta l4proto { icmp, ipv6-icmp } accept\n"
        + "\n".join(_rule_line(r) for r in outputs)
        + "\n\t}\n"
    )
    return head + chain_in + chain_fwd + chain_out + "}\n"
