"""The checked-in generated protobuf code is what `make proto` produces from proto/."""

from __future__ import annotations

import filecmp
from pathlib import Path

from tools.gen_proto import OUT, generate


def test_checked_in_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    checked_in = sorted(p.relative_to(OUT) for p in OUT.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == checked_in
    differing = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, OUT / p, shallow=False)]
    assert differing == [], f"run `make proto`: {differing} differ from a fresh generation"
