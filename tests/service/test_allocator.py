"""Tests for service.allocator: the malloc settings take page faults out of MiB-sized message churn, and are
left alone where the user chose their own."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.allocator import tune_for_streaming

ROOT = Path(__file__).resolve().parents[2]
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

# Eight 1 MiB messages alive at once, then freed, 50 times: the shape of a stream's chunk churn.
CHURN = textwrap.dedent(
    """
    import sys
    from service.allocator import tune_for_streaming
    applied = tune_for_streaming() if sys.argv[1] == "tuned" else False
    def minor_faults():
        return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
    blocks = [bytearray(1 << 20) for _ in range(8)]
    del blocks
    start = minor_faults()
    for _ in range(50):
        blocks = [bytearray(1 << 20) for _ in range(8)]
        del blocks
    print(applied, minor_faults() - start)
    """
)


def _churn(mode: str) -> tuple[bool, int]:
    env = {"PATH": "/usr/bin:/bin"}  # none of the user settings that would turn the tuning off
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@glibc_only
def test_tuned_process_reuses_freed_message_memory_without_page_faults() -> None:
    applied, tuned = _churn("tuned")
    _, default = _churn("default")

    assert applied
    # 400 MiB allocated and freed: with glibc's defaults most of it is faulted in again page by page
    # (about 100,000 faults measured); tuned, the same heap memory is reused.
    assert default > 20_000
    assert tuned < 1_000


@pytest.mark.parametrize(
    "environ",
    [
        {"FEDDIFF_MALLOC_TUNING": "0"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
    ],
)
def test_user_settings_are_left_alone(environ: dict[str, str]) -> None:
    assert tune_for_streaming(environ) is False
