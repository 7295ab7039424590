"""The KMS role engines: UKMS, AKMS and CKMS as state machines without I/O.

``engine.handle(event, now) -> list[Action]`` is each engine's whole interface
(:mod:`appliance.kms.events`); the node adapter (:mod:`appliance.kms.node`) and the
simulation (:mod:`appliance.kms.sim`) carry the actions out. The life of every request is
a state table (:mod:`states`); the shared machinery (continuations, timers, link keys) is
in :mod:`base`; :mod:`config` says what an engine knows of its node and network.

These modules never import ``asyncio``, ``socket``, ``ssl``, ``sqlite3`` or ``time`` (a
test parses their imports), never read a clock (``now`` comes with every event) and never
log: alarms and notices are actions.
"""

from appliance.kms.engines.akms import AkmsEngine
from appliance.kms.engines.base import EngineBase
from appliance.kms.engines.ckms import CkmsEngine
from appliance.kms.engines.config import EngineConfig, Policy
from appliance.kms.engines.ukms import UkmsEngine

__all__ = ["AkmsEngine", "CkmsEngine", "EngineBase", "EngineConfig", "Policy", "UkmsEngine"]
