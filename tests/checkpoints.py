"""Checkpoints a test expects to find: loaded, or the test fails naming the folder (the loaders return None)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedcore.federation.checkpoint import RunState, load_private, load_run


def saved_run(directory: str | Path) -> tuple[dict[str, torch.Tensor], RunState]:
    """The last committed checkpoint in `directory`: its global model and run state."""
    loaded = load_run(directory)
    assert loaded is not None, f"no run checkpointed in {directory}"
    return loaded


def saved_private(directory: str | Path, client: str, completed_rounds: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """`client`'s private parts in `directory` (the newest, or after `completed_rounds`), with their round count."""
    loaded = load_private(directory, client, completed_rounds)
    assert loaded is not None, f"no private parts of {client!r} in {directory}"
    return loaded
