"""docs/FAULTS.md is checked by the tests: every test it names exists, and every test of the files that run bad
input and faults has a row there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COVERED_FILES = ("tests/test_preflight.py", "tests/test_bad_input.py", "tests/test_faults.py")


def named_tests() -> set[tuple[str, str]]:
    text = (REPO / "docs" / "FAULTS.md").read_text(encoding="utf-8")
    return set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", text))


def functions_in(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_table_names_exists():
    named = named_tests()
    assert len(named) > 20
    missing = sorted(f"{path}::{name}" for path, name in named if name not in functions_in(path))
    assert missing == []


def test_every_bad_input_and_fault_test_has_a_row():
    named = named_tests()
    unlisted = sorted(f"{path}::{name}" for path in COVERED_FILES for name in functions_in(path)
                      if (path, name) not in named)
    assert unlisted == []
