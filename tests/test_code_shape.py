"""The house's size rules, checked on every run: a module in services/ is at
most 400 lines, and a function at most 60, unless the line that defines it
says why it is longer (``# long: <why>`` or a ``noqa`` with a reason)."""

from __future__ import annotations

import ast
import gc
import re
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[1] / "services"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
REASON = re.compile(r"#\s*(long|noqa:[^-]*)\s*[-:]\s*\S")


def _modules() -> list[Path]:
    return sorted(p for p in SERVICES.rglob("*.py") if not p.name.endswith("_pb2.py"))


def long_modules(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(SERVICES.parent)}: {lines} lines")
    return out


def _parse(text: str) -> ast.Module:
    # CPython 3.11 keeps one AST depth counter per interpreter (gh-106905).
    # A finalizer run by the collector in the middle of a parse, such as an
    # asyncio future an earlier test left with an exception, logs a traceback,
    # and 3.11's traceback module parses source for its carets: the nested
    # parse resets the counter, and ours fails with "recursion depth mismatch".
    # Such garbage is freed only by the collector, so it waits until after.
    gc.disable()
    try:
        return ast.parse(text)
    finally:
        gc.enable()


def long_functions(path: Path, text: str) -> list[str]:
    lines = text.splitlines()
    out = []
    for node in ast.walk(_parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            # The reason may sit on any line of the signature (a long one wraps).
            signature = "\n".join(lines[node.lineno - 1 : node.body[0].lineno - 1] or [lines[node.lineno - 1]])
            if length > MAX_FUNCTION_LINES and not REASON.search(signature):
                out.append(f"{path.name}:{node.lineno} {node.name}: {length} lines")
    return out


def test_no_module_in_services_is_over_400_lines() -> None:
    assert long_modules(_modules()) == []


def test_no_function_in_services_is_over_60_lines_without_a_reason() -> None:
    problems = [p for path in _modules() for p in long_functions(path, path.read_text())]
    assert problems == []


def test_the_checks_catch_a_long_function_and_accept_a_reason() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    assert long_functions(Path("m.py"), f"def f() -> None:\n{body}") == ["m.py:1 f: 62 lines"]
    assert long_functions(Path("m.py"), f"def f() -> None:  # long: a table\n{body}") == []
    assert long_functions(Path("m.py"), f"def f() -> None:  # noqa: C901 - steps in order\n{body}") == []
    assert long_functions(Path("m.py"), f"def f() -> None:  # long\n{body}") != [], "a reason is required"
