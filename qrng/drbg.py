"""SP 800-90A Rev. 1 DRBG mechanisms: HMAC_DRBG, Hash_DRBG and CTR_DRBG (AES, with or
without the derivation function), under the standard's function names.

These are the raw mechanisms (§9-§10): the caller supplies entropy input, nonce and
additional input; getting entropy, prediction resistance and health checks belong to the
PTG.3 pipeline around them (:mod:`qrng.ptg3`). Each mechanism enforces the standard's
limits (request size <= 2^19 bits, reseed interval, input lengths) and raises
:class:`DrbgError` outside them.

Speed comes from the bulk primitives in ``cryptography``: CTR_DRBG's output is one
AES-CTR keystream call and its BCC one AES-CBC call, so large requests run at AES speed.
``uninstantiate`` drops the working state; Python cannot guarantee that the old integer
and bytes objects are overwritten in memory, which the module documents rather than hides.
"""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qrng.errors import DrbgError

MAX_REQUEST_BITS = 1 << 19
"""SP 800-90A Table 2/3: max_number_of_bits_per_request."""
RESEED_INTERVAL = 1 << 48
"""SP 800-90A Table 2/3: reseed_interval (requests between reseeds)."""
MAX_INPUT_BYTES = 1 << 32  # 2^35 bits: max length of entropy, personalisation, additional input

HASHES = {  # name -> (hashlib name, outlen bytes, seedlen bytes, security strength bits)
    "SHA-1": ("sha1", 20, 55, 128),
    "SHA-224": ("sha224", 28, 55, 192),
    "SHA-256": ("sha256", 32, 55, 256),
    "SHA-384": ("sha384", 48, 111, 256),
    "SHA-512": ("sha512", 64, 111, 256),
    "SHA-512/224": ("sha512_224", 28, 55, 192),
    "SHA-512/256": ("sha512_256", 32, 55, 256),
}


class Drbg(ABC):
    """Common life cycle: instantiate -> generate/reseed ... -> uninstantiate."""

    name = "DRBG"
    security_strength = 0

    def __init__(self) -> None:
        self._counter = 0  # reseed_counter; 0 means not instantiated

    @abstractmethod
    def instantiate(self, entropy: bytes, nonce: bytes = b"", personalization: bytes = b"") -> None:
        """Instantiate_function (§9.1) with the entropy input supplied by the caller."""

    @abstractmethod
    def reseed(self, entropy: bytes, additional: bytes = b"") -> None:
        """Reseed_function (§9.2)."""

    @abstractmethod
    def _generate(self, n: int, additional: bytes) -> bytes:
        """The mechanism's generate algorithm, limits already checked."""

    def generate(self, n: int, additional: bytes = b"") -> bytes:
        """Generate_function (§9.3): ``n`` bytes of output."""
        if self._counter == 0:
            raise DrbgError(f"{self.name}: generate before instantiate")
        if not 0 < n * 8 <= MAX_REQUEST_BITS:
            raise DrbgError(f"{self.name}: request of {n * 8} bits; expected 1..{MAX_REQUEST_BITS}")
        if self._counter > RESEED_INTERVAL:
            raise DrbgError(f"{self.name}: reseed required")
        _check_input(self.name, "additional input", additional)
        return self._generate(n, additional)

    def uninstantiate(self) -> None:
        """Uninstantiate_function (§9.4): forget the working state."""
        self._counter = 0
        self._forget()

    @abstractmethod
    def _forget(self) -> None: ...

    def _check_entropy(self, entropy: bytes) -> None:
        if len(entropy) * 8 < self.security_strength:
            raise DrbgError(
                f"{self.name}: entropy input of {len(entropy) * 8} bits; expected "
                f">= {self.security_strength}"
            )
        _check_input(self.name, "entropy input", entropy)


def _check_input(name: str, what: str, data: bytes) -> None:
    if len(data) > MAX_INPUT_BYTES:
        raise DrbgError(f"{name}: {what} longer than 2^35 bits")


