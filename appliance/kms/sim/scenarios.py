"""Targeted schedules: a UKMS crashed at every step of one SAE request (issue 13, item 10).

A *quiet* world (:func:`quiet_world`) has no random fault and one SAE transaction: the
master's enc_keys, then the slave's dec_keys; every other SAE of the network tries to
fetch the keys at each dec_keys. Played once with a recorder, it tells which steps are
the request's at the UKMS that serves it (:func:`steps_of`): for dec_keys every step at
the slave's UKMS from the SAE's request to the commit of the keys' release; for enc_keys
every step at the master's UKMS from the request to the answer written to the master.
:func:`crash_after` plays the same seed again and kills that UKMS right after one of
those steps (it restarts a moment later with only its committed store, and the SAE asks
again as a client does after a reset connection). The schedule then goes on to its end
and is checked like any other (:func:`appliance.kms.sim.checks.violations`): each key
handed to the master is fetched by the named slave exactly once with the same bits, and
by no other SAE.

Nothing here changes the engines or the store: the crash is the world's, at a step
boundary, which is where a process can die between two effects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from appliance.kms.engines.config import Policy
from appliance.kms.events import StoreOp
from appliance.kms.relay import Mode
from appliance.kms.sim.checks import Observations, violations
from appliance.kms.sim.world import Faults, World
from appliance.kms.storeops import Release

Side = Literal["dec", "enc"]


def quiet_world(seed: int, *, stock: int = 0, mode: Mode = Mode.GCM, **options: Any) -> World:
    """One transaction, no random fault, every other SAE trying to fetch its keys."""
    return World(
        seed,
        policy=Policy(patience=2.0, stock=stock, mode=mode),
        faults=Faults(),
        requests=1,
        must_succeed=False,
        probes=1.0,
        twins=0.0,
        **options,
    )


@dataclass(frozen=True)
class Plan:
    """The steps of one request at the UKMS that serves it, in a quiet world's schedule."""

    node: int
    """The UKMS (node ID) the crashes hit."""
    steps: tuple[int, ...]
    """Step numbers of the request at that node (a crash point follows each)."""


def steps_of(seed: int, side: Side, **options: Any) -> Plan:
    """Play the quiet schedule once and find the request's steps at its UKMS."""
    seen: list[tuple[int, str, int | None, Any]] = []

    def record(world: World, step: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        seen.append((step, getattr(fn, "__name__", ""), world.node_of(fn, args), args))

    world = quiet_world(seed, step_hook=record, **options)
    world.run()
    (txn,) = world.txns
    sae = txn.slave if side == "dec" else txn.master
    node = world.saes[sae].node
    first = next(s for s, name, _, _ in seen if name == f"_{side}")
    if side == "dec":
        last = next(
            s
            for s, name, at, args in seen
            if s > first and at == node and name == "_commit" and _releases(args[3])
        )
    else:
        last = next(
            s
            for s, name, at, args in seen
            if s > first and at == node and name == "_sae_written" and args[4] == "enc"
        )
    steps = [s for s, _, at, _ in seen if first <= s <= last and (at == node or s == first)]
    return Plan(node, (first - 1, *steps))


def _releases(action: Any) -> bool:
    return isinstance(action, StoreOp) and isinstance(action.op, Release)


@dataclass
class Crashed:
    """A quiet schedule in which the UKMS died right after one step."""

    step: int
    world: World
    obs: Observations
    found: list[str]


def crash_after(seed: int, plan: Plan, step: int, **options: Any) -> Crashed:
    """Play the quiet schedule again, crashing ``plan.node`` right after ``step``."""

    def crash(world: World, at: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if at == step + 1:
            world.crash(plan.node)

    world = quiet_world(seed, step_hook=crash, **options)
    obs = world.run()
    found = violations(obs, world.faults)
    if not obs.crashes:
        found.append(f"the UKMS was not crashed after step {step}")
    return Crashed(step, world, obs, found)
