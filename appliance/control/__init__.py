"""The QKDN Controller's side of the network: the SDN agent of every CKMS node (gNMI over
mutual TLS, ETSI GS QKD 015 paths) and the controller's sans-IO routing core.

- :mod:`model`: a node's telemetry as typed values, and its JSON_IETF document under the
  ETSI GS QKD 015 V2.1.1 model and our augment (``yang/``); gNMI path selection.
- :mod:`agent`: the gNMI server (Capabilities, Get, Subscribe ONCE / POLL / STREAM with
  SAMPLE and ON_CHANGE) on pygnmi's compiled stubs and grpcio.
- :mod:`graph`: the controller's live graph, link weights, shortest and disjoint backup
  paths, path cache, and the hold-off that turns link telemetry into up/down (no I/O).

See docs/control.md.
"""

import os

from appliance.control.errors import ControlError

# grpcio's C core logs every failed TLS handshake (a port probe of `net up`, a peer of
# another CA) to stderr at INFO; the agent and the controller report what matters.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__all__ = ["ControlError"]
