"""The SNMPv3 agent with net-snmp's snmpget, snmpwalk and snmpset and the AKMS client as
real peers: the directory, an operator's suspension (revoked by INFORM), the refusals
(v2c, noAuth, wrong keys, unknown users: refused and counted) and VACM per AKMS."""

from __future__ import annotations

import asyncio

from appliance.aaa import mib
from appliance.aaa.client import AaaValidator
from appliance.aaa.ledger import Reason, Refusal
from appliance.aaa.outbox import Outbox
from appliance.aaa.registry import Registry
from appliance.aaa.wallet import Terms
from appliance.kms.relay import Mode
from appliance.kms.seams import Denial, ValidationQuery, Verdict
from tests.aaa.agent_fixture import AKMS, aaa, decided, needs_netsnmp

__all__ = ["aaa"]


def dotted(oid: tuple[int, ...]) -> str:
    return "." + ".".join(map(str, oid))


def name_index(name: str) -> tuple[int, ...]:
    return (len(name), *name.encode())


def counter(aaa, oid: str) -> int:
    out = aaa.snmp("snmpget", oid)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@needs_netsnmp
def test_the_operator_walks_the_directory_and_reads_a_contract(aaa):
    out = aaa.snmp("snmpwalk", dotted(mib.oid("aaaDirectory")))
    assert out.returncode == 0, out.stderr
    assert '"Alice Ltd"' in out.stdout and '"B-bob"' in out.stdout
    assert dotted(mib.oid("aaaUkmsAkms")) + ".15 = Gauge32: 14" in out.stdout
    oid = dotted(mib.oid("aaaContractMaxKeySize") + name_index("alice-2026"))
    got = aaa.snmp("snmpget", oid)
    assert got.returncode == 0 and got.stdout.strip().endswith("Gauge32: 256")
    oid = dotted(mib.oid("aaaContractRoutePolicy") + name_index("bob-2026"))
    got = aaa.snmp("snmpget", oid)
    assert got.returncode == 0 and got.stdout.strip().endswith("INTEGER: 3")  # mostKey(3)
    terms = aaa.call(aaa.client(14).ask(15, "bob-b", "bob-a", 1, 256))  # the fast path
    assert isinstance(terms, Terms) and terms.route_policy == "most-key"


@needs_netsnmp
def test_an_operator_suspends_a_user_with_snmpset_and_the_akms_is_told(aaa):
    client = aaa.client(2)
    terms = aaa.call(client.ask(1, "alice-a", "alice-b", 10, 2560))
    assert isinstance(terms, Terms) and terms.keys == 10
    oid = dotted(mib.oid("aaaUserSuspended") + name_index("alice"))
    fast = aaa.agent.served.fast.answered
    out = aaa.snmp("snmpset", oid, "i", "1")
    assert out.returncode == 0, out.stderr
    assert aaa.agent.served.fast.answered == fast + 1  # net-snmp's SET took the fast path
    assert aaa.events[2].wait(5.0), "no aaaQuotaRevoked INFORM within 5 s"
    assert aaa.revoked[2] == [("alice-2026", terms.grant)]
    reg = Registry(aaa.db)
    assert reg.user("alice").suspended
    reg.close()
    again = aaa.call(client.ask(1, "alice-a", "alice-b", 10, 2560))
    assert isinstance(again, Refusal) and again.reason == Reason.SUSPENDED
    assert counter(aaa, dotted((*mib.oid("aaaInformsAcknowledged"), 0))) == 1


@needs_netsnmp
def test_a_suspension_by_the_command_line_is_also_revoked(aaa):
    client = aaa.client(2)
    terms = aaa.call(client.ask(1, "alice-a", "alice-b", 10, 2560))
    reg = Registry(aaa.db)
    reg.set_contract("alice-2026", keys_per_day=5)
    reg.close()
    assert aaa.events[2].wait(5.0)
    assert aaa.revoked[2] == [("alice-2026", terms.grant)]
    assert aaa.revoked[14] == []


