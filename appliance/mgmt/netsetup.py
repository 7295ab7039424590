"""The management plane of a network started by ``qkdn net up``: ``<net>/mgmt``, made ready.

* ``manager.toml``: the QKDN Manager's configuration (``qkdn manager run``): its INFORM
  address (the topology's manager node's ``traps`` address), its HTTPS address (``web``)
  with the manager node's certificate, every KMS node's agent (its ``snmp`` address, the
  manager's polling user there, the user the agent sends INFORMs as), the topology's links
  for the map, two operators' password hashes, and (when the network runs its QKDN
  Controller) the controller's API address and name, for the manager's HTTP/2 link to it
  (:mod:`appliance.mgmt.control`, mutual TLS with the network's CA), and (when it runs
  its AAA device) the AAA agent's address and operator user, for the accounting view;
* ``node-<name>.toml``: each KMS node's agent (``qkdn node run --mgmt``);
* ``operators.txt``: the two operators' passwords, for the person who started the
  network (``operator`` may acknowledge alarms, ``viewer`` only reads).

Fresh random SNMP passphrases and operator passwords at every start; every file is mode
0600 in a 0700 folder.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from appliance.config.topology import Topology
from appliance.mgmt.errors import MgmtError
from appliance.mgmt.web import hash_password

OPERATORS = (("operator", "ack"), ("viewer", "read"))
POLL_S = 30.0
"""The manager's polling period in a network ``qkdn net up`` starts (``--mgmt-poll``)."""


def mgmt_dir(net_dir: Path) -> Path:
    return net_dir / "mgmt"


def node_file(net_dir: Path, name: str) -> Path:
    return mgmt_dir(net_dir) / f"node-{name}.toml"


def _secret() -> str:
    return secrets.token_urlsafe(24)


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _creds(prefix: str, user: str, auth: str, priv: str) -> list[str]:
    return [f"[{prefix}]", f"user = {_q(user)}", f"auth = {_q(auth)}", f"priv = {_q(priv)}"]


def prepare(
    net_dir: Path,
    topo: Topology,
    configs: dict[str, Any],
    *,
    controller: bool = False,
    aaa: bool = False,
    poll_s: float = POLL_S,
) -> dict[str, Path]:
    """Make ``<net>/mgmt`` ready; return each KMS node's agent file by node name
    (``controller``: the network runs its QKDN Controller, the manager reports to it;
    ``aaa``: it runs its AAA device, whose accounting the manager walks; ``poll_s``: the
    manager's polling period)."""
    managers = topo.nodes_with("manager")
    if not managers:
        raise MgmtError(
            f"topology {topo.name} declares no node with the manager role", code="MGMT-TOPOLOGY"
        )
    mcfg = configs[managers[0].name]
    folder = mgmt_dir(net_dir)
    folder.mkdir(mode=0o700, exist_ok=True)
    traps = mcfg.listen["traps"]
    lines = [
        f"traps = {_q(traps)}",
        f"web = {_q(mcfg.listen['web'])}",
        f"cert = {_q(str(mcfg.paths.cert))}",
        f"key = {_q(str(mcfg.paths.key))}",
        f"ca = {_q(str(mcfg.paths.ca_cert))}",
        'db = "manager.db"',
        f"poll_s = {float(poll_s)!r}",
        "links = ["
        + ", ".join(f"{{a = {x.a}, b = {x.b}, name = {_q(x.id)}}}" for x in topo.links)
        + "]",
    ]
    ctl = [c for c in configs.values() if "controller" in c.node.role.split("+")]
    if controller and ctl and "api" in ctl[0].listen:
        lines += [
            "",
            "[controller]",
            f"address = {_q(ctl[0].listen['api'])}",
            f"name = {_q(ctl[0].node.name)}",
        ]
    if aaa:
        lines += _aaa(net_dir)
    out = {}
    for name, cfg in sorted(configs.items(), key=lambda kv: kv[1].node.id):
        if "snmp" not in cfg.listen or not set(cfg.node.role.split("+")) & {"ukms", "akms", "ckms"}:
            continue
        poll = (f"manager-{cfg.node.id}", _secret(), _secret())
        monitor = (f"monitor-{cfg.node.id}", _secret(), _secret())
        notify = (f"notify-{cfg.node.id}", _secret(), _secret())
        lines += [
            "",
            "[[agents]]",
            f"name = {_q(name)}",
            f"id = {cfg.node.id}",
            f"role = {_q(cfg.node.role)}",
            f"address = {_q(cfg.listen['snmp'])}",
            f"cert = {_q(str(cfg.paths.cert))}",
            *_creds("agents.poll", *poll),
            *_creds("agents.notify", *notify),
        ]
        out[name] = node_file(net_dir, name)
        agent = [f"listen = {_q(cfg.listen['snmp'])}", ""]
        for (user, auth, priv), role in ((poll, "manager"), (monitor, "monitor")):
            agent += ["[[users]]", *_creds("", user, auth, priv)[1:], f"role = {_q(role)}", ""]
        agent += [*_creds("inform", *notify), f"address = {_q(traps)}"]
        _private(out[name], agent)
    passwords = {name: _secret() for name, _ in OPERATORS}
    for name, role in OPERATORS:
        lines += [
            "",
            "[[operators]]",
            f"name = {_q(name)}",
            f"role = {_q(role)}",
            f"password = {_q(hash_password(passwords[name]))}",
        ]
    _private(folder / "manager.toml", lines)
    web = mcfg.listen["web"]
    _private(
        folder / "operators.txt",
        [f"# https://{web}/ (the network's CA: pki/ca.pem)"]
        + [f"{name} {passwords[name]} {role}" for name, role in OPERATORS],
    )
    return out


def _aaa(net_dir: Path) -> list[str]:
    """``[aaa]``: the AAA device's agent and its operator user, from ``<net>/aaa/aaa.toml``
    (made ready before this; :mod:`appliance.aaa.netsetup`)."""
    import tomllib

    path = net_dir / "aaa" / "aaa.toml"
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        op = doc["operator"]
        return [
            "",
            "[aaa]",
            f"address = {_q(doc['listen'])}",
            *_creds("", op["user"], op["auth"], op["priv"])[1:],
        ]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise MgmtError(f"{path}: no AAA operator to read accounting as", code="MGMT-AAA") from exc


def _private(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def agent_addresses(net_dir: Path) -> dict[str, str]:
    """Each node agent of ``<net>/mgmt`` (its name, from its file) and its ``snmp`` address."""
    from appliance.mgmt.agent import load_config

    return {
        f.name.removeprefix("node-").removesuffix(".toml"): load_config(f).listen
        for f in sorted(mgmt_dir(net_dir).glob("node-*.toml"))
    }


def silent_agents(agents: dict[str, str], timeout_s: float = 0.5) -> list[str]:
    """The agents among ``agents`` that are not ready: a ready agent answers SNMPv3 engine
    discovery on its address with its own engine ID (:mod:`appliance.snmp.discovery`;
    its users, views and responders are set up before its socket is served)."""
    from appliance.mgmt.agent import engine_id
    from appliance.snmp.discovery import answering

    got = answering(agents, timeout_s)
    return [n for n in agents if not got.get(n, b"").startswith(engine_id(n))]
