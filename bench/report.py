"""How every benchmark reports: progress on stderr, then its figures last on stdout, one per line as name=value."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections.abc import Mapping, Sequence

import torch

MB = 1e6  # benchmark figures use decimal megabytes (MB/s)


def _format(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.6f}".rstrip("0").rstrip(".")
        return f"{value:.4g}"
    return str(value)


def emit(figures: Mapping[str, object]) -> None:
    """The figures, one per line as name=value: the last thing a benchmark prints."""
    for name, value in figures.items():
        print(f"{name}={_format(value)}", flush=True)


def machine() -> dict[str, object]:
    """Where a run happened, printed with its figures."""
    out: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "cpu_cores": os.cpu_count() or 0,
        "cpu_arch": platform.machine(),
        "torch": torch.__version__,
    }
    try:
        import grpc

        out["grpcio"] = grpc.__version__
    except ImportError:  # the training benchmark needs no gRPC
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name().replace(" ", "_")
    return out


def log(message: str) -> None:
    """Progress on stderr, so that stdout ends with the figures alone."""
    print(message, file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
