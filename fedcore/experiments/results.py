"""The results of `feddiff reproduce` as typed records: one line per finished cell in the results file, and the
FD curve points of a cell in its evaluations file (evaluations.jsonl); both JSON lines, appended and read back.

Results files written before a field existed still read: `folder`, `lr`, `floor_fd` and `noise_fd` are None
there, and `as_json` leaves them out again, so a line read and written back is the line that was read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from fedcore.atomic import append_json_line, read_records

ResultKey = tuple[str, str, int, int, int]
T = TypeVar("T")


def result_key(protocol: str, cell: str, clients: int, max_images: int, seed: int) -> ResultKey:
    """What makes two results lines the same measurement (a rerun skips a cell whose key is there)."""
    return protocol, cell, clients, max_images, seed


@dataclass(frozen=True)
class CurvePoint:
    """The models of a cell scored after a round on a smaller sample: one point of its FD curve."""

    round_number: int  # 1-based number of the round after which the models were scored ("round" on disk)
    cumulative_parameters: int  # parameters exchanged by the cell up to that round
    samples: int  # images generated per model
    fd_mean: float  # mean FD over the models
    fd_std: float  # population standard deviation over the models
    seconds: float  # sampling and scoring time
    fd_per_model: Mapping[str, float] | None = None  # by model; in the evaluations file, left out of a results line's curve

    def as_json(self) -> dict[str, Any]:
        """The point's object, keys in the order the files have always had them."""
        obj: dict[str, Any] = {"round": self.round_number, "cumulative_parameters": self.cumulative_parameters, "samples": self.samples}
        obj |= {"fd_mean": self.fd_mean, "fd_std": self.fd_std}
        if self.fd_per_model is not None:
            obj["fd_per_model"] = dict(self.fd_per_model)
        obj["seconds"] = self.seconds
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CurvePoint:
        """A point as `as_json` writes it; an error naming what does not fit (one of `fedcore.atomic.MALFORMED`)."""
        per_model = obj.get("fd_per_model")
        return cls(
            round_number=int(obj["round"]),
            cumulative_parameters=int(obj["cumulative_parameters"]),
            samples=int(obj["samples"]),
            fd_mean=float(obj["fd_mean"]),
            fd_std=float(obj["fd_std"]),
            seconds=float(obj["seconds"]),
            fd_per_model=None if per_model is None else {str(m): float(fd) for m, fd in per_model.items()},
        )


@dataclass(frozen=True)
class ModelFd:
    """One model of a cell scored on the protocol's full sample count."""

    model: str  # "global", or the client whose personalised model it is
    images: int  # training images behind it: the client's shard, or all of the cell's for the global model
    fd: float

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "images": self.images, "fd": self.fd}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ModelFd:
        return cls(model=str(obj["model"]), images=int(obj["images"]), fd=float(obj["fd"]))


@dataclass(frozen=True)
class ReferenceSet:
    """The real images the FD is measured against."""

    dataset: str  # e.g. "fashion-mnist/test" or "fashion-mnist/test[:1000]"
    count: int  # images in the reference statistics


