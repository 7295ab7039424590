"""Benchmark and fuzzer of the device drivers (issue 4).

Measures, on this machine and in one run:
  * raw pty throughput (the emulated QRNG streams its samples into a pty, pyserial reads
    them) against the framed serial driver reading the same samples over the same kind of
    pty: the frame protocol's overhead. In both, the writer (raw stream, or the firmware)
    is a forked process, as a device is its own processor; 32 MiB of 8-bit samples, in
    interleaved pairs, the medians reported;
  * the USB driver's sample throughput over the fake pyusb backend (in-process: no bus);
  * keys per second through serial over a pty, USB over the fake backend, and ETSI 014 over
    mutual TLS (the driver's defaults: one kept-alive connection, 32 keys per enc_keys;
    ``bench/etsi014_driver.py`` measures that driver on its own);
  * the frame codec alone (encode + decode of 64 KiB frames).
With ``--fuzz N`` it instead runs N Hypothesis cases against each of the frame parsers
(host and firmware) and the ETSI 014 JSON parsers, and reports any crash (an exception
that is not a HalError). Usage: python bench/hal_drivers.py [--json PATH] [--fuzz N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

import serial

import hal
from hal.emulated.firmware_host import PtyDevice, PtyDeviceProcess, make_device
from hal.emulated.kme014 import EmulatedKme
from hal.emulated.pki import make_pki
from hal.emulated.usb_backend import FakeUsbBackend, FakeUsbDevice
from hal.firmware.device import Device
from hal.usb_driver import register_backend

MB = 1e6
TOTAL = 32 * 1024 * 1024  # samples (bytes at 8 bits) per throughput run
REPEATS = 3
PAIRS = 9  # raw/framed pairs: on a shared 2-core machine one pair varies by +-20 %
QRNG = "emulated-qrng://bench?seed=bench&bits=8"
LINK = "emulated://bench-link?skr=1e8&seed=bench&end={end}"


def best(fn: Callable[[], float]) -> float:
    """Median of REPEATS runs of a rate measurement."""
    return statistics.median(fn() for _ in range(REPEATS))


def _stream_samples(master: int, go: Any, chunk: int) -> None:
    """Child process of the raw baseline: write TOTAL QRNG samples into the pty, unframed."""
    qrng = hal.open_entropy_source(QRNG)
    go.wait()
    sent = 0
    while sent < TOTAL:
        data = memoryview(qrng.read(min(chunk, TOTAL - sent)).tobytes())
        sent += len(data)
        while data:
            data = data[os.write(master, data) :]


def raw_pty_rate(chunk: int = 65535) -> float:
    """Bytes/s of QRNG samples streamed through a raw pty into pyserial, no framing.

    The writer is a forked process, like the framed run's device (:func:`framed_pty_rate`);
    the clock starts when it is told to go, with its noise source already built."""
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    port = serial.Serial(os.ttyname(slave), timeout=1)
    context = multiprocessing.get_context("fork")
    go = context.Event()
    writer = context.Process(target=_stream_samples, args=(master, go, chunk), daemon=True)
    writer.start()
    time.sleep(0.2)  # let the child build its noise source before the clock starts
    start = time.perf_counter()
    go.set()
    got = 0
    while got < TOTAL:
        got += len(port.read(max(1, min(port.in_waiting, TOTAL - got))))
    elapsed = time.perf_counter() - start
    writer.join()
    port.close()
    os.close(master)
    os.close(slave)
    return TOTAL / elapsed


def framed_pty_rate() -> float:
    """Bytes/s of samples through the serial driver (frames, CRC, request/response).

    The firmware runs in a forked process (:class:`PtyDeviceProcess`), as the raw
    baseline's writer does; the clock starts after the driver's INFO handshake."""

    def device() -> Device:
        return make_device("bench", qrng=hal.open_entropy_source(QRNG))

    with PtyDeviceProcess(device) as dev:
        source = hal.open_entropy_source(f"serial://{dev.path}")
        start = time.perf_counter()
        source.read(TOTAL)
        elapsed = time.perf_counter() - start
        source.close()
    return TOTAL / elapsed


def usb_rate() -> float:
    qrng = hal.open_entropy_source(QRNG)
    dev = FakeUsbDevice(make_device("bench", qrng=qrng), vid=0x1209, pid=0x0A51, serial="B")
    unregister = register_backend("bench", FakeUsbBackend([dev]))
    try:
        source = hal.open_entropy_source("usb://1209:0a51?backend=bench")
        start = time.perf_counter()
        source.read(TOTAL)
        return TOTAL / (time.perf_counter() - start)
    finally:
        unregister()


def keys_per_second(qkdm: hal.Qkdm, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        qkdm.get_key().erase()
    return n / (time.perf_counter() - start)


def key_rates() -> dict[str, float]:
    clock = hal.ManualClock(0)
    a = hal.open_qkdm(LINK.format(end="a"), clock=clock)
    b = hal.open_qkdm(LINK.format(end="b"), clock=clock)
    clock.advance(100)
    rates: dict[str, float] = {}
    with PtyDevice(make_device("bench", qkdm=a)) as dev:
        rates["serial_pty_keys_per_s"] = keys_per_second(
            hal.open_qkdm(f"serial://{dev.path}"), 2000
        )
    usb_dev = FakeUsbDevice(make_device("bench", qkdm=a), vid=0x1209, pid=0x0A51, serial="K")
    unregister = register_backend("bench-keys", FakeUsbBackend([usb_dev]))
    rates["usb_fake_keys_per_s"] = keys_per_second(
        hal.open_qkdm("usb://1209:0a51?backend=bench-keys"), 2000
    )
    unregister()
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp), ["kms-a", "kms-b"])
        kme = EmulatedKme(
            master=a, slave=b, master_sae="kms-a", slave_sae="kms-b",
            server_pem=pki.server, ca_pem=pki.ca,
        )  # fmt: skip
        with kme:
            url = (
                f"etsi014+https://127.0.0.1:{kme.port}?sae=kms-a&peer_sae=kms-b"
                f"&cert={pki.clients['kms-a']}&ca={pki.ca}"
            )
            rates["etsi014_tls_keys_per_s"] = keys_per_second(hal.open_qkdm(url), 200)
    return rates


def codec_rate() -> float:
    from hal.frames import FrameDecoder, encode_frame

    payload = os.urandom(65535)
    decoder = FrameDecoder()
    n = 400
    start = time.perf_counter()
    for seq in range(n):
        decoder.receive_data(encode_frame(0x90, seq, payload))
    return n * len(payload) / (time.perf_counter() - start)


# -- fuzzing ---------------------------------------------------------------------------------
def fuzz(n: int) -> dict[str, Any]:
    """Run ``n`` Hypothesis cases per target; report counts and any crash."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from hal import etsi014
    from hal.errors import HalError
    from hal.firmware import protocol as wire
    from hal.frames import FrameDecoder, encode_frame, parse_frame

    cfg = settings(
        max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    counts: dict[str, int] = {}
    frame = st.builds(
        lambda t, s, p: encode_frame(t, s, p),
        st.sampled_from([*wire.REQUEST_TYPES, 0x83, 0x82, 0x91, 0xFF, 0x7E]),
        st.integers(0, 0xFFFF),
        st.binary(max_size=64),
    )
    mutated = st.tuples(st.lists(st.one_of(frame, st.binary(max_size=24)), max_size=6),
                        st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
                        st.integers(1, 40))  # fmt: skip

    @cfg
    @given(mutated)
    def frames(case: tuple[list[bytes], list[tuple[int, int]], int]) -> None:
        parts, flips, step = case
        data = bytearray(b"".join(parts))
        for at, value in flips:
            if data:
                data[at % len(data)] = value
        decoder, parser = FrameDecoder(), wire.Parser()
        for i in range(0, len(data), step):
            decoder.receive_data(bytes(data[i : i + step]))
            parser.feed(bytes(data[i : i + step]))
        decoder.give_up_partial()
        parser.drop_partial()
        with contextlib.suppress(HalError):
            parse_frame(bytes(data))
        counts["frames"] = counts.get("frames", 0) + 1

    leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
    docs = st.recursive(
        leaf, lambda k: st.lists(k, max_size=4) | st.dictionaries(st.text(max_size=16), k),
        max_leaves=25,
    )  # fmt: skip
    key_item = st.fixed_dictionaries(
        {"key_ID": st.one_of(st.uuids().map(str), st.text(max_size=40)),
         "key": st.one_of(st.binary(min_size=0, max_size=40).map(
             lambda b: __import__("base64").b64encode(b).decode()), st.text(max_size=50))},
    )  # fmt: skip
    bodies = st.one_of(
        st.binary(max_size=300),
        docs.map(lambda d: json.dumps(d).encode()),
        st.lists(key_item, max_size=3).map(lambda ks: json.dumps({"keys": ks}).encode()),
    )

    @cfg
    @given(bodies, st.integers(1, 3))
    def json_parsers(body: bytes, number: int) -> None:
        for parse in (
            lambda: etsi014.parse_keys(body, number=number, size_bits=256),
            lambda: etsi014.parse_status(body),
        ):
            with contextlib.suppress(HalError):
                parse()
        etsi014.error_for(400, body, "fuzz")
        counts["etsi014_json"] = counts.get("etsi014_json", 0) + 1

    result: dict[str, Any] = {"requested_cases_per_target": n}
    for name, target in (("frames", frames), ("etsi014_json", json_parsers)):
        start = time.perf_counter()
        try:
            target()
            result[name] = {"crash": None}
        except Exception as exc:  # a crash is the finding, reported not raised
            result[name] = {"crash": f"{type(exc).__name__}: {exc}"[:500]}
        result[name]["cases"] = counts.get(name, 0)
        result[name]["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fuzz", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.fuzz:
        results: dict[str, Any] = {"fuzz": fuzz(args.fuzz)}
    else:
        # Interleaved pairs: the machine's load drifts, so compare runs made back to back.
        pairs = [(raw_pty_rate(), framed_pty_rate()) for _ in range(PAIRS)]
        raw = statistics.median(r for r, _ in pairs)
        framed = statistics.median(f for _, f in pairs)
        overhead = statistics.median(1 - f / r for r, f in pairs)
        results = {
            "raw_pty_MB_s": round(raw / MB, 1),
            "serial_pty_framed_MB_s": round(framed / MB, 1),
            "frame_overhead_pct": round(100 * overhead, 1),
            "frame_overhead_pairs_pct": [round(100 * (1 - f / r), 1) for r, f in pairs],
            "usb_fake_backend_MB_s": round(best(usb_rate) / MB, 1),
            "frame_codec_MB_s": round(codec_rate() / MB, 1),
            **{k: round(v) for k, v in key_rates().items()},
        }
    results["machine"] = (
        f"{platform.machine()} {os.cpu_count()} CPU, Python {sys.version.split()[0]}"
    )
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
