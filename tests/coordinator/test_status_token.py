"""The operator's status token (coordinator/security.py): read from its file, refused when empty or a worker's."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.security import load_status_token


def test_the_status_token_is_the_files_text(tmp_path: Path) -> None:
    path = tmp_path / "status.token"
    path.write_text("  operator-secret\n")

    assert load_status_token(path, {"w1": "worker-secret"}) == "operator-secret"


@pytest.mark.parametrize(
    ("text", "message"),
    [("\n", "the file is empty"), ("worker-secret\n", "it is the token of a worker in --tokens-file")],
)
def test_an_empty_status_token_or_a_workers_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "status.token"
    path.write_text(text)

    with pytest.raises(ValueError, match=f"--status-token-file {path}: {message}"):
        load_status_token(path, {"w1": "worker-secret"})
