"""``qkdn manager``: the records a running manager keeps, read and acknowledged from the
command line; bad input is one line with a code. Also the web application's routes
without sockets: a session that expires on the clock is refused."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.mgmt.manager import ManagerConfig, Operator
from appliance.mgmt.store import LinkSample, Store
from appliance.mgmt.web import Sessions, WebApp, hash_password
from appliance.net.http1 import Message
from tests.cli_run import run


def seeded(net: Path) -> None:
    (net / "mgmt").mkdir(parents=True)
    store = Store(net / "mgmt" / "manager.db")
    store.notify("qkdnLinkDown", "ckms-minden", "major", "link-8-9", "link down")
    store.seen(
        "ckms-minden",
        id=8,
        role="ckms",
        software="qkdn 0.1.0",
        slot="none",
        address="127.0.0.1:1",
        cert_expiry=None,
        reachable=1,
    )
    store.record(
        [
            LinkSample(
                node="ckms-minden",
                link="link-8-9",
                peer=9,
                state="down",
                skr=0,
                qber_ppm=0,
                level=3,
                capacity=10,
                consumed=1,
            )
        ]
    )
    store.close()


def test_alarms_ack_history_inventory(capsys, tmp_path: Path):
    seeded(tmp_path)
    d = ("--dir", str(tmp_path))
    status, out, _ = run(capsys, "manager", "alarms", "--json", *d)
    [alarm] = json.loads(out)
    assert status == 0 and alarm["resource"] == "link-8-9" and alarm["acked_by"] is None
    assert run(capsys, "manager", "ack", str(alarm["id"]), "--as", "alice", *d)[0] == 0
    status, _, err = run(capsys, "manager", "ack", str(alarm["id"]), *d)
    assert status != 0 and "[MGMT-ALARM]" in err and len(err.strip().splitlines()) == 1
    assert "alice" in run(capsys, "manager", "alarms", *d)[1]
    history = json.loads(run(capsys, "manager", "history", "link-8-9", "--json", *d)[1])
    assert [h["level"] for h in history] == [3]
    inventory = json.loads(run(capsys, "manager", "inventory", "--json", *d)[1])
    assert inventory[0]["node"] == "ckms-minden"


def test_bad_input_is_one_line_with_a_code(capsys, tmp_path: Path):
    status, _, err = run(capsys, "manager", "alarms", "--dir", str(tmp_path / "none"))
    assert status != 0 and "[MGMT-DB]" in err and "Traceback" not in err
    status, _, err = run(capsys, "manager", "ack", "twelve", "--dir", str(tmp_path))
    assert status != 0 and "Traceback" not in err
    status, _, err = run(capsys, "manager", "history", "x" * 40, "--dir", str(tmp_path))
    assert status != 0 and "Traceback" not in err


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def request(method: str, target: str, cookie: str = "", body: bytes = b"") -> Message:
    headers = {"cookie": f"qkdn_session={cookie}"} if cookie else {}
    return Message(method, target, headers, body, True)


def test_routes_need_a_live_session_and_the_ack_role(tmp_path: Path):
    cfg = ManagerConfig(
        session_s=60,
        operators=[
            Operator(name="alice", role="ack", password=hash_password("alice-pw")),
            Operator(name="bob", role="read", password=hash_password("bob-pw")),
        ],
    )
    store = Store(tmp_path / "m.db")
    n = store.notify("qkdnLinkDown", "ckms-minden", "major", "link-8-9", "down")
    clock = Clock()
    app = WebApp(cfg, store, Sessions(cfg.session_s, clock))
    assert app.handle(request("GET", "/")).status == 303  # to the login page
    assert app.handle(request("POST", "/login", body=b"user=alice&password=nope")).status == 401
    ok = app.handle(request("POST", "/login", body=b"user=alice&password=alice-pw"))
    assert ok.status == 303 and ok.headers is not None
    cookie = ok.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    assert "HttpOnly" in ok.headers["set-cookie"] and "SameSite=Strict" in ok.headers["set-cookie"]
    state = app.handle(request("GET", "/api/state", cookie))
    assert state.status == 200 and json.loads(state.body)["alarms"][0]["id"] == n
    ack = request("POST", f"/api/alarms/{n}/ack", cookie)
    assert app.handle(ack).status == 403  # without the page's header
    ack.headers["x-qkdn"] = "1"
    assert app.handle(ack).status == 200
    viewer = app.handle(request("POST", "/login", body=b"user=bob&password=bob-pw"))
    assert viewer.headers is not None
    bob = viewer.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    denied = request("POST", f"/api/alarms/{n}/ack", bob)
    denied.headers["x-qkdn"] = "1"
    assert app.handle(denied).status == 403
    clock.t += 61  # the sessions expire
    assert app.handle(request("GET", "/api/state", cookie)).status == 401
    assert app.handle(request("GET", "/", bob)).status == 303
    assert [e["kind"] for e in store.security_events()] == ["login-refused"]
    store.close()


@settings(max_examples=30, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT"]),
    target=st.text(max_size=80).map(lambda t: "/" + t),
    cookie=st.text(max_size=60),
    body=st.binary(max_size=300),
)
def test_any_request_gets_an_answer_never_an_exception(
    tmp_path_factory, method: str, target: str, cookie: str, body: bytes
):
    cfg = ManagerConfig(operators=[Operator(name="alice", role="ack", password="scrypt$x")])
    store = Store(tmp_path_factory.mktemp("fuzz") / "m.db")
    try:
        reply = WebApp(cfg, store, Sessions(60.0)).handle(request(method, target, cookie, body))
        assert reply.status in (200, 303, 400, 401, 403, 404)
    finally:
        store.close()


def test_accounting_per_user_and_per_pair(capsys, tmp_path: Path):
    from appliance.mgmt.accounting import AcctRow

    seeded(tmp_path)
    store = Store(tmp_path / "mgmt" / "manager.db")
    store.set_accounting(
        [
            AcctRow(user="alice", contract="alice-2026", master="alice-a", slave="alice-b",
                    allowed=3, keys=12, bits=3072, refused_quota=1),
            AcctRow(user="alice", contract="alice-2026", master="alice-b", slave="alice-a",
                    allowed=1, keys=4, bits=1024),
        ]
    )  # fmt: skip
    store.close()
    status, out, _ = run(capsys, "manager", "accounting", "--json", "--dir", str(tmp_path))
    [alice] = json.loads(out)
    assert status == 0 and (alice["user"], alice["keys"], alice["allowed"]) == ("alice", 16, 4)
    assert alice["refused_quota"] == 1 and alice["contracts"] == "alice-2026"
    status, out, _ = run(capsys, "manager", "accounting", "--by", "pair", "--dir", str(tmp_path))
    assert status == 0 and len(out.splitlines()) == 2 and "alice-b" in out
    status, _, err = run(capsys, "manager", "accounting", "--by", "sae", "--dir", str(tmp_path))
    assert status == 2 and "invalid choice" in err
