"""Benchmark of the smartcard path (hsm issue): DERIVE round trips through pcscd and the
enrollment ceremony of a card pair.

Everything goes through the real PC/SC stack: pyscard -> pcscd -> vpcd -> the emulated
card, which runs as its own process (``qkdn card emulate``), as a real card is its own
processor. pcscd is started if none runs (and stopped at the end). Measured, medians:

  * GET DATA round trip (the smallest APDU): the PC/SC floor;
  * DERIVE round trip (one APDU, user PIN already verified in the same transaction);
  * ``CardPskSource.derive``: what an AKMS pays per session key (one transaction: SELECT,
    VERIFY, DERIVE, VERIFY reset);
  * the applet's DERIVE alone, in-process without I/O (the card's compute share);
  * ``qkdn card enroll`` of a blank pair, in-process with the PTG.3 generator already
    started, the first ceremony of a process (generator start-up included), and the
    whole command as an operator runs it (interpreter start and imports included).

Usage: python bench/card_derive.py [--n 300] [--pairs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import qrng
from appliance import cli
from hsm.apdu import Command, build_tlv
from hsm.applet import AID, FACTORY_PINS, Applet, CardState, Ins, Ref, pin_block
from hsm.card import Card, open_card_psk_source
from hsm.errors import HsmError
from hsm.testing import card_events, ensure_pcscd, vpcd_slots, wait_for_card, wait_for_removal
from hsm.vpcd import READER_OF_PORT

PORTS = (35963, 35964)
PIN, ADMIN, PUK = "246810", "13572468", "97531864"


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


@contextmanager
def emulated_cards(ports: tuple[int, ...]) -> Iterator[list[str]]:
    """Blank emulated cards (one process each) in the readers of ``ports``."""
    readers = [READER_OF_PORT[p] for p in ports]
    before, seen = [card_events(r) for r in readers], []
    procs = []
    try:
        for port in ports:
            command = [sys.executable, "-m", "appliance.cli", "card", "emulate"]
            procs.append(
                subprocess.Popen(
                    [*command, "--port", str(port)],
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        for reader, proc, after in zip(readers, procs, before, strict=True):
            deadline = time.monotonic() + 20
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the emulator for {reader!r} exited ({proc.returncode})")
                try:
                    seen.append(wait_for_card(reader, after, timeout=0.5))
                    break
                except HsmError:
                    if time.monotonic() > deadline:
                        raise
        yield [f"pcsc://{r}" for r in readers]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        for reader, after in zip(readers, seen, strict=False):  # the cards pcscd saw
            wait_for_removal(reader, after)


def personalised_applet() -> Applet:
    """An applet personalised through its own APDUs, user PIN verified (no I/O)."""
    applet = Applet(CardState.blank("BENCH"))
    factory = bytes(pin_block(FACTORY_PINS[Ref.ADMIN_PIN]))
    for cla, ins, p1, p2, data in [
        (0x00, Ins.SELECT, 0x04, 0x0C, AID),
        (0x00, Ins.VERIFY, 0x00, Ref.ADMIN_PIN, factory),
        (0x00, Ins.CHANGE_REFERENCE_DATA, 0x01, Ref.USER_PIN, bytes(pin_block(PIN))),
        (0x00, Ins.CHANGE_REFERENCE_DATA, 0x01, Ref.PUK, bytes(pin_block(PUK))),
        (0x00, Ins.CHANGE_REFERENCE_DATA, 0x00, Ref.ADMIN_PIN, factory + bytes(pin_block(ADMIN))),
        (0x80, Ins.PUT_KEY, 0x80, 1, os.urandom(32)),
        (0x00, Ins.VERIFY, 0x00, Ref.USER_PIN, bytes(pin_block(PIN))),
    ]:
        reply = applet.process(Command(cla=cla, ins=ins, p1=p1, p2=p2, data=data).build())
        assert reply[-2:] == b"\x90\x00", reply.hex()
    return applet


def bench_derive(n: int) -> dict[str, float]:
    with emulated_cards(PORTS[:1]) as (url,), Card.open(url) as card:
        card.personalise(
            transport_admin_pin=FACTORY_PINS[Ref.ADMIN_PIN],
            psk=bytearray(os.urandom(32)),
            pin=PIN,
            admin_pin=ADMIN,
            puk=PUK,
        )
        transport = card.transport
        get_data = Command(cla=0, ins=Ins.GET_DATA, p1=1, p2=2).build()
        body = build_tlv(0x81, b"akms-1|akms-2") + build_tlv(0x82, os.urandom(32))
        derive = Command(cla=0x80, ins=Ins.DERIVE, p1=0, p2=1, data=body, le=32).build()
        with transport.transaction():
            card._select()
            card._verify(Ref.USER_PIN, PIN)
            for _ in range(20):  # warm-up
                transport.transmit(derive)
            floor = timed(lambda: transport.transmit(get_data), n)
            rtt = timed(lambda: transport.transmit(derive), n)
            card._logout(Ref.USER_PIN)
        pin_path = Path(tempfile.mkdtemp()) / "pin"
        pin_path.write_text(PIN)
        pin_path.chmod(0o600)
        source = open_card_psk_source(f"{url}?pin-file={pin_path}")
        try:
            full = timed(lambda: source.derive(b"akms-1|akms-2", os.urandom(32)), n)
        finally:
            source.close()
    applet = personalised_applet()
    inproc = timed(lambda: applet.process(derive), n)
    return {
        "get_data_rtt_ms": median_ms(floor),
        "derive_rtt_ms": median_ms(rtt),
        "derive_rtt_p90_ms": statistics.quantiles(rtt, n=10)[-1] * 1e3,
        "psk_source_derive_ms": median_ms(full),
        "applet_derive_inprocess_ms": median_ms(inproc),
    }


def bench_enroll(pairs: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="card-bench-"))
    key = Ed25519PrivateKey.generate()
    (work / "station.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for role in "ab":
        path = work / f"{role}.pins"
        path.write_text(f"pin=11{role}222\nadmin-pin={role}-admin-77\npuk={role}-puk-9999\n")
        path.chmod(0o600)
    times = []
    qrng._node = None  # the first ceremony of this process starts the PTG.3 generator
    for i in range(pairs + 1):
        with emulated_cards(PORTS) as (url_a, url_b):
            argv = ["card", "enroll", "--pair", "akms-1", "akms-2", "--card-a", url_a]
            argv += ["--card-b", url_b, "--pins-a", str(work / "a.pins")]
            argv += ["--pins-b", str(work / "b.pins"), "--signing-key", str(work / "station.pem")]
            argv += ["--audit", str(work / "audit.jsonl"), "--json"]
            started = time.perf_counter()
            with open(os.devnull, "w") as sink:
                saved, sys.stdout = sys.stdout, sink
                try:
                    status = cli.main(argv)
                finally:
                    sys.stdout = saved
            times.append(time.perf_counter() - started)
            if status != 0:
                raise SystemExit(f"enrollment {i} failed with status {status}")
    command = [sys.executable, "-m", "appliance.cli", *argv[:-1]]  # the operator's view
    whole = []
    for _ in range(3):
        with emulated_cards(PORTS) as (url_a, url_b):
            command[command.index("--card-a") + 1] = url_a
            command[command.index("--card-b") + 1] = url_b
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            whole.append(time.perf_counter() - started)
    return {
        "enroll_command_median_s": statistics.median(whole),
        "enroll_first_s": times[0],
        "enroll_warm_median_s": statistics.median(times[1:]),
        "enroll_warm_max_s": max(times[1:]),
        "pairs": pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="round trips per figure")
    parser.add_argument("--pairs", type=int, default=5, help="enrollments after the first")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with vpcd_slots(), ensure_pcscd() as started:
        derive = bench_derive(args.n)
        enroll = bench_enroll(args.pairs)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "pcscd_started_here": started,
        "n": args.n,
        **derive,
        **enroll,
    }
    for name, value in result.items():
        print(f"{name:32} {value:.3f}" if isinstance(value, float) else f"{name:32} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