# -- HMAC_DRBG (§10.1.2) -----------------------------------------------------------------
class HmacDrbg(Drbg):
    """HMAC_DRBG over one of SHA-1 ... SHA-512/256."""

    def __init__(self, hash_name: str = "SHA-512") -> None:
        super().__init__()
        if hash_name not in HASHES:
            raise DrbgError(f"HMAC_DRBG: unknown hash {hash_name!r}")
        self._hash, self._outlen, _, self.security_strength = HASHES[hash_name]
        self.name = f"HMAC_DRBG({hash_name})"
        self._key = self._v = b""

    def _mac(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self._hash)

    def _update(self, provided: bytes) -> None:
        self._key = self._mac(self._key, self._v + b"\x00" + provided)
        self._v = self._mac(self._key, self._v)
        if provided:
            self._key = self._mac(self._key, self._v + b"\x01" + provided)
            self._v = self._mac(self._key, self._v)

    def instantiate(self, entropy: bytes, nonce: bytes = b"", personalization: bytes = b"") -> None:
        self._check_entropy(entropy)
        self._key, self._v = b"\x00" * self._outlen, b"\x01" * self._outlen
        self._update(entropy + nonce + personalization)
        self._counter = 1

    def reseed(self, entropy: bytes, additional: bytes = b"") -> None:
        if self._counter == 0:
            raise DrbgError(f"{self.name}: reseed before instantiate")
        self._check_entropy(entropy)
        self._update(entropy + additional)
        self._counter = 1

    def _generate(self, n: int, additional: bytes) -> bytes:
        if additional:
            self._update(additional)
        out = bytearray()
        while len(out) < n:
            self._v = self._mac(self._key, self._v)
            out += self._v
        self._update(additional)
        self._counter += 1
        return bytes(out[:n])

    def _forget(self) -> None:
        self._key = self._v = b""


# -- Hash_DRBG (§10.1.1) -----------------------------------------------------------------
class HashDrbg(Drbg):
    """Hash_DRBG over one of SHA-1 ... SHA-512/256."""

    def __init__(self, hash_name: str = "SHA-512") -> None:
        super().__init__()
        if hash_name not in HASHES:
            raise DrbgError(f"Hash_DRBG: unknown hash {hash_name!r}")
        self._hash, self._outlen, self._seedlen, self.security_strength = HASHES[hash_name]
        self.name = f"Hash_DRBG({hash_name})"
        self._modulus = 1 << (8 * self._seedlen)
        self._v = self._c = 0

    def _h(self, data: bytes) -> bytes:
        return hashlib.new(self._hash, data).digest()

    def _df(self, data: bytes) -> int:
        """Hash_df (§10.3.1) to seedlen bits, as an integer."""
        bits = (8 * self._seedlen).to_bytes(4, "big")
        blocks = -(-self._seedlen // self._outlen)
        temp = b"".join(self._h(bytes([i]) + bits + data) for i in range(1, blocks + 1))
        return int.from_bytes(temp[: self._seedlen], "big")

    def _bytes(self, value: int) -> bytes:
        return value.to_bytes(self._seedlen, "big")

    def _set_seed(self, seed: int) -> None:
        self._v = seed
        self._c = self._df(b"\x00" + self._bytes(seed))
        self._counter = 1

    def instantiate(self, entropy: bytes, nonce: bytes = b"", personalization: bytes = b"") -> None:
        self._check_entropy(entropy)
        self._set_seed(self._df(entropy + nonce + personalization))

    def reseed(self, entropy: bytes, additional: bytes = b"") -> None:
        if self._counter == 0:
            raise DrbgError(f"{self.name}: reseed before instantiate")
        self._check_entropy(entropy)
        self._set_seed(self._df(b"\x01" + self._bytes(self._v) + entropy + additional))

    def _generate(self, n: int, additional: bytes) -> bytes:
        if additional:
            w = self._h(b"\x02" + self._bytes(self._v) + additional)
            self._v = (self._v + int.from_bytes(w, "big")) % self._modulus
        out, data = bytearray(), self._v
        while len(out) < n:  # Hashgen (§10.1.1.4)
            out += self._h(self._bytes(data))
            data = (data + 1) % self._modulus
        h = int.from_bytes(self._h(b"\x03" + self._bytes(self._v)), "big")
        self._v = (self._v + h + self._c + self._counter) % self._modulus
        self._counter += 1
        return bytes(out[:n])

    def _forget(self) -> None:
        self._v = self._c = 0


# -- CTR_DRBG (§10.2.1), AES only --------------------------------------------------------
def _aes_blocks(key: bytes, v: int, count: int) -> bytes:
    """AES_K(V+1) || AES_K(V+2) || ... : ``count`` blocks of the CTR keystream after V."""
    start = ((v + 1) % (1 << 128)).to_bytes(16, "big")
    enc = Cipher(algorithms.AES(key), modes.CTR(start)).encryptor()
    return enc.update(bytes(16 * count))


def _bcc(key: bytes, data: bytes) -> bytes:
    """BCC (§10.3.3): the last block of AES-CBC over ``data`` with a zero IV."""
    enc = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).encryptor()
    return enc.update(data)[-16:]