@dataclass(frozen=True)
class CellResult:
    """A finished cell: its settings, the FD of its models and their baselines, the parameters it exchanged,
    its time, and its per-round losses and FD curve. Field order is the results line's key order."""

    protocol: str
    cell: str  # Cell.key, e.g. "udec:iid"
    folder: str | None  # the cell's run folder under the run's --out (None in lines written before seeds had folders)
    strategy: str
    split: str
    clients: int  # K (1 for the centralised reference)
    model: str  # model preset
    rounds: int  # R
    epochs: int  # E
    batch_size: int
    lr: float | None  # Adam's step size (None in lines written before it was recorded)
    max_images: int  # training images the protocol caps at (0 = all)
    images: int  # training images over all clients
    beta: float  # Dirichlet concentration of the skewed splits
    split_seed: int
    seed: int
    fd_mean: float  # mean FD over the models evaluated
    fd_std: float  # population std over the models evaluated
    fd_per_model: tuple[ModelFd, ...]
    feature_extractor: str  # the feature network's name and digest
    floor_fd: float | None  # FD of as many real training images as samples (None in older lines)
    noise_fd: float | None  # FD of as many images of uniform noise (None in older lines)
    reference: ReferenceSet
    samples: int  # images generated per model
    sampler: str  # e.g. "ddim-20", "ddpm-1000"
    parameters_exchanged: int  # the paper's count, over all rounds
    full_fedavg_parameters: int  # plain FedAvg over the same transfers
    reduction_vs_full: float
    train_seconds: float
    eval_seconds: float
    wall_seconds: float
    device: str  # devices_label(): the GPU's name or "cpu: MODEL, N threads"; with --devices, the training processes' ("cpu x2: MODEL, 1 thread each")
    date: str  # YYYY-MM-DD, UTC
    torch: str  # torch.__version__
    losses: tuple[float, ...]  # mean local loss of each round
    cumulative_parameters: tuple[int, ...]  # parameters exchanged up to each round
    curve: tuple[CurvePoint, ...]  # in round order, without the per-model FDs
    compression: str = "none"  # the clients' delta codec
    payload_bytes: int | None = None  # payload bytes exchanged over the run, both ways (None in older lines)
    full_fedavg_fp32_bytes: int | None = None  # what plain FedAvg in float32 would have exchanged (None in older lines)

    @property
    def key(self) -> ResultKey:
        """What makes two results lines the same measurement (`result_key`)."""
        return result_key(self.protocol, self.cell, self.clients, self.max_images, self.seed)

    def as_json(self) -> dict[str, Any]:
        """The results line's object, keys in field order; the optional fields that are None are left out, and
        the compression of a cell without ("none"), as lines before compression have it."""
        return {f.name: _plain(v) for f in fields(self) if (v := getattr(self, f.name)) is not None and not (f.name == "compression" and v == "none")}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CellResult:
        """A results line as `as_json` writes it, or as older versions did; an error naming what does not fit
        (one of `fedcore.atomic.MALFORMED`)."""
        return cls(
            protocol=str(obj["protocol"]),
            cell=str(obj["cell"]),
            folder=_optional(str, obj.get("folder")),
            strategy=str(obj["strategy"]),
            split=str(obj["split"]),
            clients=int(obj["clients"]),
            model=str(obj["model"]),
            rounds=int(obj["rounds"]),
            epochs=int(obj["epochs"]),
            batch_size=int(obj["batch_size"]),
            lr=_optional(float, obj.get("lr")),
            max_images=int(obj["max_images"]),
            images=int(obj["images"]),
            beta=float(obj["beta"]),
            split_seed=int(obj["split_seed"]),
            seed=int(obj["seed"]),
            fd_mean=float(obj["fd_mean"]),
            fd_std=float(obj["fd_std"]),
            fd_per_model=tuple(ModelFd.from_json(m) for m in obj["fd_per_model"]),
            feature_extractor=str(obj["feature_extractor"]),
            floor_fd=_optional(float, obj.get("floor_fd")),
            noise_fd=_optional(float, obj.get("noise_fd")),
            reference=ReferenceSet(dataset=str(obj["reference"]["dataset"]), count=int(obj["reference"]["count"])),
            samples=int(obj["samples"]),
            sampler=str(obj["sampler"]),
            parameters_exchanged=int(obj["parameters_exchanged"]),
            full_fedavg_parameters=int(obj["full_fedavg_parameters"]),
            reduction_vs_full=float(obj["reduction_vs_full"]),
            train_seconds=float(obj["train_seconds"]),
            eval_seconds=float(obj["eval_seconds"]),
            wall_seconds=float(obj["wall_seconds"]),
            device=str(obj["device"]),
            date=str(obj["date"]),
            torch=str(obj["torch"]),
            losses=tuple(float(x) for x in obj["losses"]),
            cumulative_parameters=tuple(int(x) for x in obj["cumulative_parameters"]),
            curve=tuple(CurvePoint.from_json(p) for p in obj["curve"]),
            compression=str(obj.get("compression", "none")),
            payload_bytes=_optional(int, obj.get("payload_bytes")),
            full_fedavg_fp32_bytes=_optional(int, obj.get("full_fedavg_fp32_bytes")),
        )


def _optional(convert: Callable[[Any], T], value: Any) -> T | None:
    return None if value is None else convert(value)


def _plain(value: object) -> object:
    """A field's value as JSON holds it: records as their objects, tuples as lists."""
    if isinstance(value, CurvePoint | ModelFd):
        return value.as_json()
    if isinstance(value, ReferenceSet):
        return asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# The files


def load_results(path: Path) -> list[CellResult]:
    """Every complete line of a results file ([] when there is none; a line cut short by a crash is skipped);
    ValueError naming the file and line for a complete line that is no results line."""
    return [result for _, result in read_records(path, CellResult.from_json, "a results line")]


def load_curve(path: Path) -> list[CurvePoint]:
    """The points of a cell's evaluations file, read as `load_results` reads a results file."""
    return [point for _, point in read_records(path, CurvePoint.from_json, "an FD curve point")]


def append_result(path: Path, record: CellResult | CurvePoint) -> None:
    """Append a results line, or a curve point to a cell's evaluations file; on disk when this returns."""
    append_json_line(path, record.as_json())
