"""Every state table of the KMS engines, pair by pair and as a graph.

For each table of :data:`appliance.kms.engines.states.TABLES` and every (state, input) of
the two enums: :meth:`Table.next` gives the listed state or raises ``UnexpectedInput``
(``KMS-STATE``); :meth:`Table.advance` moves a request on, or to the failed state on an
unlisted pair. As a graph: terminal states have no transitions, every state of a table
can still end (in DONE and in FAILED), and every listed transition is reachable from the
state the engines start that kind of request in (:data:`STARTS`, read from the engines).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import pytest

from appliance.kms.engines import states
from appliance.kms.engines.states import TABLES, I, S
from appliance.kms.errors import ProtocolError
from appliance.kms.fsm import Table, UnexpectedInput

Tbl = Table[S, I]

STARTS: dict[str, frozenset[S]] = {
    "relay": frozenset({S.OPENING, S.SEALING}),  # from the previous hop; handed over locally
    "akms-a": frozenset({S.VALIDATING}),
    "akms-stocked": frozenset({S.VALIDATING}),
    "rekey": frozenset({S.ASKING}),
    "channel": frozenset({S.ASKING}),
    "akms-b": frozenset({S.PATHING}),
    "channel-open": frozenset({S.DERIVING}),
    "grant": frozenset({S.READING}),
    "ukms-enc": frozenset({S.LEASING, S.ASKING}),  # a stocked pair's usual size; any other
    "refill": frozenset({S.ASKING}),
    "ukms-dec": frozenset({S.TAKING}),
    "delivery": frozenset({S.OPENING}),
}
"""The state each engine creates a request of each table in (``Relayed(S.OPENING ...``,
``Enc(S.ASKING ...`` then ``S.LEASING`` for a stocked pair, ...). Table has no start
state of its own; a new table must be added here."""

IDS = [t.name for t in TABLES]


@dataclass
class Request:
    state: S


def states_of(table: Tbl) -> set[S]:
    """The states a table names (as a source or a target)."""
    found = set(table.transitions)
    for row in table.transitions.values():
        found |= set(row.values())
    return found


def reachable(table: Tbl, start: set[S]) -> set[S]:
    seen, queue = set(start), deque(start)
    while queue:
        for nxt in table.transitions.get(queue.popleft(), {}).values():
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def test_every_table_is_listed_with_its_start_states():
    assert len({t.name for t in TABLES}) == len(TABLES)
    assert set(STARTS) == {t.name for t in TABLES}
    for table in TABLES:
        assert STARTS[table.name] <= set(table.transitions), table.name
    declared = [v for v in vars(states).values() if isinstance(v, Table)]
    assert {id(t) for t in declared} == {id(t) for t in TABLES}, "a table left out of TABLES"


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_next_gives_the_listed_state_or_a_coded_error_for_every_pair(table: Tbl):
    pairs = list(table.pairs())
    assert len(pairs) == len(S) * len(I)  # the whole product of the two enums
    listed = 0
    for state, event, expected in pairs:
        assert expected == table.transitions.get(state, {}).get(event)
        if expected is not None:
            assert table.next(state, event) is expected
            listed += 1
            continue
        with pytest.raises(UnexpectedInput) as caught:
            table.next(state, event)
        assert caught.value.code == "KMS-STATE"
        assert isinstance(caught.value, ProtocolError)
        assert table.name in caught.value.message
        assert state.name in caught.value.message and event.name in caught.value.message
    assert listed == sum(len(row) for row in table.transitions.values()) > 0


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_advance_moves_on_or_fails_the_request_for_every_pair(table: Tbl):
    for state, event, expected in table.pairs():
        request = Request(state)
        if expected is not None:
            assert table.advance(request, event) is expected
            assert request.state is expected
            continue
        with pytest.raises(UnexpectedInput):
            table.advance(request, event)
        assert request.state is table.failed is S.FAILED


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_terminal_states_have_no_transitions(table: Tbl):
    assert table.terminal == {S.DONE, S.FAILED}
    assert table.failed in table.terminal
    for state in table.terminal:
        assert not table.transitions.get(state)
        for event in I:
            with pytest.raises(UnexpectedInput):
                table.next(state, event)


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_every_transition_is_reachable_from_the_start(table: Tbl):
    seen = reachable(table, set(STARTS[table.name]))
    assert set(table.transitions) <= seen, set(table.transitions) - seen
    assert states_of(table) <= seen


def _can_end(table: Tbl, end: S) -> list[S]:
    """The non-terminal states of ``table`` from which ``end`` cannot be reached."""
    return sorted(
        (s for s in states_of(table) - table.terminal if end not in reachable(table, {s})),
        key=lambda s: s.name,
    )


def _cases(end: S) -> list[object]:
    return [pytest.param(t, id=t.name) for t in TABLES]


@pytest.mark.parametrize("table", _cases(S.DONE))
def test_every_state_can_still_end_done(table: Tbl):
    assert _can_end(table, S.DONE) == []


SETTLED = {("channel", S.OPEN)}
"""States whose life can no longer fail: an open channel only re-keys (a re-key that fails
leaves it open under its current key) or closes."""


@pytest.mark.parametrize("table", _cases(S.FAILED))
def test_every_state_can_still_fail(table: Tbl):
    assert [s for s in _can_end(table, S.FAILED) if (table.name, s) not in SETTLED] == []


def test_a_table_refuses_terminal_states_with_transitions():
    end = frozenset({S.DONE, S.FAILED})
    with pytest.raises(ValueError, match="terminal"):
        Table("bad", {S.DONE: {I.VALID: S.FAILED}}, failed=S.FAILED, terminal=end)
    with pytest.raises(ValueError, match="terminal"):
        Table("bad", {S.ASKING: {I.ANSWER: S.DONE}}, failed=S.FAILED, terminal=frozenset({S.DONE}))
