"""The round log (rounds.jsonl): one JSON line per closed round, or per evaluation, written by the coordinator
and the simulation alike."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcore.federation.checkpoint import ROUNDS_LOG
from fedcore.federation.server import Ledger, RoundOutcome

__all__ = ["ROUNDS_LOG", "format_round", "latest_in_log", "round_record", "truncate_log"]


def round_record(outcome: RoundOutcome, cumulative: Ledger, seconds: float) -> dict[str, Any]:
    """One JSON line of the round log; the coordinator writes the same shape."""
    return {
        "round": outcome.round + 1,
        "participants": [u.client for u in outcome.accepted],
        "planned": list(outcome.planned),
        "mean_loss": outcome.mean_loss,
        "client_loss": {u.client: u.mean_loss for u in outcome.accepted},
        "weights": {u.client: u.weight for u in outcome.accepted},  # FedAvg weights, after any bound (fedcore.federation.robust)
        "clipped": {u.client: {p.value: f for p, f in u.clipped.items()} for u in outcome.accepted if u.clipped},  # norm clipping's factors
        **{k: v for k, v in outcome.ledger.as_json().items() if k != "reduction_vs_full"},
        "cumulative_parameters": cumulative.traffic.total,
        "cumulative_full_fedavg_parameters": cumulative.full_fedavg,
        "reduction_so_far": cumulative.reduction_vs_full,
        "seconds": round(seconds, 3),
    }


def format_round(record: Mapping[str, Any]) -> str:
    """One line of the round log (`round_record`, or as read back from the file)."""
    nbytes = record["bytes"]
    down = sum(nbytes["down"].values())
    up = sum(nbytes["up"].values())
    return (
        f"round {record['round']}: {len(record['participants'])}/{len(record['planned'])} clients, "
        f"down {down / 1e6:.2f} MB, up {up / 1e6:.2f} MB, reduction so far {record['reduction_so_far']:.1%}, "
        f"loss {record['mean_loss']:.4f}, {record['seconds']:.1f}s"
    )


def latest_in_log(path: Path, completed_rounds: int) -> tuple[float | None, dict[str, float]]:
    """The mean loss of round `completed_rounds` and the latest Frechet distance of each model evaluated up to
    it, as the log holds them (None and {} for what it lacks; a line cut short by a crash is skipped)."""
    mean_loss: float | None = None
    fds: dict[str, float] = {}
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("round", completed_rounds + 1) > completed_rounds:
            continue
        if "participants" in record and record["round"] == completed_rounds:
            mean_loss = float(record["mean_loss"])
        if record.get("kind") == "evaluation":
            fds.update({model: float(fd) for model, fd in record["fd"].items()})
    return mean_loss, fds


def truncate_log(path: Path, completed_rounds: int) -> None:
    """Drop log lines of rounds that were not committed (a crash between a round and its checkpoint)."""
    if not path.exists():
        path.write_text("")
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["round"] <= completed_rounds]
    path.write_text("".join(line + "\n" for line in kept))
