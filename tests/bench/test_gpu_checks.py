"""bench/gpu_checks.sh, the one command of every GPU check: bad arguments refused before anything runs, and
each step's exit status and last line reported with its log in the output folder (the gpu tests step, which
skips on a CPU, stands for the others)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_checks.sh"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_missing_data_folder_or_no_step_is_refused_naming_it(tmp_path: Path) -> None:
    missing = _run(tmp_path, str(tmp_path / "nowhere"), "tests")
    assert missing.returncode == 2 and f"DATA_ROOT {tmp_path / 'nowhere'}: not a folder" in missing.stderr
    none = _run(tmp_path, str(tmp_path))
    assert none.returncode == 2 and "name at least one step" in none.stderr
    assert not (tmp_path / "out").exists()


def test_each_step_reports_its_exit_status_and_keeps_its_log(tmp_path: Path) -> None:
    done = _run(tmp_path, str(tmp_path), "unknown-step", "tests")  # the tests step reads no data
    assert done.returncode == 1, done.stdout + done.stderr  # one step failed, the next still ran
    out = tmp_path / "out"
    assert "unknown step unknown-step" in (out / "unknown-step.log").read_text()
    assert "unknown-step: exit 2" in done.stdout
    assert "tests: exit 0" in done.stdout and "deselected" in (out / "tests.log").read_text()
    assert "torch" in (out / "env.txt").read_text()
