# ruff: noqa: F811 - pytest fixtures imported from the card and keystore test modules
"""The hsm parts inside a running network: the two access nodes open their channel from
smartcards enrolled by ``qkdn card enroll`` (through pcscd and vpcd), and UKMS Bonn seals
its key stores under a key-encryption key in a SoftHSM2 token. Nothing mocked below
pyscard or python-pkcs11."""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from appliance.kms.node import Policy
from hsm.applet import Ref
from hsm.keystore import provision
from tests.hsm.conftest import url_of
from tests.hsm.test_card_cli import (  # noqa: F401 - fixtures used by name
    SECRETS_A,
    SECRETS_B,
    enroll_args,
    own_generator,
    run,
    secret_file,
    station,
)
from tests.hsm.test_keystore import SO_PIN, softhsm  # noqa: F401 - fixture used by name
from tests.kms.test_network_inprocess import call, run_network, sae_conn


def set_in(config: Path, section: str, key: str, value: str) -> None:
    doc = tomllib.loads(config.read_text())
    doc.setdefault(section, {})[key] = value
    config.write_text(tomli_w.dumps(doc))


def nodes_with_cards(card_a, card_b, station, pin_b: str, token_url: str | None):
    def edit(out: Path) -> None:
        pin_a = secret_file(station, "akms-berlin.pin", SECRETS_A["pin"])
        pin_b_file = secret_file(station, "akms-bonn.pin", pin_b)
        set_in(
            out / "nodes" / "akms-berlin.toml", "psk", "akms-bonn", url_of(card_a, pin_file=pin_a)
        )
        set_in(
            out / "nodes" / "akms-bonn.toml",
            "psk",
            "akms-berlin",
            url_of(card_b, pin_file=pin_b_file),
        )
        if token_url is not None:
            set_in(out / "nodes" / "ukms-bonn.toml", "devices", "keystore", token_url)

    return edit


def test_cards_open_the_channel_and_a_token_seals_the_slaves_keys(
    tmp_path, capsys, card_a, card_b, station, softhsm
):
    status, _, err = run(capsys, *enroll_args(card_a, card_b, station))
    assert status == 0, err
    token_url = softhsm.url("ukms-bonn")
    provision(token_url, so_pin=SO_PIN)
    net = tmp_path / "net"
    net.mkdir()

    def saes(port_a: int, port_b: int) -> None:
        a = sae_conn(net, "sae-berlin-1", port_a)
        status, doc = call(a, "GET", "/api/v1/keys/sae-bonn-1/enc_keys?number=3")
        assert status == 200, doc
        b = sae_conn(net, "sae-bonn-1", port_b)
        ids = [{"key_ID": k["key_ID"]} for k in doc["keys"]]
        assert call(b, "POST", "/api/v1/keys/sae-berlin-1/dec_keys", {"key_IDs": ids}) == (
            200,
            doc,
        )

    run_network(
        net,
        Policy(),
        saes,
        edit=nodes_with_cards(card_a, card_b, station, SECRETS_B["pin"], token_url),
    )
    bonn_data = net / "data" / "ukms-bonn"
    assert list(bonn_data.glob("keys-*.db")), "UKMS Bonn stored the slave's keys"
    assert not (bonn_data / "node.key").exists(), "the token, not a key file, sealed them"
    assert (net / "data" / "ukms-berlin" / "node.key").exists()  # the default elsewhere


def test_a_card_that_refuses_the_pin_fails_closed_with_an_alarm(
    tmp_path, capsys, caplog, card_a, card_b, station
):
    status, _, err = run(capsys, *enroll_args(card_a, card_b, station))
    assert status == 0, err
    net = tmp_path / "net"
    net.mkdir()

    def saes(port_a: int, port_b: int) -> None:
        a = sae_conn(net, "sae-berlin-1", port_a)
        for _ in range(2):
            status, doc = call(a, "GET", "/api/v1/keys/sae-bonn-1/enc_keys")
            assert status == 503 and "PIN" not in doc["message"], doc

    with caplog.at_level("ERROR", logger="qkdn.kms"):
        run_network(
            net, Policy(), saes, edit=nodes_with_cards(card_a, card_b, station, "999999", None)
        )
    assert any(r.getMessage() == "PSK source unavailable" for r in caplog.records)
    user_pin = card_b.applet.state.pins[Ref.USER_PIN]
    assert user_pin.tries == user_pin.max_tries - 1, "a refused PIN is not presented again"
