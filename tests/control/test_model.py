"""The document builder and gNMI path handling without a server: IDs, selection, bounds,
and the path parser fuzzed."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.control import model
from appliance.control.client import parse_path, path_text
from appliance.control.errors import ControlError, PathError
from tests.control.agentfix import telemetry


def test_node_uuids_round_trip_and_foreign_ones_are_refused():
    assert model.node_of(model.node_uuid(16)) == 16
    with pytest.raises(PathError):
        model.node_of("6b0f1c52-3a44-5d0e-9c1a-0a5d2c1e7f00")


def test_routes_are_virt_links_with_their_hops():
    doc = model.document(telemetry(routes=(model.Route(src=1, dst=5, prev_hop=None, next_hop=4),)))
    links = doc["etsi-qkd-sdn-node:qkd_node"]["qkd_links"]["qkd_link"]
    virt = [x for x in links if x["qkdl_type"] == "etsi-qkd-node-types:VIRT"]
    assert virt == [
        {
            "qkdl_id": model.route_uuid(1, 5),
            "qkdl_status": "etsi-qkd-node-types:ACTIVE",
            "qkdl_local": {"qkdn_id": model.node_uuid(1)},
            "qkdl_remote": {"qkdn_id": model.node_uuid(5)},
            "qkdl_type": "etsi-qkd-node-types:VIRT",
            "virt_next_hop": [model.node_uuid(4)],
        }
    ]


def test_a_keyless_list_selects_the_whole_list_only_at_the_end():
    doc = model.document(telemetry())
    path = model.elems([("qkd_node", {}), ("qkd_links", {}), ("qkd_link", {})])
    assert len(model.select(doc, path)) == 2


def test_the_path_text_round_trips():
    text = "/qkd_node/qkd_links/qkd_link[qkdl_id=a/b]/qkdl_status"
    assert path_text(parse_path(text)) == text


@pytest.mark.parametrize(
    "text",
    ["qkd_node", "/" + "a/" * 13 + "a", "/a[k=" + "v" * 65 + "]", "/a[", "/a]b", "/" + "x" * 1100],
)
def test_bad_path_texts_are_refused(text):
    with pytest.raises(PathError):
        parse_path(text)


@given(st.text(max_size=200))
def test_the_path_parser_only_ever_answers_or_refuses(text):
    try:
        path = parse_path(text)
    except ControlError:
        return
    doc = model.document(telemetry())
    with contextlib.suppress(ControlError):
        model.select(doc, model.elems([(e.name, dict(e.key)) for e in path.elem]))
