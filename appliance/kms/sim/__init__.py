"""Deterministic simulation of a whole KMS network, in the spirit of FoundationDB's.

One process runs the engines of every node (:mod:`world`) on a seeded scheduler with a
virtual clock; the scheduler loses, reorders, delays and duplicates messages, crashes and
restarts nodes (keeping only what their stores committed, :mod:`models`), takes links
down and runs QKD modules dry (:mod:`qkdm`). After each schedule :mod:`checks` verifies
the invariants of the key flow. :mod:`scenarios` crashes a UKMS at every step of one SAE
request; :mod:`story` tells a schedule step by step, without key bits.

``python bench/simulate.py --schedules N`` explores N seeds; a failing seed replays
exactly: ``python bench/simulate.py --seed N --schedules 1 --verbose``. The simulation
never runs in a node and never touches a real store, device or network.
"""

from appliance.kms.sim.checks import Observations, violations
from appliance.kms.sim.world import Faults, World, run

__all__ = ["Faults", "Observations", "World", "run", "violations"]
