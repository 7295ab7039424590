"""State tables: the life of each request an engine handles, as data.

Rules of this file (and of every state module built on it, see
:mod:`appliance.kms.engines.states`):

* A table maps ``state -> {input: next state}`` and nothing else. Side effects live in the
  engine's handler for the input, which calls :meth:`Table.advance` *first*: an effect never
  runs for a transition the table does not allow.
* A pair the table does not list is a protocol error: :class:`UnexpectedInput` is raised
  and the request moves to the table's failed state, which is terminal. Nothing waits for an
  input that cannot come; nothing hangs.
* Terminal states have no outgoing transitions. A request in one is removed from its
  engine; an input for a request that no longer exists is a late input (an answer after a
  timeout, say), handled by the engine without a table.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Generic, Protocol, TypeVar

from appliance.kms.errors import ProtocolError

S = TypeVar("S", bound=Enum)
I = TypeVar("I", bound=Enum)  # noqa: E741 - the h2 habit: states S, inputs I


class UnexpectedInput(ProtocolError):
    """An input the request's state table does not allow in its current state."""

    code = "KMS-STATE"


class Stateful(Protocol[S]):
    state: S


class Table(Generic[S, I]):
    """One kind of request's transitions, its terminal states and its failed state."""

    def __init__(
        self,
        name: str,
        transitions: Mapping[S, Mapping[I, S]],
        *,
        failed: S,
        terminal: frozenset[S],
    ) -> None:
        self.name, self.transitions, self.failed, self.terminal = (
            name,
            transitions,
            failed,
            terminal,
        )
        if failed not in terminal or any(transitions.get(t) for t in terminal):
            raise ValueError(f"{name}: terminal states must have no transitions")

    def next(self, state: S, event: I) -> S:
        """The state after ``event`` in ``state``; UnexpectedInput if the pair is not listed."""
        nxt = self.transitions.get(state, {}).get(event)
        if nxt is None:
            raise UnexpectedInput(f"{self.name}: {event.name} is not expected in {state.name}")
        return nxt

    def advance(self, request: Stateful[S], event: I) -> S:
        """Move ``request`` on; on an unexpected pair it moves to the failed state and raises."""
        state = request.state
        row = self.transitions.get(state)  # self.next, inlined: this runs on every transition
        nxt = None if row is None else row.get(event)
        if nxt is None:
            request.state = self.failed
            raise UnexpectedInput(f"{self.name}: {event.name} is not expected in {state.name}")
        request.state = nxt
        return nxt

    def pairs(self) -> Iterator[tuple[S, I, S | None]]:
        """Every (state, input) pair of the two enums with its next state, or None (tests)."""
        states = type(self.failed)
        inputs = type(next(iter(next(iter(self.transitions.values())))))
        for state in states:
            for event in inputs:
                yield state, event, self.transitions.get(state, {}).get(event)
