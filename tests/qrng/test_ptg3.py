"""The PTG.3 generator: reseed before every request, limits, fail closed, threads, asyncio."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import hal
import qrng
from qrng.conditioning import CbcMacConditioner, Sha512Conditioner, make_conditioner
from qrng.drbg import MAX_REQUEST_BITS, CtrDrbg
from qrng.errors import EntropySourceFailure, GeneratorTimeout, QrngUsageError
from qrng.health import HealthState
from qrng.ptg3 import Ptg3Generator
from qrng.selftest import run_kats


def generator(query: str = "", **options: object) -> Ptg3Generator:
    url = "emulated-qrng://g?seed=9" + (f"&{query}" if query else "")
    return Ptg3Generator(hal.open_entropy_source(url), **options)  # type: ignore[arg-type]


class SpyDrbg(CtrDrbg):
    """Records the order and sizes of reseeds and generates."""

    def __init__(self) -> None:
        super().__init__(256)
        self.calls: list[tuple[str, int, bytes]] = []

    def reseed(self, entropy: bytes, additional: bytes = b"") -> None:
        self.calls.append(("reseed", len(entropy), entropy))
        super().reseed(entropy, additional)

    def generate(self, n: int, additional: bytes = b"") -> bytes:
        self.calls.append(("generate", n, b""))
        return super().generate(n, additional)


def test_every_request_is_preceded_by_a_reseed_at_least_as_long():
    gen = generator()
    spy = SpyDrbg()
    spy.instantiate(bytes(48), bytes(16))
    gen._drbg = spy
    out = gen.random_bytes(200_000) + gen.random_bytes(10) + gen.random_bytes(65536)
    assert len(out) == 265_546
    kinds = [c[0] for c in spy.calls]
    assert kinds == ["reseed", "generate"] * (len(kinds) // 2)
    for (_, seed_len, _), (_, n, _) in zip(spy.calls[::2], spy.calls[1::2], strict=True):
        assert n * 8 <= MAX_REQUEST_BITS and seed_len >= max(n, 48)
    seeds = [c[2] for c in spy.calls if c[0] == "reseed"]
    assert len(set(seeds)) == len(seeds)  # fresh entropy each time, never reused


def test_output_is_not_degenerate():
    data = np.frombuffer(generator().random_bytes(1 << 20), dtype=np.uint8)
    ones = np.unpackbits(data).mean()
    assert abs(ones - 0.5) < 0.002 and len(np.unique(data)) == 256


@pytest.mark.parametrize("kind", ["total", "burst", "saturation", "stuck"])
def test_a_failing_source_fails_closed_until_recovery(kind):
    gen = generator()
    gen.random_bytes(1000)
    gen.source.inject(kind)  # type: ignore[attr-defined]
    with pytest.raises(EntropySourceFailure):
        for _ in range(40):
            gen.random_bytes(1 << 16)
    assert gen.state is HealthState.FAILED
    with pytest.raises(EntropySourceFailure, match="output refused"):
        gen.random_bytes(1)
    report = gen.health()
    assert report["state"] == "failed" and report["reason"].startswith("operation: ")
    gen.source.clear_fault()  # type: ignore[attr-defined]
    gen.recover()
    assert gen.state is HealthState.HEALTHY and len(gen.random_bytes(100)) == 100
    assert gen.health()["counters"]["startups"] == 2


def test_a_dead_source_never_starts():
    with pytest.raises(EntropySourceFailure, match="start-up"):
        generator("fault=total")


def test_throttled_source_times_out_cleanly():
    gen = generator("rate=2000000", block_samples=65536)
    with pytest.raises(GeneratorTimeout):
        gen.random_bytes(10 << 20, timeout=0.05)


def test_threads_and_asyncio_share_one_generator():
    gen = generator()
    results: list[bytes] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            chunk = gen.random_bytes(512)
            with lock:
                results.append(chunk)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    async def many() -> list[bytes]:
        return list(await asyncio.gather(*(gen.arandom_bytes(512) for _ in range(20))))

    results += asyncio.run(many())
    assert len(results) == 140 and len(set(results)) == 140
    assert gen.bytes_out == 140 * 512 and gen.requests == 140


def test_claims_and_options_are_checked():
    with pytest.raises(QrngUsageError, match="exceeds the source model"):
        generator(claimed_entropy=7.9)
    with pytest.raises(QrngUsageError, match="block_samples"):
        generator(block_samples=1000)
    with pytest.raises(QrngUsageError, match="unknown conditioner"):
        generator(conditioner="md5")
    with pytest.raises(QrngUsageError):
        generator().random_bytes(-1)
    assert generator(claimed_entropy=4.0).health()["claimed_entropy"] == 4.0


@pytest.mark.parametrize("cls, out", [(CbcMacConditioner, 16), (Sha512Conditioner, 64)])
@pytest.mark.parametrize("h, bits", [(5.9, 8), (13.9, 16), (1.0, 1), (0.5, 8)])
def test_conditioning_feeds_n_out_plus_64_bits(cls, out, h, bits):
    c = cls(h, bits)
    assert c.input_entropy >= 8 * out + 64
    x = np.random.default_rng(1).integers(0, 1 << bits, c.samples_per_block * 10, dtype=np.uint16)
    x = x.astype(np.uint8 if bits <= 8 else np.uint16)
    assert len(c.condition(x)) == 10 * out
    with pytest.raises(QrngUsageError, match="multiple"):
        c.condition(x[:-1])


def test_cbc_mac_conditioning_equals_a_plain_cbc_mac():
    """Each message's output is the zero-IV CBC-MAC of that message alone."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from qrng.conditioning import CBCMAC_KEY

    c = make_conditioner("cbcmac", 5.9, 8)
    x = np.random.default_rng(2).integers(0, 256, c.samples_per_block * 3, dtype=np.uint8)
    got = c.condition(x)
    for i in range(3):
        msg = x[i * c.samples_per_block : (i + 1) * c.samples_per_block].tobytes()
        enc = Cipher(algorithms.AES(CBCMAC_KEY), modes.CBC(bytes(16))).encryptor()
        assert got[16 * i : 16 * i + 16] == enc.update(msg)[-16:]


def test_known_answer_tests_pass():
    assert run_kats() == dict.fromkeys(run_kats(), True) and len(run_kats()) == 6


def test_one_generator_per_node(monkeypatch):
    monkeypatch.setattr(qrng, "_node", None)
    first = qrng.node_generator("emulated-qrng://node?seed=1")
    assert qrng.node_generator("emulated-qrng://node?seed=1") is first
    with pytest.raises(QrngUsageError, match="already runs"):
        qrng.node_generator("emulated-qrng://other?seed=2")
