"""Floors for the layout: no module of the library (minasgd/ and kernels/) over MAX_MODULE_LINES
lines, no function or method over MAX_FUNCTION_LINES (its whole body, docstring included).
Short modules with one job each and functions that fit on a screen are what keep the code
readable; a module that outgrows the floor is split by job, not trimmed of its comments."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
LIBRARY = (ROOT / "minasgd", ROOT / "kernels")


def library_files():
    return sorted(p for base in LIBRARY for p in base.rglob("*.py") if "__pycache__" not in p.parts)


def long_functions(source, where="<source>"):
    """["where:line name (n lines)"] for every function or method longer than MAX_FUNCTION_LINES."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = node.end_lineno - first + 1
            if lines > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return found


def long_module(source, where="<source>"):
    lines = source.count("\n") + (not source.endswith("\n") and bool(source))
    return [f"{where} ({lines} lines)"] if lines > MAX_MODULE_LINES else []


def test_the_walk_finds_the_library():
    names = {p.relative_to(ROOT).as_posix() for p in library_files()}
    assert {"minasgd/ps/server.py", "kernels/conv.py", "minasgd/train.py"} <= names


def test_no_module_over_the_floor():
    found = [m for p in library_files() for m in long_module(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert found == [], f"modules over {MAX_MODULE_LINES} lines: split them by job"


def test_no_function_over_the_floor():
    found = [f for p in library_files() for f in long_functions(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert found == [], f"functions over {MAX_FUNCTION_LINES} lines: split them"


def test_the_checks_catch_planted_offenders():
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # decorator + def + 80 = 82 lines
    planted = f"import os\n\n\nclass A:\n    @staticmethod\n    def long(self):\n{body}\n\n\ndef short():\n    return 1\n"
    assert long_functions(planted, "planted.py") == ["planted.py:6 long (82 lines)"]  # decorator counts
    exactly = "def f():\n" + "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1)) + "\n"
    assert long_functions(exactly) == []  # 80 lines is allowed
    assert long_module("x = 1\n" * MAX_MODULE_LINES) == []
    assert long_module("x = 1\n" * (MAX_MODULE_LINES + 1), "big.py") == [f"big.py ({MAX_MODULE_LINES + 1} lines)"]