@needs_netsnmp
def test_v1_v2c_noauth_wrong_keys_and_unknown_users_are_refused_and_counted(aaa):
    usm = "1.3.6.1.6.3.15.1.1"
    before = {n: counter(aaa, f".{usm}.{n}.0") for n in (1, 3, 5)}
    bad_community = counter(aaa, ".1.3.6.1.2.1.11.4.0")
    target = f"127.0.0.1:{aaa.port}"
    oid = dotted((*mib.oid("aaaUkmsAkms"), 1))
    for version in ("1", "2c"):
        assert aaa.raw("snmpget", "-v", version, "-c", "public", target, oid).returncode != 0
    no_auth = aaa.raw("snmpget", "-v3", "-l", "noAuthNoPriv", "-u", "operator", target, oid)
    assert no_auth.returncode != 0
    wrong = aaa.raw(
        "snmpget",
        "-v3",
        "-l",
        "authPriv",
        "-u",
        "operator",
        "-a",
        "SHA-256",
        "-A",
        "not-the-key",
        "-x",
        "AES",
        "-X",
        "not-the-key",
        target,
        oid,
    )
    assert wrong.returncode != 0
    nobody = aaa.raw(
        "snmpget",
        "-v3",
        "-l",
        "authPriv",
        "-u",
        "nobody",
        "-a",
        "SHA-256",
        "-A",
        "whatever1",
        "-x",
        "AES",
        "-X",
        "whatever1",
        target,
        oid,
    )
    assert nobody.returncode != 0
    after = {n: counter(aaa, f".{usm}.{n}.0") for n in (1, 3, 5)}
    assert after[1] > before[1]  # usmStatsUnsupportedSecLevels
    assert after[3] > before[3]  # usmStatsUnknownUserNames
    assert after[5] > before[5]  # usmStatsWrongDigests
    assert counter(aaa, ".1.3.6.1.2.1.11.4.0") >= bad_community + 2  # snmpInBadCommunityNames


@needs_netsnmp
def test_an_akms_validates_for_its_own_ukms_only_and_never_reads_contracts(aaa):
    akms2 = AKMS[2]
    own = aaa.client(2)
    assert isinstance(aaa.call(own.ask(1, "alice-a", "alice-b", 1, 256)), Terms)
    # AKMS 2 asking for UKMS 15 (behind AKMS 14): outside its view
    index = mib.encode_index(
        [mib.load()[n] for n in mib.load()["aaaQuotaEntry"].index],
        [15, 99, b"alice-b", b"alice-a", 1, 256],
    )
    out = aaa.snmp("snmpget", dotted(mib.oid("aaaQuotaReason") + index), user=akms2)
    assert "No Such Object" in out.stdout
    walk = aaa.snmp("snmpwalk", dotted(mib.oid("aaaContracts")), user=akms2)
    assert dotted(mib.oid("aaaContractTable")) not in walk.stdout
    assert "No Such Object" in walk.stdout
    suspend = dotted(mib.oid("aaaUserSuspended") + name_index("alice"))
    refused = aaa.snmp("snmpset", suspend, "i", "1", user=akms2)
    assert refused.returncode != 0 and "noAccess" in refused.stderr
    # the same ask through AKMS 14's user (UKMS 15 is its own) is granted: none(0)
    other = aaa.snmp("snmpget", dotted(mib.oid("aaaQuotaReason") + index), user=AKMS[14])
    assert other.stdout.strip().endswith("INTEGER: 0")


@needs_netsnmp
def test_reports_are_counted_once_and_closing_settles_the_grant(aaa):
    client = aaa.client(2)
    t = aaa.call(client.ask(1, "alice-a", "alice-b", 10, 2560))
    for _ in range(2):  # a retried report
        aaa.call(
            client.report(
                1,
                "req-1",
                master="alice-a",
                slave="alice-b",
                outcome="delivered",
                keys=2,
                bits=512,
                grant=t.grant,
            )
        )
    aaa.call(
        client.report(
            1, "req-2", master="alice-a", slave="alice-b", outcome="refused", reason=Reason.LIMITS
        )
    )
    odd = "bob b"  # a name aaaUsageRecord cannot carry (a space): sent as the columns
    aaa.call(client.report(1, "req-3", master=odd, slave="alice-b", outcome="refused", reason=1))
    record = aaa.snmp("snmpget", dotted((*mib.oid("aaaUsageRecord"), 1, *name_index("req-1"))))
    assert record.stdout.strip().endswith(f'STRING: "alice-a alice-b 1 0 2 512 {t.grant}"')
    master = aaa.snmp("snmpget", dotted((*mib.oid("aaaUsageMaster"), 1, *name_index("req-3"))))
    assert master.stdout.strip().endswith('STRING: "bob b"')
    aaa.call(client.close_grant(1, t.grant, 2, 512))
    walk = aaa.snmp("snmpwalk", dotted(mib.oid("aaaAcctTable")))
    index = name_index("alice-2026") + name_index("alice-a") + name_index("alice-b")
    assert f"{dotted(mib.oid('aaaAcctKeys') + index)} = Counter64: 2" in walk.stdout
    assert f"{dotted(mib.oid('aaaAcctRefusedLimits') + index)} = Counter64: 1" in walk.stdout
    grants = aaa.snmp("snmpwalk", dotted(mib.oid("aaaGrantTable")))
    assert f".{t.grant} =" not in grants.stdout  # settled: no longer open


