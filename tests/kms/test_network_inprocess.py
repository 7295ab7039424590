"""The whole DemoQuanDT KMS network in one event loop: real TLS, real relay, real stores.

SAE Berlin asks UKMS Berlin for keys (ETSI 014, enc_keys); the request crosses AKMS Berlin,
AKMS Bonn, the CN key relay over 12 carrier hops, KSA delivery to UKMS Bonn; SAE Bonn
then gets the same keys with dec_keys. Each key once, to the named SAE only.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import hal
from appliance.config.render import RenderPlan, find_free_base_port, render
from appliance.config.topology import load_topology
from appliance.kms.network import build_node, is_kms, load_configs, make_pki, provision_psks
from appliance.kms.node import Policy
from appliance.kms.relay import Mode
from hsm.psk import write_psk_file


def free_base_port() -> int:
    return find_free_base_port()


def sae_conn(out: Path, sae: str, port: int) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(out / "pki" / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(out / "pki" / "saes" / f"{sae}.pem", out / "pki" / "saes" / f"{sae}.key")
    return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)


def call(conn: http.client.HTTPSConnection, method: str, path: str, body=None) -> tuple[int, dict]:
    conn.request(
        method,
        path,
        body=None if body is None else json.dumps(body),
        headers={"Content-Type": "application/json"} if body is not None else {},
    )
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def run_network(
    tmp_path: Path,
    policy: Policy,
    saes: Callable[[int, int], None],
    edit: Callable[[Path], None] | None = None,
    split_access: bool = False,
) -> None:
    """Render DemoQuanDT, issue its PKI, start every KMS node in one event loop with full
    link stores, run ``saes(port_berlin, port_bonn)`` in a thread, stop the nodes.
    ``edit(out)`` may change the rendered files first."""
    topo = load_topology("demoquandt")
    render(topo, RenderPlan(out=tmp_path, base_port=free_base_port(), start=0.0))
    if edit is not None:
        edit(tmp_path)
        topo = load_topology(str(tmp_path / "topology.toml"))
    configs = load_configs(tmp_path)
    make_pki(topo, configs, os.urandom)
    provision_psks(configs, os.urandom)
    clock = hal.ManualClock(3600.0)  # an hour of distillation: full link stores
    ports = [
        int(configs[n].listen["etsi014"].rsplit(":", 1)[1]) for n in ("ukms-berlin", "ukms-bonn")
    ]

    async def main() -> None:
        split = ("akms", "ckms") if split_access else (None,)
        nodes = [
            build_node(c, topo, os.urandom, clock=clock, policy=policy, only=only)
            for c in configs.values()
            if is_kms(c)
            for only in (split if c.node.role == "akms+ckms" else (None,))
        ]
        for node in nodes:
            await node.start()
        try:
            await asyncio.to_thread(saes, *ports)
        finally:
            for node in nodes:
                await node.close()

    asyncio.run(main())


@pytest.mark.parametrize("mode", [Mode.GCM, Mode.OTP])
def test_keys_cross_the_whole_network(tmp_path, mode):
    def saes(port_a: int, port_b: int) -> None:
        a = sae_conn(tmp_path, "sae-berlin-1", port_a)
        status, doc = call(a, "GET", "/api/v1/keys/sae-bonn-1/enc_keys?number=4&size=256")
        assert status == 200, doc
        ids = [k["key_ID"] for k in doc["keys"]]
        b = sae_conn(tmp_path, "sae-bonn-1", port_b)
        status, got = call(
            b,
            "POST",
            "/api/v1/keys/sae-berlin-1/dec_keys",
            {"key_IDs": [{"key_ID": i} for i in ids]},
        )
        assert status == 200 and got["keys"] == doc["keys"]
        assert all(len(base64.b64decode(k["key"])) == 32 for k in got["keys"])
        assert call(b, "GET", f"/api/v1/keys/sae-berlin-1/dec_keys?key_ID={ids[0]}")[0] == 401
        other = sae_conn(tmp_path, "sae-bonn-2", port_b)  # another user's SAE
        path = f"/api/v1/keys/sae-berlin-1/dec_keys?key_ID={ids[1]}"
        assert call(other, "GET", path)[0] in (400, 401)
        text = json.dumps(doc) + json.dumps(got)
        assert not any(n in text for n in ("ckms", "akms", "link-"))  # invariant 4

    run_network(tmp_path, Policy(mode=mode), saes)


def test_enc_keys_are_served_from_a_pre_buffered_stock(tmp_path):
    """UKMS Berlin keeps a stock per SAE pair; SAE Bonn finds the same keys at UKMS Bonn."""

    def saes(port_a: int, port_b: int) -> None:
        a = sae_conn(tmp_path, "sae-berlin-1", port_a)
        for _ in range(100):
            _, status = call(a, "GET", "/api/v1/keys/sae-bonn-1/status")
            if status["stored_key_count"] >= 8:
                break
            time.sleep(0.1)
        assert status["stored_key_count"] >= 8
        code, doc = call(a, "GET", "/api/v1/keys/sae-bonn-1/enc_keys?number=4")
        assert code == 200
        b = sae_conn(tmp_path, "sae-bonn-1", port_b)
        ids = [{"key_ID": k["key_ID"]} for k in doc["keys"]]
        code, got = call(b, "POST", "/api/v1/keys/sae-berlin-1/dec_keys", {"key_IDs": ids})
        assert code == 200 and got["keys"] == doc["keys"]

    run_network(tmp_path, Policy(stock=8), saes)


def test_an_access_node_with_another_psk_is_refused_and_alarms(tmp_path, caplog):
    """AKMS Bonn holds a different PSK than AKMS Berlin: the channel does not open, the
    request fails with a clean 503, an integrity alarm is logged, and no key is issued."""

    def other_psk(out: Path) -> None:
        config = out / "nodes" / "akms-bonn.toml"
        text = config.read_text()
        shared = "psk-akms-berlin-akms-bonn.hex"
        assert shared in text
        config.write_text(text.replace(shared, "psk-forged.hex"))
        write_psk_file(out / "secrets" / "psk-forged.hex", os.urandom(32))

    def saes(port_a: int, port_b: int) -> None:
        a = sae_conn(tmp_path, "sae-berlin-1", port_a)
        status, doc = call(a, "GET", "/api/v1/keys/sae-bonn-1/enc_keys")
        assert status == 503 and set(doc) == {"message"} | ({"details"} & set(doc)), doc
        status, doc = call(a, "GET", "/api/v1/keys/sae-bonn-1/status")
        assert status == 200 and doc["stored_key_count"] == 0

    with caplog.at_level("ERROR", logger="qkdn.kms"):
        run_network(tmp_path, Policy(), saes, edit=other_psk)
    assert any(r.getMessage() == "integrity alarm" for r in caplog.records)


def test_a_contract_chooses_its_users_relay_mode(tmp_path, monkeypatch):
    """The network relays in GCM; the demo users' contract asks for OTP: their keys cross
    every hop under one-time pads, and the other user's keys under GCM."""
    import appliance.kms.engines.base as node_module  # where the engines find them

    sealed: list[Mode] = []
    for name, mode in (("seal_otp", Mode.OTP), ("seal_gcm", Mode.GCM)):
        real = getattr(node_module, name)

        def counting(*args, _real=real, _mode=mode):
            sealed.append(_mode)
            return _real(*args)

        monkeypatch.setattr(node_module, name, counting)

    def otp_for_demo_users(out: Path) -> None:
        topo_file = out / "topology.toml"
        text = topo_file.read_text()
        anchor = 'id = "demo-2026"\n'
        assert anchor in text
        topo_file.write_text(text.replace(anchor, anchor + 'relay_mode = "otp"\n'))

    def saes(port_a: int, port_b: int) -> None:
        a = sae_conn(tmp_path, "sae-berlin-1", port_a)
        assert call(a, "GET", "/api/v1/keys/sae-bonn-1/enc_keys")[0] == 200  # warms the channel
        sealed.clear()
        assert call(a, "GET", "/api/v1/keys/sae-bonn-1/enc_keys")[0] == 200
        assert sealed and set(sealed) == {Mode.OTP}, sealed  # 12 hops, delivery, UKMS link
        sealed.clear()
        bank = sae_conn(tmp_path, "sae-berlin-2", port_a)
        assert call(bank, "GET", "/api/v1/keys/sae-bonn-2/enc_keys")[0] == 200
        assert sealed and set(sealed) == {Mode.GCM}, sealed

    run_network(tmp_path, Policy(mode=Mode.GCM), saes, edit=otp_for_demo_users)