def block_cipher_df(key_len: int, data: bytes, n: int) -> bytes:
    """Block_Cipher_df (§10.3.2) with AES-``key_len*8``: ``n`` bytes from ``data``."""
    s = len(data).to_bytes(4, "big") + n.to_bytes(4, "big") + data + b"\x80"
    s += bytes(-len(s) % 16)
    k = bytes(range(key_len))
    temp = b"".join(
        _bcc(k, i.to_bytes(4, "big") + bytes(12) + s) for i in range(-(-(key_len + 16) // 16))
    )
    key, x = temp[:key_len], temp[key_len : key_len + 16]
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    out = bytearray()
    while len(out) < n:
        x = enc.update(x)
        out += x
    return bytes(out[:n])


class CtrDrbg(Drbg):
    """CTR_DRBG with AES-128/192/256, with (default) or without the derivation function."""

    def __init__(self, key_bits: int = 256, *, use_df: bool = True) -> None:
        super().__init__()
        if key_bits not in (128, 192, 256):
            raise DrbgError(f"CTR_DRBG: AES key size {key_bits}; expected 128, 192 or 256")
        self._keylen, self._seedlen = key_bits // 8, key_bits // 8 + 16
        self.security_strength, self.use_df = key_bits, use_df
        self.name = f"CTR_DRBG(AES-{key_bits}{'' if use_df else ', no df'})"
        self._key, self._v = b"", 0

    def _update(self, provided: bytes) -> None:
        temp = _aes_blocks(self._key, self._v, -(-self._seedlen // 16))[: self._seedlen]
        temp = bytes(a ^ b for a, b in zip(temp, provided, strict=True))
        self._key, self._v = temp[: self._keylen], int.from_bytes(temp[self._keylen :], "big")

    def _material(self, data: bytes, extra: bytes = b"") -> bytes:
        """seedlen bytes of seed material: df(data) with df, else data XOR padded extra."""
        if self.use_df:
            return block_cipher_df(self._keylen, data + extra, self._seedlen)
        if len(extra) > self._seedlen:
            raise DrbgError(f"{self.name}: input longer than seedlen ({self._seedlen * 8} bits)")
        padded = extra + bytes(self._seedlen - len(extra))
        return bytes(a ^ b for a, b in zip(data, padded, strict=True))

    def _check_entropy(self, entropy: bytes) -> None:
        super()._check_entropy(entropy)
        if not self.use_df and len(entropy) != self._seedlen:
            raise DrbgError(
                f"{self.name}: entropy input must be exactly seedlen "
                f"({self._seedlen * 8} bits) without a derivation function"
            )

    def instantiate(self, entropy: bytes, nonce: bytes = b"", personalization: bytes = b"") -> None:
        self._check_entropy(entropy)
        seed = self._material(entropy + nonce if self.use_df else entropy, personalization)
        self._key, self._v = bytes(self._keylen), 0
        self._update(seed)
        self._counter = 1

    def reseed(self, entropy: bytes, additional: bytes = b"") -> None:
        if self._counter == 0:
            raise DrbgError(f"{self.name}: reseed before instantiate")
        self._check_entropy(entropy)
        self._update(self._material(entropy, additional))
        self._counter = 1

    def _generate(self, n: int, additional: bytes) -> bytes:
        if additional:
            additional = (
                self._material(b"", additional)
                if self.use_df
                else self._material(bytes(self._seedlen), additional)
            )
            self._update(additional)
        else:
            additional = bytes(self._seedlen)
        blocks = -(-n // 16)
        out = _aes_blocks(self._key, self._v, blocks)[:n]
        self._v = (self._v + blocks) % (1 << 128)
        self._update(additional)
        self._counter += 1
        return out

    def _forget(self) -> None:
        self._key, self._v = b"", 0