def test_the_validator_allows_from_quota_and_denies_with_the_etsi_reason(aaa):
    validator = AaaValidator(aaa.client(2))
    q = ValidationQuery(master="alice-a", slave="alice-b", number=2, size=256, ukms=1)
    first = validator.validate(q)
    assert not isinstance(first, Verdict)  # no quota held yet: AAA is asked first
    ok = aaa.call(decided(first))
    assert ok.denied is None and (ok.mode, ok.ukms_b, ok.akms_b) == (Mode.GCM, 15, 14)
    again = aaa.call(_as_called(validator, q))  # from the quota now held: decided at
    # once, no await
    assert isinstance(again, Verdict) and again.denied is None
    too_big = ValidationQuery(master="alice-a", slave="alice-b", number=2, size=512, ukms=1)
    assert aaa.call(decided(validator.validate(too_big))).denied.why == Denial.LIMITS
    too_many = ValidationQuery(master="alice-a", slave="alice-b", number=17, size=256, ukms=1)
    assert aaa.call(decided(validator.validate(too_many))).denied.why == Denial.LIMITS
    stranger = ValidationQuery(master="alice-a", slave="bob-b", number=1, size=256, ukms=1)
    assert aaa.call(decided(validator.validate(stranger))).denied.why == Denial.UNAUTHORISED


def test_an_unreachable_aaa_fails_closed_but_held_quota_may_be_spent(aaa):
    validator = AaaValidator(aaa.client(2))
    q = ValidationQuery(master="alice-a", slave="alice-b", number=1, size=256, ukms=1)
    assert aaa.call(decided(validator.validate(q))).denied is None  # quota held now
    dead = aaa.client(2)
    validator.client = dead
    aaa.call(_retarget(dead))
    assert aaa.call(decided(validator.validate(q))).denied is None  # spent from the held grant
    other = ValidationQuery(master="alice-b", slave="alice-a", number=1, size=256, ukms=1)
    refused = aaa.call(decided(validator.validate(other)))
    assert refused.denied is not None and refused.denied.why == Denial.QUOTA
    assert validator.alarms == 1


async def _as_called(validator: AaaValidator, q: ValidationQuery) -> object:
    """What ``validate`` returns, called in the agent's loop (as the AKMS's loop calls it)."""
    return validator.validate(q)


async def _retarget(client) -> None:
    """Point a client at a port where nothing answers (the discard port)."""
    from pysnmp.entity import config

    config.add_target_address(
        client.engine,
        "aaa",
        config.SNMP_UDP_DOMAIN,
        ("127.0.0.1", 9),
        "aaa-params",
        timeout=20,
        retryCount=0,
    )


def test_the_suspension_race_nothing_passes_once_the_inform_arrived(aaa):
    """Requesters hammer the validator while the operator suspends the user: every
    request validated after the AKMS received the INFORM is refused."""
    validator = AaaValidator(aaa.client(2))
    informed: list[bool] = []
    aaa.hooks[2].append(
        lambda contract, grant: (validator.revoked(contract, grant), informed.append(True))
    )
    q = ValidationQuery(master="alice-a", slave="alice-b", number=1, size=256, ukms=1)
    assert aaa.call(decided(validator.validate(q))).denied is None

    async def hammer() -> list[tuple[bool, bool]]:
        out: list[tuple[bool, bool]] = []
        for _ in range(5000):
            after = bool(informed)
            verdict = await decided(validator.validate(q))
            out.append((after, verdict.denied is None))
            if informed and len(out) > 50 and out[-50][0]:
                break
            await asyncio.sleep(0.001)  # let the INFORM in; bounded by the loop
        return out

    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(1) as pool:
        suspend = pool.submit(
            aaa.snmp, "snmpset", dotted(mib.oid("aaaUserSuspended") + name_index("alice")), "i", "1"
        )
        results = aaa.call(hammer(), timeout=60)
        assert suspend.result(30).returncode == 0
    assert informed, "the INFORM never arrived"
    assert any(allowed for after, allowed in results if not after)
    assert not [r for r in results if r[0] and r[1]], "a request passed after the INFORM"


def test_a_pair_validated_again_under_one_request_is_accounted_once(aaa, tmp_path):
    """An AKMS validates a request once per slave (ETSI 014 Annex B), under the request's
    one number, and reports each slave's pair when the request completes; the same pair
    validated again under that number replaces its entry: it is billed once."""
    outbox = Outbox(tmp_path / "aaa-outbox.db")
    validator = AaaValidator(aaa.client(2), outbox=outbox)
    q = ValidationQuery(master="alice-a", slave="alice-b", number=2, size=256, ukms=1, req=7)
    for _ in range(2):
        assert aaa.call(decided(validator.validate(q))).denied is None
    assert outbox.count == 0
    validator.completed(7, True)
    assert outbox.count == 1
    validator.completed(7, True)  # reported once
    assert outbox.count == 1
    summary = validator.wait_summary()  # what the AKMS logs when it stops
    assert summary["validations"] == 2 and summary["waited"] == 1
    assert {"decide_p50_us", "decide_p99_us", "account_p50_us", "account_p99_us"} <= set(summary)
