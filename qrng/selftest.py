"""Known-answer tests of the post-processing, run at every start-up (AIS 31 PTG.2/3).

Each KAT is data with a cited source: the DRBG answers are the first vector of each
mechanism's section in NIST CAVP ``drbgtestvectors.zip`` (CAVS 14.3, no_reseed), the AES
answer is FIPS-197 Appendix C.3, the CBC-MAC answer is SP 800-38A F.2.5 (CBC-AES256,
with the IV folded into the first block so the MAC's IV is zero), and SHA-512 is FIPS
180-2 Appendix C.1 ("abc"). A failed KAT means the post-processing cannot be trusted:
the generator refuses to start.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qrng.conditioning import cbc_mac_many
from qrng.drbg import CtrDrbg, Drbg, HashDrbg, HmacDrbg


@dataclass(frozen=True)
class DrbgKat:
    make: Callable[[], Drbg]
    entropy: str
    nonce: str
    returned: str


DRBG_KATS = {
    "HMAC_DRBG(SHA-512)": DrbgKat(
        lambda: HmacDrbg("SHA-512"),
        "35049f389a33c0ecb1293238fd951f8ffd517dfde06041d32945b3e26914ba15",
        "f7328760be6168e6aa9fb54784989a11",
        "e76491b0260aacfded01ad39fbf1a66a88284caa5123368a2ad9330ee48335e3c9c9ba90e6cbc9429962d60c"
        "1a6661edcfaa31d972b8264b9d4562cf18494128a092c17a8da6f3113e8a7edfcd4427082bd390675e966240"
        "8144971717303d8dc352c9e8b95e7f35fa2ac9f549b292bc7c4bc7f01ee0a577859ef6e82d79ef23892d167c"
        "140d22aac32b64ccdfeee2730528a38763b24227f91ac3ffe47fb11538e435307e77481802b0f613f370ffb0"
        "dbeab774fe1efbb1a80d01154a9459e73ad361108bbc86b0914f095136cbe634555ce0bb263618dc5c367291"
        "ce0825518987154fe9ecb052b3f0a256fcc30cc14572531c9628973639beda456f2bddf6",
    ),
    "Hash_DRBG(SHA-512)": DrbgKat(
        lambda: HashDrbg("SHA-512"),
        "6b50a7d8f8a55d7a3df8bb40bcc3b722d8708de67fda010b03c4c84d72096f8c",
        "3ec649cc6256d9fa31db7a2904aaf025",
        "95b7f17e9802d3577392c6a9c08083b67dd1292265b5f42d237f1c55bb9b10bfcfd82c77a378b8266a009914"
        "3b3c2d64611eeeb69acdc055957c139e8b190c7a06955f2c797c2778de940396a501f40e91396acf8d7e45eb"
        "dbb53bbf8c975230d2f0ff9106c76119ae498e7fbc03d90f8e4c51627aed5c8d4263d5d2b978873a0de596ee"
        "6dc7f7c29e37eee8b34c90dd1cf6a9ddb22b4cbd086b14b35de93da2d5cb1806698cbd7bbb67bfe3d31fd2d1"
        "dbd2a1e058a3eb99d7e51f1a938eed5e1c1de23a6b4345d3191409f92f39b3670d8dbfb635d8e6a36932d810"
        "33d1448d63b403ddf88e121b6e819ac381226c1321e4b08644f6727c368c5a9f7a4b3ee2",
    ),
    "CTR_DRBG(AES-256)": DrbgKat(
        lambda: CtrDrbg(256),
        "36401940fa8b1fba91a1661f211d78a0b9389a74e5bccfece8d766af1a6d3b14",
        "496f25b0f1301b4f501be30380a137eb",
        "5862eb38bd558dd978a696e6df164782ddd887e7e9a6c9f3f1fbafb78941b535a64912dfd224c6dc7454e525"
        "0b3d97165e16260c2faf1cc7735cb75fb4f07e1d",
    ),
}

SP800_38A_CBC_AES256 = {
    "key": "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
    "iv": "000102030405060708090a0b0c0d0e0f",
    "plain": "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710",
    "last_cipher_block": "b2eb05e2c39be9fcda6c19078c6a9d1b",
}
FIPS197_C3 = (
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    "00112233445566778899aabbccddeeff",
    "8ea2b7ca516745bfeafc49904b496089",
)
SHA512_ABC = (
    "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
    "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
)


def _drbg_ok(kat: DrbgKat) -> bool:
    drbg = kat.make()
    n = len(kat.returned) // 2
    drbg.instantiate(bytes.fromhex(kat.entropy), bytes.fromhex(kat.nonce))
    drbg.generate(n)
    ok = drbg.generate(n) == bytes.fromhex(kat.returned)
    drbg.uninstantiate()
    return ok


def _aes_ok() -> bool:
    key, plain, cipher = (bytes.fromhex(x) for x in FIPS197_C3)
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(plain) == cipher


def _cbcmac_ok() -> bool:
    v = {k: bytes.fromhex(x) for k, x in SP800_38A_CBC_AES256.items()}
    folded = bytes(a ^ b for a, b in zip(v["plain"][:16], v["iv"], strict=True)) + v["plain"][16:]
    ecb = Cipher(algorithms.AES(v["key"]), modes.ECB()).encryptor()
    twice = cbc_mac_many(ecb, folded * 2, 4)  # two messages at once must both match
    return twice == v["last_cipher_block"] * 2


def _sha512_ok() -> bool:
    return hashlib.sha512(b"abc").hexdigest() == SHA512_ABC


def run_kats() -> dict[str, bool]:
    """Every known-answer test, by name: True where it passed."""
    results = {name: _drbg_ok(kat) for name, kat in DRBG_KATS.items()}
    results.update(
        {
            "AES-256 (FIPS-197 C.3)": _aes_ok(),
            "CBC-MAC-AES-256 (SP 800-38A F.2.5)": _cbcmac_ok(),
            "SHA-512 (FIPS 180-2 C.1)": _sha512_ok(),
        }
    )
    return results
