"""The round log (rounds.jsonl): one JSON line per closed round, or per evaluation, written by the coordinator
and the simulation alike, and read back as typed records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from fedcore.atomic import read_json_lines, read_records
from fedcore.federation.checkpoint import ROUNDS_LOG
from fedcore.federation.engine import RoundOutcome
from fedcore.federation.totals import Ledger
from fedcore.model.parts import FLOAT32_BYTES, Part

__all__ = [
    "ROUNDS_LOG",
    "EvaluationRecord",
    "LogRecord",
    "RoundRecord",
    "format_evaluation",
    "format_round",
    "latest_in_log",
    "read_round_log",
    "round_record",
    "round_records",
    "truncate_log",
]

EVALUATION = "evaluation"  # the "kind" of an evaluation line; a round's line has no "kind"
ScoredModels = Literal["global", "personalised"]


@dataclass(frozen=True)
class RoundRecord:
    """A closed round: who was planned and who delivered, their losses and FedAvg weights, and the parameters
    and bytes exchanged, in the round and so far."""

    round_number: int  # 1-based number of the round that closed ("round" on disk)
    participants: tuple[str, ...]  # clients whose updates were averaged, in the order they arrived
    planned: tuple[str, ...]  # clients the round was planned for
    mean_loss: float  # mean local loss, weighted by FedAvg weight (RoundOutcome.mean_loss)
    client_loss: Mapping[str, float]  # each participant's mean local loss
    ledger: Ledger  # this round's parameters and payload bytes, by direction and part (a copy, never added to)
    cumulative_parameters: int  # parameters exchanged by the run up to this round (the paper's count)
    cumulative_full_fedavg_parameters: int  # what plain FedAvg would have exchanged by then
    reduction_so_far: float  # 1 - cumulative_parameters / cumulative_full_fedavg_parameters
    seconds: float  # wall time of the round, to the millisecond
    fedavg_weights: Mapping[str, int] = field(default_factory=dict)  # after any bound (fedcore.federation.robust); log key "weights"; {} before bounds
    clipped: Mapping[str, Mapping[Part, float]] = field(default_factory=dict)  # norm clipping's factors, by client and part
    cumulative_payload_bytes: int | None = None  # payload bytes exchanged by the run up to this round, both ways (None in older logs)

    def as_json(self) -> dict[str, Any]:
        """The log line's object, keys in the order the log has always had them."""
        return {
            "round": self.round_number,
            "participants": list(self.participants),
            "planned": list(self.planned),
            "mean_loss": self.mean_loss,
            "client_loss": dict(self.client_loss),
            "weights": dict(self.fedavg_weights),
            "clipped": {client: {p.value: f for p, f in factors.items()} for client, factors in self.clipped.items()},
            **{k: v for k, v in self.ledger.as_json().items() if k != "reduction_vs_full"},
            "cumulative_parameters": self.cumulative_parameters,
            "cumulative_full_fedavg_parameters": self.cumulative_full_fedavg_parameters,
            "reduction_so_far": self.reduction_so_far,
            **({} if self.cumulative_payload_bytes is None else {"cumulative_payload_bytes": self.cumulative_payload_bytes}),
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RoundRecord:
        """A line as `as_json` writes it, or as logs written before the FedAvg bounds hold it (no FedAvg weights, no clipped);
        an error naming what does not fit (one of `fedcore.atomic.MALFORMED`)."""
        return cls(
            round_number=int(obj["round"]),
            participants=tuple(str(c) for c in obj["participants"]),
            planned=tuple(str(c) for c in obj["planned"]),
            mean_loss=float(obj["mean_loss"]),
            client_loss={str(c): float(loss) for c, loss in obj["client_loss"].items()},
            ledger=Ledger.from_json(obj),
            cumulative_parameters=int(obj["cumulative_parameters"]),
            cumulative_full_fedavg_parameters=int(obj["cumulative_full_fedavg_parameters"]),
            reduction_so_far=float(obj["reduction_so_far"]),
            seconds=float(obj["seconds"]),
            fedavg_weights={str(c): int(w) for c, w in obj.get("weights", {}).items()},
            clipped={str(c): {Part(p): float(f) for p, f in factors.items()} for c, factors in obj.get("clipped", {}).items()},
            cumulative_payload_bytes=None if obj.get("cumulative_payload_bytes") is None else int(obj["cumulative_payload_bytes"]),
        )

    @property
    def bytes_vs_fedavg_fp32(self) -> float | None:
        """How many times fewer bytes the run exchanged up to this round than plain FedAvg in float32 (None in older logs)."""
        if not self.cumulative_payload_bytes:
            return None
        return FLOAT32_BYTES * self.cumulative_full_fedavg_parameters / self.cumulative_payload_bytes


@dataclass(frozen=True)
class EvaluationRecord:
    """An evaluation after a round: the Frechet distance of each model scored, and their mean and spread."""

    round_number: int  # 1-based number of the round after which the models were scored ("round" on disk)
    models: ScoredModels  # the global model, or each worker's personalised one
    fd_by_model: Mapping[str, float]  # each model's Frechet distance, by model: "global", or each worker's id ("fd" on disk)
    fd_mean: float  # mean over `fd_by_model` (NaN when no model was scored)
    fd_std: float  # population standard deviation over `fd_by_model` (0 for one model)
    extractor: str  # the feature network the distances are measured in
    evaluated: int  # models scored
    asked: int  # models asked for (workers given an evaluate task, or 1 for the global model)

    def as_json(self) -> dict[str, Any]:
        """The log line's object, keys in the order the log has always had them."""
        return {
            "round": self.round_number,
            "kind": EVALUATION,
            "models": self.models,
            "fd": dict(self.fd_by_model),
            "fd_mean": self.fd_mean,
            "fd_std": self.fd_std,
            "extractor": self.extractor,
            "evaluated": self.evaluated,
            "asked": self.asked,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> EvaluationRecord:
        """A line as `as_json` writes it; an error naming what does not fit (one of `fedcore.atomic.MALFORMED`)."""
        if obj.get("kind") != EVALUATION:
            raise ValueError(f"kind is {obj.get('kind')!r}, expected {EVALUATION!r}")
        models = obj["models"]
        if models not in get_args(ScoredModels):
            raise ValueError(f"models is {models!r}, expected one of {get_args(ScoredModels)}")
        return cls(
            round_number=int(obj["round"]),
            models=models,
            fd_by_model={str(m): float(fd) for m, fd in obj["fd"].items()},
            fd_mean=float(obj["fd_mean"]),
            fd_std=float(obj["fd_std"]),
            extractor=str(obj["extractor"]),
            evaluated=int(obj["evaluated"]),
            asked=int(obj["asked"]),
        )


LogRecord = RoundRecord | EvaluationRecord


def round_record(outcome: RoundOutcome, cumulative: Ledger, seconds: float) -> RoundRecord:
    """The log's record of a closed round; `cumulative` is the run's ledger with this round added."""
    return RoundRecord(
        round_number=outcome.round_index + 1,
        participants=tuple(u.client for u in outcome.accepted),
        planned=tuple(outcome.planned),
        mean_loss=outcome.mean_loss,
        client_loss={u.client: u.mean_loss for u in outcome.accepted},
        ledger=outcome.ledger.copy(),  # a download that completes after the close adds to the round's own
        cumulative_parameters=cumulative.traffic.total,
        cumulative_full_fedavg_parameters=cumulative.full_fedavg,
        reduction_so_far=cumulative.reduction_vs_full,
        seconds=round(seconds, 3),
        fedavg_weights={u.client: u.fedavg_weight for u in outcome.accepted},
        clipped={u.client: dict(u.clipped) for u in outcome.accepted if u.clipped},
        cumulative_payload_bytes=cumulative.payload_bytes,
    )


def format_round(record: RoundRecord) -> str:
    """One line for the console or the process log."""
    down = sum(record.ledger.bytes_down.values())
    up = sum(record.ledger.bytes_up.values())
    fewer = record.bytes_vs_fedavg_fp32
    in_bytes = "" if fewer is None else f", {fewer:.1f}x fewer bytes than plain FedAvg float32"
    return (
        f"round {record.round_number}: {len(record.participants)}/{len(record.planned)} clients, "
        f"down {down / 1e6:.2f} MB, up {up / 1e6:.2f} MB, reduction so far {record.reduction_so_far:.1%}{in_bytes}, "
        f"loss {record.mean_loss:.4f}, {record.seconds:.1f}s"
    )


def format_evaluation(record: EvaluationRecord) -> str:
    """One line for the console or the process log."""
    return (
        f"evaluation after round {record.round_number}: FD {record.fd_mean:.2f} +- {record.fd_std:.2f} "
        f"over {record.evaluated} of {record.asked} models ({record.extractor})"
    )


def parse_record(obj: Mapping[str, Any]) -> LogRecord:
    """A log line's object as the record its "kind" says (an evaluation, else a round)."""
    return EvaluationRecord.from_json(obj) if obj.get("kind") == EVALUATION else RoundRecord.from_json(obj)


def read_round_log(path: Path) -> list[LogRecord]:
    """Every record of a round log in file order ([] when there is no log); a line cut short by a crash is
    skipped; ValueError naming the file and line for a complete line that is no record."""
    return [record for _, record in read_records(path, parse_record, "a round log record")]


def round_records(path: Path) -> list[RoundRecord]:
    """The closed rounds of a round log, evaluations left out."""
    return [record for record in read_round_log(path) if isinstance(record, RoundRecord)]


def latest_in_log(path: Path, completed_rounds: int) -> tuple[float | None, dict[str, float]]:
    """The mean loss of round `completed_rounds` and the latest Frechet distance of each model evaluated up to
    it, as the log holds them (None and {} for what it lacks; a line cut short by a crash is skipped)."""
    mean_loss: float | None = None
    fds: dict[str, float] = {}
    for record in read_round_log(path):
        if record.round_number > completed_rounds:
            continue
        if isinstance(record, RoundRecord) and record.round_number == completed_rounds:
            mean_loss = record.mean_loss
        if isinstance(record, EvaluationRecord):
            fds.update(record.fd_by_model)
    return mean_loss, fds


def truncate_log(path: Path, completed_rounds: int) -> None:
    """Drop log lines of rounds that were not committed (a crash between a round and its checkpoint, whatever
    it had written of them), and a line cut short by a crash; the lines kept stay byte for byte."""
    if not path.exists():
        path.write_text("")
        return
    kept = [line.text for line in read_json_lines(path) if int(line.value["round"]) <= completed_rounds]
    path.write_text("".join(line + "\n" for line in kept))
