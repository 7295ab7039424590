"""A real UKMS process killed between a dec_keys take and its answer (issue 13, item 10).

The simulation crashes the slave's UKMS at every step of a dec_keys
(``tests/kms/test_sim.py``); this is the same moment in a network of OS processes. The
nodes start with the node adapter's test seam (``appliance.kms.node.EXIT_AFTER_TAKE``):
when the test leaves a marker file for ``ukms-bonn``, that node exits as in a crash right
after its next dec_keys take has committed, before the answer is written. The supervisor
restarts it; the slave SAE, whose connection was cut, asks again and must get the same
keys with the same bits, once; no other SAE may get them, before or after. The keys stay
fetchable for their slave for ``appliance.kms.store.REFETCH_WINDOW`` seconds after the
first take (5 minutes), then the store deletes them.
"""

from __future__ import annotations

import http.client
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.kms.node import EXIT_AFTER_TAKE
from tests.kms.conftest import Net, running_net

MASTER, SLAVE, OTHER = "sae-berlin-1", "sae-bonn-1", "sae-bonn-2"
SLAVE_UKMS = "ukms-bonn"


@pytest.fixture(scope="module")
def seamed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Net, Path]]:
    markers = tmp_path_factory.mktemp("exit-markers")
    before = os.environ.get(EXIT_AFTER_TAKE)
    os.environ[EXIT_AFTER_TAKE] = str(markers)  # inherited by the supervisor and its nodes
    try:
        # the key path (AAA included); the node agents and the manager are tests/mgmt's
        with running_net(tmp_path_factory, "--stock", "0", "--no-mgmt") as net:
            if before is None:
                del os.environ[EXIT_AFTER_TAKE]
            else:
                os.environ[EXIT_AFTER_TAKE] = before
            yield net, markers
    finally:
        if before is None:
            os.environ.pop(EXIT_AFTER_TAKE, None)


def test_a_ukms_killed_after_the_take_serves_the_same_keys_again(
    seamed: tuple[Net, Path],
) -> None:
    net, markers = seamed
    got = net.enc_keys(MASTER, SLAVE, number=2)
    assert got.status == 200, got.body
    ids = [k["key_ID"] for k in got.json()["keys"]]
    pid = int(net.node(SLAVE_UKMS)["pid"])
    mark = net.log_mark(SLAVE_UKMS)

    marker = markers / SLAVE_UKMS
    marker.touch()
    with pytest.raises((http.client.HTTPException, ConnectionError, ssl.SSLError)):
        net.dec_keys(SLAVE, MASTER, ids)  # the node dies with the answer unwritten
    assert not marker.exists()  # the seam fired (it deletes its marker first)
    net.wait_restarted(SLAVE_UKMS, pid)

    stolen = net.dec_keys(OTHER, MASTER, ids)  # another SAE at the same node
    assert stolen.status != 200, stolen.body
    again = net.dec_keys(SLAVE, MASTER, ids)
    assert again.status == 200, again.body
    assert again.json() == got.json()  # the same IDs with the same bits, in order
    twice = net.dec_keys(SLAVE, MASTER, ids)
    assert twice.status != 200, twice.body  # released once the answer left
    assert net.dec_keys(OTHER, MASTER, ids).status != 200
    log = "\n".join(net.log_since(SLAVE_UKMS, mark))
    assert "integrity alarm" not in log  # routine recovery is not an attack
