"""Key material never reaches a log record or any output: a canary is planted and hunted."""

from __future__ import annotations

import base64
import io
import json
import logging

import pytest

from appliance import cli, logs
from hal.emulated import keys as emulated_keys
from hal.qkdm import QkdKey

CANARY = bytearray(bytes.fromhex("c0ffee00deadbeef" * 4))


def forms(material: bytes) -> list[str]:
    """The ways a key could leak into text."""
    raw = bytes(material)
    return [
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode(),
        repr(raw)[2:-1],
        str(list(raw))[1:-1],
    ]


def test_planted_canary_is_redacted_from_careless_log_calls():
    stream = io.StringIO()
    logs.install_redaction()
    logs.configure("debug", "json", stream)
    log = logging.getLogger("qkdn.test")
    key = QkdKey(key_id="0f0f0f0f-0000-4000-8000-000000000000", material=bytearray(CANARY))
    log.info("taken %s", key)
    log.info("raw %r and %s", bytes(CANARY), bytearray(CANARY))
    log.warning("fields", extra={"key": bytes(CANARY), "keys": [key], "nested": {"k": CANARY}})
    text = stream.getvalue()
    for form in forms(CANARY):
        assert form not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert records[0]["msg"] == "taken <key 0f0f0f0f-0000-4000-8000-000000000000>"
    assert records[1]["msg"] == "raw '<redacted 32 bytes>' and <redacted 32 bytes>"
    assert records[2]["key"] == "<redacted 32 bytes>" and records[2]["level"] == "warning"


def test_no_key_of_a_demo_run_appears_in_logs_or_output(tmp_path, capsys, caplog, monkeypatch):
    """Every key the emulated modules produce during a debug-logged demo is a canary."""
    produced: list[bytes] = []
    real_key = emulated_keys.KeyStream.key

    def recording_key(self, index):
        material = real_key(self, index)
        produced.append(bytes(material))
        return material

    monkeypatch.setattr(emulated_keys.KeyStream, "key", recording_key)
    report = tmp_path / "report.json"
    caplog.set_level(logging.DEBUG)
    status = cli.main(
        [
            "--log-level",
            "debug",
            "--log-format",
            "json",
            "demo",
            "--days",
            "0.02",
            "--verify-every",
            "1",
            "--seed",
            "canary",
            "--requests",
            "50",
            "--json",
            str(report),
        ]
    )
    assert status == 0
    out, err = capsys.readouterr()
    assert len(produced) >= 2 * 16 * 50, "the demo should have handled many keys"
    haystack = "\n".join(
        [out, err, caplog.text, report.read_text(), *(str(r.__dict__) for r in caplog.records)]
    )
    assert "quantum layer started" in haystack  # the logs really were captured
    for material in produced:
        for form in forms(material)[:3]:
            assert form not in haystack


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    logs.configure("warning", "text")
