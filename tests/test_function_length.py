"""No function outside tests is longer than a reader takes in at once (80 lines, decorators and docstring included):
the library, the commands, the trainers, the pipelines and the benchmarks."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("clipcond", "pipelines", "train", "benchmarks")
MAX_LINES = 80


def long_functions(source: str, max_lines: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method of `source` over `max_lines` lines, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if node.end_lineno - first + 1 > max_lines:
                found.append((node.name, node.end_lineno - first + 1))
    return found


def test_the_check_counts_a_function_from_its_decorator_to_its_last_line():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES - 2))  # + `def` line + decorator = MAX_LINES
    fits = f"@decorator\ndef fits():\n{body}\n"
    assert long_functions(fits) == []
    nested = "class C:\n" + textwrap.indent(f"@decorator\ndef method():\n{body}\n    return x0\n", "    ")
    assert long_functions(nested) == [("method", MAX_LINES + 1)]


def test_no_function_outside_tests_is_over_80_lines():
    too_long = [
        f"{path.relative_to(ROOT)}: {name} ({lines} lines)"
        for folder in FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name, lines in long_functions(path.read_text())
    ]
    assert not too_long, f"split these functions (at most {MAX_LINES} lines each): {too_long}"
