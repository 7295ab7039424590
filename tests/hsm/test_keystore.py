"""The PKCS#11 keystore against a real SoftHSM2 token: URIs, key stores sealed through it,
the KEK that never leaves the token, one-line errors, and a reopen in a new process.

SoftHSM2 reads ``SOFTHSM2_CONF`` when the module is initialised, once per process. The
``softhsm`` fixture writes a private configuration (its own token directory, file object
store), points the variable at it for this module and re-initialises the module, so it
works whether or not something loaded SoftHSM2 earlier in the process. Tokens are created
through :func:`hsm.keystore.provision` (``C_InitToken``), as a node is provisioned. Nothing
is mocked below python-pkcs11.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from appliance import cli
from appliance.kms.errors import IntegrityFailure, StoreKeyMismatch
from appliance.kms.store import KeyStore, StoredKey
from hsm import keystore
from hsm.errors import HsmError
from hsm.keystore import KeystoreError, Pkcs11NodeKey, open_node_key, provision
from hsm.pkcs11url import Pkcs11UrlError, parse

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "4711-user"
SO_PIN = "0815-officer"
CANARY = bytes.fromhex("c0ffee00deadbeef" * 4)
REPO = Path(__file__).resolve().parents[2]


@dataclass
class SoftHsm:
    """A private SoftHSM2 installation: its directory, configuration and user PIN file."""

    root: Path
    conf: Path
    pin_file: Path

    def url(self, token: str, kek: str = "qkdn-kek", **query: str) -> str:
        params = {"module-path": MODULE, "pin-source": f"file:{self.pin_file}", **query}
        return f"pkcs11:token={token};object={kek}?" + "&".join(
            f"{k}={v}" for k, v in params.items()
        )

    def session(self, token: str) -> pkcs11.Session:
        return pkcs11.lib(MODULE).get_token(token_label=token).open(user_pin=PIN, rw=True)


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    pin_file = root / "user.pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        pkcs11.lib(MODULE).reinitialize()  # read this configuration, whatever came before
        yield SoftHsm(root, conf, pin_file)


@pytest.fixture(scope="module")
def node_url(softhsm: SoftHsm) -> str:
    """A provisioned node token: token, KEK and wrapped DEK, as `qkdn keystore init` makes."""
    url = softhsm.url("node-5")
    info = provision(url, so_pin=SO_PIN)
    assert info.created and info.token == "node-5"
    return url


@pytest.fixture
def node_key(node_url: str) -> Pkcs11NodeKey:
    return open_node_key(node_url)


@pytest.fixture
def store(tmp_path: Path, node_key: Pkcs11NodeKey) -> Iterator[KeyStore]:
    s = KeyStore(tmp_path / "link.db", "link-1-2", node_key)
    yield s
    s.close()


SESSION = "014:sae-1:sae-2"


def put(store: KeyStore, key_id: str, material: bytes) -> None:
    store.put_many(SESSION, [(key_id, material)])


def take(store: KeyStore, key_id: str) -> StoredKey:
    [key] = store.take_many(SESSION, [key_id])
    return key


def keys(n: int, prefix: str = "k") -> list[tuple[str, bytes]]:
    return [(f"{prefix}{i}", bytes([i]) * 32) for i in range(n)]


def record_of(path: Path, key_id: str) -> bytes:
    with sqlite3.connect(path) as db:
        row = db.execute(
            "SELECT record FROM batches JOIN keys ON batch = seq WHERE id = ?", (key_id,)
        ).fetchone()
        return bytes(row[0])


def rewrite(path: Path, sql: str, *params: object) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute(sql, params)
    db.close()


# -- RFC 7512 URIs ------------------------------------------------------------------------


def test_uri_path_and_query_attributes_are_split_and_percent_decoded():
    url = parse(
        "pkcs11:token=node%205%3Bx;object=k%2Fe%26k;id=%01%ff;serial=12ab;type=secret-key"
        "?module-path=/opt/p11%20lib/x.so&pin-value=a%26b;c"
    )
    assert url.token == "node 5;x" and url.object == "k/e&k"
    assert url.object_id == b"\x01\xff" and url.path["serial"] == "12ab"
    assert url.module() == "/opt/p11 lib/x.so"
    assert url.pin() == "a&b;c"
    assert "a%26b" not in url.redacted() and "pin-value=***" in url.redacted()
    assert "a%26b" not in repr(url)


def test_uri_defaults_module_and_reads_pin_source_forms(tmp_path: Path):
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    for source in (f"file:{pin}", f"file://{pin}", str(pin)):
        url = parse(f"pkcs11:token=t?pin-source={source}")
        assert url.pin() == "1234" and url.module() == MODULE
    assert parse("pkcs11:token=t?module-name=softhsm2").module().endswith("libsofthsm2.so")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("http://token", "not a PKCS#11 URI"),
        ("pkcs11:token=a;token=b", "given twice"),
        ("pkcs11:token=a?pin-value=1&pin-value=2", "given twice"),
        ("pkcs11:token=a;colour=blue", "unsupported path attribute 'colour'"),
        ("pkcs11:token=a?pin-sorce=file:/x", "unsupported query attribute 'pin-sorce'"),
        ("pkcs11:token=a?pin-value=x", None),
        ("pkcs11:token=a;object", "malformed path attribute"),
        ("pkcs11:token=a%2", "bad percent-escape"),
        ("pkcs11:token=%ff", "not UTF-8"),
        ("pkcs11:token=a;type=key", "type must be"),
        ("pkcs11:token=a;slot-id=x1", "slot-id must be a decimal"),
        ("pkcs11:token=a?module-path=lib.so", "module-path must be absolute"),
        ("pkcs11:token=a?module-path=/a.so&module-name=b", "not both"),
        ("pkcs11:token=a?pin-value=secret-9&pin-source=file:/p", "not both"),
        ("pkcs11:token=a?pin-source=|/bin/echo", "programs are not run"),
        ("pkcs11:token=a?module-name=nosuch-module", "no such module"),
    ],
)
def test_bad_uris_are_refused_in_one_line_without_the_pin(text: str, words: str | None):
    if words is None:  # a valid URI, for contrast
        assert parse(text).pin() == "x"
        return
    with pytest.raises(Pkcs11UrlError) as caught:
        url = parse(text)
        url.module()
        url.pin()
    message = str(caught.value)
    assert words in message and "\n" not in message
    assert caught.value.code == "HSM-P11-URL" and "secret-9" not in message


def test_pin_file_must_be_private_and_readable(tmp_path: Path):
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o640)
    with pytest.raises(Pkcs11UrlError, match="readable by others") as caught:
        parse(f"pkcs11:token=t?pin-source=file:{pin}").pin()
    assert caught.value.code == "HSM-P11-PIN-SOURCE"
    with pytest.raises(Pkcs11UrlError, match="unreadable") as caught:
        parse(f"pkcs11:token=t?pin-source=file:{tmp_path / 'absent'}").pin()
    assert caught.value.code == "HSM-P11-PIN-SOURCE"


# -- key stores sealed through the token --------------------------------------------------


def test_key_store_round_trip_through_the_token(store: KeyStore):
    store.put_many(SESSION, keys(20))
    assert bytes(take(store, "k3").material) == bytes([3]) * 32
    taken = store.take_many(SESSION, ["k1", "k2"])
    assert [bytes(k.material) for k in taken] == [bytes([1]) * 32, bytes([2]) * 32]
    assert [k.key_id for k in store.take_oldest(SESSION, "ksa", 2)] == ["k0", "k4"]
    assert store.count(SESSION, "ksa") == 15


def test_records_are_randomised_and_hold_no_key_bytes(tmp_path: Path, store: KeyStore):
    put(store, "a", CANARY)
    put(store, "b", CANARY)
    store.checkpoint()
    ra, rb = record_of(store.path, "a"), record_of(store.path, "b")
    batch_of_one = 4 + 3 + len("a") + 32  # slot count, then ID length, key length, ID, key
    assert len(ra) == batch_of_one + keystore.OVERHEAD and ra[0] == keystore.VERSION
    assert ra[keystore.BODY :] != rb[keystore.BODY :]
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("link.db*"))
    assert CANARY not in on_disk


@pytest.mark.parametrize("where", [0, 1, keystore.HEADER_BYTES, keystore.BODY, -1])
def test_a_tampered_record_fails_to_open(store: KeyStore, where: int):
    put(store, "k1", CANARY)
    record = bytearray(record_of(store.path, "k1"))
    record[where] ^= 0x01
    rewrite(store.path, "UPDATE batches SET record = ?", bytes(record))
    with pytest.raises(IntegrityFailure):
        take(store, "k1")


def test_a_truncated_record_fails_to_open(store: KeyStore):
    put(store, "k1", CANARY)
    rewrite(store.path, "UPDATE batches SET record = substr(record, 1, 20)")
    with pytest.raises(IntegrityFailure, match="too short"):
        take(store, "k1")


def test_a_record_moved_to_another_id_or_store_fails(tmp_path: Path, store: KeyStore, node_key):
    put(store, "k1", CANARY)
    rewrite(store.path, "UPDATE keys SET id = 'k2' WHERE id = 'k1'")
    with pytest.raises(IntegrityFailure, match="authentication"):
        take(store, "k2")
    put(store, "k3", CANARY)
    with pytest.raises(StoreKeyMismatch):  # same file, another store name
        KeyStore(store.path, "link-1-3", node_key)


def test_concurrent_seal_and_open(node_key: Pkcs11NodeKey):
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(300):
                aad = f"s\0{n}-{i}".encode()
                assert node_key.open(aad, node_key.seal(aad, CANARY)) == CANARY
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_a_record_of_another_tokens_keystore_fails(softhsm: SoftHsm, node_key: Pkcs11NodeKey):
    other = softhsm.url("node-6")
    provision(other, so_pin=SO_PIN)
    record = open_node_key(other).seal(b"s\0k1", CANARY)
    with pytest.raises(IntegrityFailure, match="sealed under data key"):
        node_key.open(b"s\0k1", record)


def test_a_keystore_reopened_in_new_processes_opens_old_records(
    tmp_path: Path, softhsm: SoftHsm, node_url: str, store: KeyStore
):
    store.put_many(SESSION, [("old", CANARY), ("mine", CANARY[::-1])])
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from appliance.kms.store import KeyStore\n"
        "from hsm.keystore import open_node_key\n"
        "s = KeyStore(Path(sys.argv[1]), 'link-1-2', open_node_key(sys.argv[2]))\n"
        "[old] = s.take_many('014:sae-1:sae-2', ['old'])\n"
        "assert bytes(old.material) == bytes.fromhex(sys.argv[3])\n"
        "s.put_many('014:sae-1:sae-2', [('new', bytes.fromhex(sys.argv[3]))])\n"
        "print('ok')\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(softhsm.conf)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(store.path), node_url, CANARY.hex()],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    fresh = KeyStore(store.path, "link-1-2", open_node_key(node_url))
    assert bytes(take(fresh, "new").material) == CANARY
    assert bytes(take(fresh, "mine").material) == CANARY[::-1]
    fresh.close()


# -- the KEK never leaves the token --------------------------------------------------------


@pytest.fixture
def kek(softhsm: SoftHsm, node_url: str) -> Iterator[pkcs11.SecretKey]:
    with softhsm.session("node-5") as session:
        yield session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, label="qkdn-kek")


def test_the_kek_value_cannot_be_read(kek: pkcs11.SecretKey):
    with pytest.raises(p11.AttributeSensitive):
        kek[Attribute.VALUE]
    assert kek[Attribute.EXTRACTABLE] is False and kek[Attribute.SENSITIVE] is True
    assert kek[Attribute.NEVER_EXTRACTABLE] is True and kek[Attribute.ALWAYS_SENSITIVE] is True
    assert kek[Attribute.LOCAL] is True and kek[Attribute.TOKEN] is True


@pytest.mark.parametrize("mechanism", [Mechanism.AES_KEY_WRAP, Mechanism.AES_KEY_WRAP_PAD])
def test_the_kek_cannot_be_wrapped_out(softhsm: SoftHsm, kek: pkcs11.SecretKey, mechanism):
    session = kek.session
    wrapper = session.generate_key(
        KeyType.AES, 256, store=False, template={Attribute.WRAP: True, Attribute.EXTRACTABLE: True}
    )
    with pytest.raises(p11.KeyUnextractable):
        wrapper.wrap_key(kek, mechanism=mechanism)
    with pytest.raises(p11.KeyUnextractable):
        kek.wrap_key(kek, mechanism=mechanism)


def test_the_kek_cannot_be_made_extractable_copied_or_used_to_encrypt(kek: pkcs11.SecretKey):
    for attribute, value in ((Attribute.EXTRACTABLE, True), (Attribute.SENSITIVE, False)):
        with pytest.raises(p11.PKCS11Error):
            kek[attribute] = value
        with pytest.raises(p11.PKCS11Error):
            kek.copy({attribute: value})
    assert kek[Attribute.EXTRACTABLE] is False and kek[Attribute.SENSITIVE] is True
    for capability in (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.SIGN, Attribute.DERIVE):
        assert kek[capability] is False
    assert kek[Attribute.WRAP] is True and kek[Attribute.UNWRAP] is True


def test_the_dek_is_in_the_token_only_wrapped(softhsm: SoftHsm, node_key: Pkcs11NodeKey):
    with softhsm.session("node-5") as session:
        secret_keys = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
        data = list(session.get_objects({Attribute.APPLICATION: keystore.DEK_APPLICATION}))
        assert [k.label for k in secret_keys] == ["qkdn-kek"]  # no DEK object stays behind
        assert len(data) == 1
        blob = bytes(data[0][Attribute.VALUE])
    assert len(blob) == 40  # RFC 3394 wrapping of 32 bytes
    assert node_key.info.dek_id == keystore._dek_id(blob).hex()


def test_a_weak_kek_is_refused(softhsm: SoftHsm, node_url: str):
    with softhsm.session("node-5") as session:
        session.generate_key(
            KeyType.AES,
            256,
            label="weak",
            store=True,
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
    with pytest.raises(KeystoreError, match="extractable or not sensitive") as caught:
        open_node_key(softhsm.url("node-5", "weak"), create=True)
    assert caught.value.code == "HSM-P11-KEK-POLICY"


def test_a_tampered_wrapped_dek_is_refused(softhsm: SoftHsm):
    url = softhsm.url("node-7")
    provision(url, so_pin=SO_PIN)
    with softhsm.session("node-7") as session:
        (obj,) = session.get_objects({Attribute.APPLICATION: keystore.DEK_APPLICATION})
        blob = bytearray(obj[Attribute.VALUE])
        attrs = obj.get_attributes([Attribute.LABEL, Attribute.APPLICATION])
        obj.destroy()
        blob[7] ^= 0x40
        session.create_object(
            {
                **attrs,
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.VALUE: bytes(blob),
            }
        )
    with pytest.raises(KeystoreError, match="does not unwrap") as caught:
        open_node_key(url)
    assert caught.value.code == "HSM-P11-DEK"


# -- provisioning and errors ---------------------------------------------------------------


def test_provisioning_is_idempotent_and_never_reinitialises(node_url: str, node_key):
    again = provision(node_url, so_pin=SO_PIN)
    assert not again.created and again.dek_id == node_key.info.dek_id
    with pytest.raises(KeystoreError, match="already exists") as caught:
        keystore.init_token(node_url, so_pin=SO_PIN)
    assert caught.value.code == "HSM-P11-TOKEN-EXISTS"


def test_a_missing_dek_is_created_only_when_asked(softhsm: SoftHsm, node_url: str):
    with softhsm.session("node-5") as session:
        session.generate_key(
            KeyType.AES, 256, label="kek-2", store=True, template=dict(keystore.KEK_TEMPLATE)
        )
    url = softhsm.url("node-5", "kek-2")
    with pytest.raises(KeystoreError, match="no wrapped data key") as caught:
        open_node_key(url)
    assert caught.value.code == "HSM-P11-NO-DEK"
    assert open_node_key(url, create=True).info.created


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"token": "nosuch"}, "HSM-P11-NO-TOKEN", "no token labelled 'nosuch'"),
        ({"kek": "nosuch"}, "HSM-P11-NO-KEK", "no key-encryption key 'nosuch'"),
        ({"pin-value": "9999-wrong"}, "HSM-P11-PIN", "wrong PIN"),
        ({"module-path": "/nonexistent/libp11.so"}, "HSM-P11-MODULE", "cannot load"),
        ({"pin-source": "file:/nonexistent/pin"}, "HSM-P11-PIN-SOURCE", "unreadable"),
    ],
)
def test_open_errors_are_one_line_with_codes(softhsm: SoftHsm, node_url, change, code, words):
    query = {k: v for k, v in change.items() if k not in ("token", "kek")}
    url = softhsm.url(change.get("token", "node-5"), change.get("kek", "qkdn-kek"), **query)
    if "pin-value" in change:
        url = url.replace(f"&pin-source=file:{softhsm.pin_file}", "")
    with pytest.raises(HsmError) as caught:
        open_node_key(url)
    message = str(caught.value)
    assert caught.value.code == code and words in message, message
    assert "\n" not in message and "9999-wrong" not in message and PIN not in message


def test_a_uri_without_a_pin_is_refused(softhsm: SoftHsm, node_url: str):
    url = node_url.replace(f"&pin-source=file:{softhsm.pin_file}", "")
    with pytest.raises(Pkcs11UrlError, match="gives no PIN"):
        open_node_key(url)
    assert open_node_key(url, pin=PIN).info.token == "node-5"


# -- the command line ----------------------------------------------------------------------


def test_cli_init_and_status(softhsm: SoftHsm, tmp_path: Path, capsys):
    so_pin = tmp_path / "so.pin"
    so_pin.write_text(SO_PIN + "\n")
    so_pin.chmod(0o600)
    url = softhsm.url("node-8")
    assert cli.main(["keystore", "init", url, "--so-pin-source", f"file:{so_pin}"]) == 0
    out = capsys.readouterr().out
    assert "node-8" in out and "created" in out
    assert cli.main(["keystore", "status", url, "--json"]) == 0
    out = capsys.readouterr().out
    assert '"token": "node-8"' in out and '"extractable": false' in out
    assert PIN not in out and SO_PIN not in out
    assert cli.main(["keystore", "status", softhsm.url("nosuch")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qkdn: error [HSM-P11-NO-TOKEN]: ") and err.count("\n") == 1
