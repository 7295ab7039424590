"""Paths through the carrier network, until the QKDN Controller issue takes this over.

Dijkstra over the topology's QKD links by length (km), through nodes that run a CKMS.
Ties break towards the lower node IDs, so every node computes the same path.
"""

from __future__ import annotations

import heapq

from appliance.config.topology import Topology
from appliance.kms.errors import KmsError


class NoRoute(KmsError):
    """No path of working links joins the two CKMS."""

    code = "KMS-NO-ROUTE"


def shortest_path(
    topo: Topology, src: int, dst: int, *, avoid_links: frozenset[str] = frozenset()
) -> list[int]:
    """Node IDs from ``src`` to ``dst`` over CKMS nodes, shortest by length."""
    carriers = {n.id for n in topo.spec.nodes if "ckms" in n.roles}
    if src not in carriers or dst not in carriers:
        raise NoRoute(f"no carrier path between nodes {src} and {dst}")
    best: dict[int, float] = {src: 0.0}
    previous: dict[int, int] = {}
    queue = [(0.0, src)]
    while queue:
        dist, node = heapq.heappop(queue)
        if node == dst:
            break
        if dist > best.get(node, float("inf")):
            continue
        for link, peer in sorted(topo.neighbours(node), key=lambda lp: lp[1].id):
            if peer.id not in carriers or link.id in avoid_links:
                continue
            cand = dist + link.length_km
            if cand < best.get(peer.id, float("inf")):
                best[peer.id], previous[peer.id] = cand, node
                heapq.heappush(queue, (cand, peer.id))
    if dst not in best:
        raise NoRoute(f"no carrier path between nodes {src} and {dst}")
    path = [dst]
    while path[-1] != src:
        path.append(previous[path[-1]])
    return path[::-1]