def test_a_hop_that_cannot_forward_fails_the_request_at_once(tmp_path, monkeypatch):
    """Hops answer before forwarding (a pipelined chain), so a hop that cannot forward
    sends an abort back along the path: the SAE gets a clean 503 without the CN-key
    timeout (made endless here: only the abort can end the request; the SAE's client
    timeout turns a missing abort into a failure), no key is issued, and requests succeed
    again once the link recovers."""
    from appliance.kms.errors import KeyUnavailable
    from appliance.kms.events import LinkKeysRead
    from appliance.kms.linkend import LinkEnd
    from appliance.kms.node import KmsNode

    monkeypatch.setattr(Policy, "cn_timeout", property(lambda _policy: 3600.0))

    broken = {"on": False}
    real_shortfall, real_read = LinkEnd.shortfall, KmsNode._read_keys

    def shortfall(self, mode, payload, now):  # link 7-8 has no key left to send with...
        if broken["on"] and self.link == "link-7-8":
            return 32
        return real_shortfall(self, mode, payload, now)

    def read_keys(self, service, read):  # ...and its module none to give
        if broken["on"] and read.link == "link-7-8":
            error = KeyUnavailable("link-7-8: no link key (test)")
            self._work.append((service, LinkKeysRead(ticket=read.ticket, error=error)))
            return
        real_read(self, service, read)

    monkeypatch.setattr(LinkEnd, "shortfall", shortfall)
    monkeypatch.setattr(KmsNode, "_read_keys", read_keys)

    def saes(port_a: int, port_b: int) -> None:
        a = sae_conn(tmp_path, "sae-berlin-1", port_a)
        assert call(a, "GET", "/api/v1/keys/sae-bonn-1/enc_keys")[0] == 200
        broken["on"] = True
        status, doc = call(a, "GET", "/api/v1/keys/sae-bonn-1/enc_keys")
        assert status == 503 and "message" in doc, doc  # the hop waited `patience`, aborted
        assert "link" not in doc["message"] and "ckms" not in json.dumps(doc)
        broken["on"] = False
        status, doc = call(a, "GET", "/api/v1/keys/sae-bonn-1/enc_keys")
        assert status == 200
        b = sae_conn(tmp_path, "sae-bonn-1", port_b)
        path = f"/api/v1/keys/sae-berlin-1/dec_keys?key_ID={doc['keys'][0]['key_ID']}"
        assert call(b, "GET", path) == (200, doc)

    run_network(tmp_path, Policy(mode=Mode.GCM, patience=1.0), saes)


@pytest.mark.parametrize("mode", [Mode.GCM, Mode.OTP])
def test_access_nodes_split_into_akms_and_ckms_processes(tmp_path, mode):
    """Each access node as two services (own links each, CN keys handed over locally):
    keys still cross, both directions, and the channel re-keys over the relay."""

    def saes(port_a: int, port_b: int) -> None:
        a = sae_conn(tmp_path, "sae-berlin-1", port_a)
        b = sae_conn(tmp_path, "sae-bonn-1", port_b)
        for master, slave, there in ((a, "sae-bonn-1", b), (b, "sae-berlin-1", a)):
            status, doc = call(master, "GET", f"/api/v1/keys/{slave}/enc_keys?number=2")
            assert status == 200, doc
            me = "sae-berlin-1" if slave == "sae-bonn-1" else "sae-bonn-1"
            ids = [{"key_ID": k["key_ID"]} for k in doc["keys"]]
            got = call(there, "POST", f"/api/v1/keys/{me}/dec_keys", {"key_IDs": ids})
            assert got == (200, doc)

    run_network(tmp_path, Policy(mode=mode), saes, split_access=True)
