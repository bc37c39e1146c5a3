"""tools/make_demo_dataset.py writes exactly the committed data/demo (so the quickstart's data can be rebuilt)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_tool_rebuilds_the_committed_demo_dataset_byte_for_byte(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_dataset", REPO / "tools" / "make_demo_dataset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.make_demo_dataset(tmp_path)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    rebuilt, committed = files(tmp_path), files(REPO / "data" / "demo")
    assert sorted(rebuilt) == sorted(committed)
    assert len([name for name in rebuilt if name.startswith("train/10_sks shape/") and name.endswith(".png")]) == 16
    assert rebuilt == committed
