"""No test sleeps as evidence or asserts a duration (issue 13 item 24), read from the test
sources' syntax trees.

Allowed: a sleep inside a loop that waits for a condition (a ``while``, or a ``for`` that
leaves on success), ``asyncio.sleep(0)`` (one turn of the event loop, no time), and an
assert on the clock inside such a loop (the bound of a poll). Refused: any other sleep
("give it time") and any other assert that reads the clock, directly or through a name
assigned from it (``took = time.monotonic() - t0``; ``assert took < 3``), or from a
function of the same file that returns a clock reading (``error, took = timed(call)``).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CLOCKS = {"monotonic", "perf_counter", "time", "monotonic_ns", "perf_counter_ns", "time_ns"}


def _call_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute):
            return func.attr
        if isinstance(func, ast.Name):
            return func.id
    return None


def _reads_clock(node: ast.AST, clock_names: set[str], clocks: set[str] = CLOCKS) -> bool:
    return any(
        _call_name(n) in clocks or (isinstance(n, ast.Name) and n.id in clock_names)
        for n in ast.walk(node)
    )


def _clock_targets(target: ast.AST, value: ast.AST, clocks: set[str]) -> set[str]:
    """The names an assignment binds to a clock reading (pairwise for ``a, b = x, y``)."""
    if (
        isinstance(target, ast.Tuple | ast.List)
        and isinstance(value, ast.Tuple | ast.List)
        and len(target.elts) == len(value.elts)
    ):
        return {
            name
            for t, v in zip(target.elts, value.elts, strict=True)
            for name in _clock_targets(t, v, clocks)
        }
    if not _reads_clock(value, set(), clocks):
        return set()
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, ast.Tuple | ast.List):  # unpacked from a call: all of them
        return {n.id for n in target.elts if isinstance(n, ast.Name)}
    return set()


def _is_sleep(node: ast.AST) -> bool:
    if _call_name(node) != "sleep" or not isinstance(node, ast.Call) or not node.args:
        return False
    first = node.args[0]
    return not (isinstance(first, ast.Constant) and first.value == 0)


def _leaves(loop: ast.For | ast.AsyncFor) -> bool:
    """A ``for`` that stops on success: a retry loop, not a paced sequence."""
    return any(isinstance(n, ast.Break | ast.Return | ast.Raise) for n in ast.walk(loop))


class Finder(ast.NodeVisitor):
    """Walks one file; ``found`` lists what the rule refuses."""

    def __init__(self, shown: str) -> None:
        self.shown, self.found = shown, list[str]()
        self.polling = 0  # depth of enclosing loops that wait for a condition
        self.clock_names: set[str] = set()
        self.clocks = set(CLOCKS)  # and the file's functions that return a clock reading

    def visit_Module(self, node: ast.Module) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                isinstance(r, ast.Return) and r.value is not None and _reads_clock(r.value, set())
                for r in ast.walk(sub)
            ):
                self.clocks.add(sub.name)
        self.generic_visit(node)

    def _here(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{self.shown}:{node.lineno}: {what}")

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.clock_names = self.clock_names, set()
        polling, self.polling = self.polling, 0  # a function body runs where it is called
        for sub in ast.walk(node):
            if isinstance(sub, ast.Assign):
                for target in sub.targets:
                    self.clock_names |= _clock_targets(target, sub.value, self.clocks)
        self.generic_visit(node)
        self.clock_names, self.polling = outer, polling

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_While(self, node: ast.While) -> None:
        self.polling += 1
        self.generic_visit(node)
        self.polling -= 1

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        leaves = _leaves(node)
        self.polling += leaves
        self.generic_visit(node)
        self.polling -= leaves

    visit_AsyncFor = visit_For  # type: ignore[assignment]

    def visit_Call(self, node: ast.Call) -> None:
        if _is_sleep(node) and not self.polling:
            self._here(node, "a sleep that waits for no condition")
        self.generic_visit(node)

    def visit_Assert(self, node: ast.Assert) -> None:
        if not self.polling and _reads_clock(node.test, self.clock_names, self.clocks):
            self._here(node, "an assert on the clock (a duration)")
        self.generic_visit(node)


def findings(path: Path, shown: str | None = None) -> list[str]:
    """What the rule refuses in one source file, as ``file:line: what`` lines."""
    finder = Finder(shown or str(path.relative_to(TESTS.parent)))
    finder.visit(ast.parse(path.read_text(), str(path)))
    return finder.found


def test_no_test_sleeps_as_evidence_or_asserts_a_duration():
    found = [line for path in sorted(TESTS.rglob("*.py")) for line in findings(path)]
    assert not found, "\n".join(found)


def test_the_check_sees_what_it_refuses(tmp_path):
    refused = tmp_path / "refused.py"
    refused.write_text(
        "import time, asyncio\n"
        "def test_a():\n"
        "    time.sleep(0.3)\n"
        "    started = time.monotonic()\n"
        "    took = time.monotonic() - started\n"
        "    assert took < 3\n"
        "async def test_b(loop):\n"
        "    for _ in range(3):\n"
        "        await asyncio.sleep(0.001)\n"
        "    assert loop.time() < 5\n"
        "def timed(call):\n"
        "    start = time.monotonic()\n"
        "    call()\n"
        "    return time.monotonic() - start\n"
        "def test_c(call):\n"
        "    assert timed(call) < 1\n"
    )
    allowed = tmp_path / "allowed.py"
    allowed.write_text(
        "import time, asyncio\n"
        "def poll(done):\n"
        "    deadline = time.monotonic() + 5\n"
        "    while not done():\n"
        "        assert time.monotonic() < deadline, 'never'\n"
        "        time.sleep(0.05)\n"
        "async def turn():\n"
        "    await asyncio.sleep(0)\n"
        "def retry(call):\n"
        "    for _ in range(40):\n"
        "        try:\n"
        "            return call()\n"
        "        except AssertionError:\n"
        "            time.sleep(0.5)\n"
    )
    got = findings(refused, "refused")
    assert [int(line.split(":")[1]) for line in got] == [3, 6, 9, 10, 16]
    assert findings(allowed, "allowed") == []
