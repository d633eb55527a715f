"""The paper's experiment table in simulation: protocols, cells, a resumable runner and its JSONL results file.

A cell is one (strategy, split) pair trained with `Simulation` in its own folder; the centralised reference
is plain FedAvg with K = 1 on all images. A finished cell appends one line to the results file; a cell whose
line is there is skipped, and a half-trained one resumes from its last round checkpoint. Each cell's models
are scored by the Frechet distance of their samples to the real Fashion-MNIST test images: the global model
(centralised, full, usplit), or each client's personalised model (udec, ulatdec: K FDs, mean +- std).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, cast

import numpy as np
import torch

from fedcore.data.datasets import load_fashion_mnist, to_model_range
from fedcore.data.shards import SplitConfig
from fedcore.data.splits import SplitKind, is_split_kind
from fedcore.evaluation.extractors import FeatureExtractor, load_extractor
from fedcore.evaluation.fid import ReferenceStats, ReferenceStatsCache, curve_point_due, uniform_noise_fd
from fedcore.evaluation.images import save_grid
from fedcore.experiments import report
from fedcore.experiments.devices import DevicePool, device_pool
from fedcore.experiments.results import CellResult, CurvePoint, ModelFd, ReferenceSet, append_result, load_curve, load_results, result_key
from fedcore.experiments.simulation import Simulation, SimulationConfig
from fedcore.federation import checkpoint
from fedcore.federation.engine import FederationConfig
from fedcore.federation.roundlog import ROUNDS_LOG, round_records
from fedcore.federation.strategies import Strategy, StrategyName, private_parts
from fedcore.model.denoiser import Denoiser
from fedcore.model.diffusion import SamplerKind, Schedule, sample
from fedcore.model.training import ResolvedSpeed, SpeedConfig, TrainConfig
from fedcore.model.unet import build_model
from fedcore.payload.codecs import Codec

ProtocolName = Literal["quick", "paper", "cpu", "mini"]
CENTRALISED: Final = "centralised"
CellStrategy = Literal["centralised", StrategyName]  # a cell's: the centralised reference, or a federated strategy
STRATEGIES: tuple[CellStrategy, ...] = (CENTRALISED, "full", "usplit", "ulatdec", "udec")  # table order
SPLITS: tuple[SplitKind, ...] = ("iid", "label", "quantity")
ALL_DATA = "all"  # the centralised cell's split: every image on one party
CELL_SPEC = "cell.json"  # what a cell folder was trained with (checked on resume)
EVALUATIONS = "evaluations.jsonl"  # FD curve points of a cell, one per evaluated round


@dataclass(frozen=True)
class ReproductionProtocol:
    """How the experiments of a reproduction run: model, training, sampling and the images its FD is measured on."""

    name: ProtocolName
    model: str  # model preset
    rounds: int  # R
    epochs: int  # E, local epochs per round
    batch_size: int
    lr: float  # Adam's step size (fresh every round)
    max_images: int  # training images (0 = all 60,000)
    sampler: SamplerKind
    steps: int  # sampling steps (DDPM always uses all T = 1000)
    samples: int  # images generated per model for the final FD
    eval_every: int  # rounds between FD curve points, which start after round 1 (the last round always gets one)
    curve_samples: int  # images per model for a curve point (the final point reuses the first of `samples`)
    reference_images: int  # real test images in the reference statistics (0 = all 10,000)


PROTOCOLS: dict[str, ReproductionProtocol] = {
    # One GPU, minutes per cell: E = 1, FD on 2,000 DDIM-100 samples per model.
    "quick": ReproductionProtocol("quick", "paper-fmnist", 15, 1, 128, 1e-4, 0, "ddim", 100, 2000, 5, 500, 0),
    # The paper's protocol: E = 5, ancestral sampling over all 1,000 steps, about 1,000 samples per model.
    "paper": ReproductionProtocol("paper", "paper-fmnist", 15, 5, 128, 1e-4, 0, "ddpm", 1000, 1000, 15, 1000, 0),
    # Two CPU cores, the five IID rows in about 80 minutes: the tiny UNet at lr 2e-3 and batch 32 (what reached
    # the lowest FD per image seen), all 60,000 images, 5 rounds of one local epoch; FD on 1,000 DDIM-20 samples
    # (20, 50 and 100 steps scored alike on this model). Sizing measurements: docs/results.md.
    "cpu": ReproductionProtocol("cpu", "tiny", 5, 1, 32, 2e-3, 0, "ddim", 20, 1000, 1, 500, 0),
    # The CI miniature: tiny UNet, 300 images, 2 rounds, 160 five-step samples per model; CPU seconds.
    "mini": ReproductionProtocol("mini", "tiny", 2, 1, 32, 1e-4, 300, "ddim", 5, 160, 1, 160, 1000),
}


@dataclass(frozen=True)
class Cell:
    strategy: str  # one of STRATEGIES
    split: str  # one of SPLITS, or ALL_DATA for the centralised reference
    compression: str = "none"  # the clients' delta codec (fedcore.payload.codecs); the centralised reference has none

    @property
    def key(self) -> str:
        """ "udec:iid", or "udec:iid@int8" for a cell with compressed updates."""
        return self.table_key + ("" if self.compression == "none" else f"@{self.compression}")

    @property
    def table_key(self) -> str:
        """The cell's place in the table, STRATEGY:SPLIT, whatever its compression (what --only names)."""
        return f"{self.strategy}:{self.split}"

    @property
    def centralised(self) -> bool:
        return self.strategy == CENTRALISED

    @property
    def federation_strategy(self) -> Strategy:
        return Strategy.FULL if self.centralised else Strategy(self.strategy)

    def num_clients(self, clients: int) -> int:
        return 1 if self.centralised else clients

    @property
    def data_split(self) -> SplitKind:
        if self.centralised:
            return "iid"
        if not is_split_kind(self.split):
            raise ValueError(f"cell {self.key}: split {self.split!r} is none of {SPLITS}")
        return self.split


def table_cells(strategies: Sequence[str] = STRATEGIES, splits: Sequence[str] = SPLITS, compression: str = "none") -> list[Cell]:
    """The cells of the table (strategy x split) in run order: the centralised reference first (never compressed), then split by split,
    the federated cells with `compression`."""
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; known: {', '.join(STRATEGIES)}")
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r}; known: {', '.join(SPLITS)}")
    cells = [Cell(CENTRALISED, ALL_DATA)] if CENTRALISED in strategies else []
    cells += [Cell(st, sp, compression) for sp in SPLITS if sp in splits for st in STRATEGIES if st in strategies and st != CENTRALISED]
    return cells


def parse_only(specs: Iterable[str]) -> set[str]:
    """`udec:iid`, `centralised` (or `centralised:all`), comma lists allowed -> cell keys."""
    keys = set()
    for spec in specs:
        for item in filter(None, (s.strip() for s in spec.split(","))):
            strategy, _, split = item.partition(":")
            if strategy == CENTRALISED:
                split = split or ALL_DATA
            if strategy not in STRATEGIES or split not in (*SPLITS, ALL_DATA) or (split == ALL_DATA) != (strategy == CENTRALISED):
                raise ValueError(f"--only {item!r} is not a cell; expected strategy:split like 'udec:iid' or 'centralised'")
            keys.add(f"{strategy}:{split}")
    return keys


def select_cells(strategies: Sequence[str], splits: Sequence[str], only: Iterable[str] = (), compression: str = "none") -> list[Cell]:
    cells = table_cells(strategies, splits, compression)
    keys = parse_only(only)
    if keys:
        cells = [c for c in cells if c.table_key in keys]
        if not cells:
            raise ValueError(f"--only {sorted(keys)} selects no cell of strategies {list(strategies)} x splits {list(splits)}")
    return cells


@dataclass(frozen=True)
class ReproduceConfig:
    protocol: ReproductionProtocol
    cells: tuple[Cell, ...]
    out: Path  # run folder: one sub-folder per cell, reference statistics
    results: Path  # JSONL, one line per finished cell
    docs: Path | None  # where results.md and the plots go after each cell (None = do not render)
    # The federated cells' split: K, beta, seed and the Fashion-MNIST folder (each cell its kind, the
    # protocol its max_images; the centralised cell has K = 1)
    data: SplitConfig = SplitConfig()
    seed: int = 0  # model init, plans, training and the sampling noise
    inception_weights: str | None = None  # pytorch-fid Inception weights; None = the project's classifier
    speed: SpeedConfig = SpeedConfig()  # training (sequential) and evaluation
    devices: tuple[str, ...] = ()  # train each round's clients in parallel, one process per device (none: in this process)


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class Evaluator:
    """Samples models and scores them against the real test images: owns the feature extractor, the
    reference statistics and one sampling network whose weights are swapped per model."""

    extractor: FeatureExtractor
    reference: ReferenceStats
    network: Denoiser  # sampling network on `device`, weights loaded per model
    sampler_net: Denoiser  # `network`, or its torch.compile wrapper
    device: torch.device
    bf16: bool
    batch_size: int  # images per sampling batch (one static shape for the compiled sampler)
    baselines: FdBaselines  # the two ends of the FD scale for as many images as the protocol samples
    schedule: Schedule = field(default_factory=Schedule)
    log: Callable[[str], None] = print

    @classmethod
    def create(cls, cfg: ReproduceConfig, log: Callable[[str], None] = print) -> Evaluator:
        speed = ResolvedSpeed.of(cfg.speed)
        extractor: FeatureExtractor = load_extractor(cfg.inception_weights, speed.device)
        n = cfg.protocol.reference_images
        dataset = "fashion-mnist/test" if n <= 0 else f"fashion-mnist/test[:{n}]"

        images = load_fashion_mnist(train=False, root=cfg.data.data_root).images
        test_images = to_model_range(images[:n] if n > 0 else images)
        reference = ReferenceStatsCache(cfg.out / "reference").get(extractor, dataset, test_images)
        network = build_model(cfg.protocol.model).to(speed.device)
        if speed.channels_last:
            # Module.to takes memory_format (it passes it to every tensor's .to); torch's overloads of it leave it out.
            network = network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        network.eval()
        # The compiled module forwards what it does not define (config, training, eval) to `network`.
        sampler_net = cast(Denoiser, torch.compile(network)) if speed.compile else network
        batch = 500 if speed.device.type == "cuda" else 250  # 500 divides every protocol's sample counts
        baselines = reference_baselines(extractor, reference, cfg.protocol.samples, cfg.data.split_seed, cfg.data.data_root)
        log(
            f"FD features: {extractor.name}, reference {reference.dataset} ({reference.count} images); "
            f"{cfg.protocol.samples} training images score {baselines.floor:.2f}, uniform noise {baselines.noise:.2f}"
        )
        return cls(extractor, reference, network, sampler_net, speed.device, speed.bf16, batch, baselines, log=log)

    def generate(self, state: Mapping[str, torch.Tensor], protocol: ReproductionProtocol, n: int, seed: int) -> torch.Tensor:
        """n samples (n, C, H, W) in [-1, 1] on the CPU from a model state."""
        self.network.load_state_dict(state)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            try:
                return self._sample(self.sampler_net, protocol, n, seed)
            except Exception as e:  # a compile failure must not cost a GPU run: fall back to eager
                if self.sampler_net is self.network:
                    raise
                self.log(f"torch.compile of the sampler failed ({type(e).__name__}: {e}); sampling eagerly")
                self.sampler_net = self.network
                return self._sample(self.network, protocol, n, seed)

    def _sample(self, net: Denoiser, protocol: ReproductionProtocol, n: int, seed: int) -> torch.Tensor:
        return sample(
            net, self.schedule, n, sampler=protocol.sampler, steps=protocol.steps, seed=seed, device=self.device,
            batch_size=min(n, self.batch_size),
        )  # fmt: skip

    def fd(self, images: torch.Tensor) -> float:
        return self.reference.frechet_distance_to(self.extractor, images)


@dataclass(frozen=True)
class FdBaselines:
    """The two ends of the FD scale for n images."""

    floor: float  # n real training images: what a perfect generator reaches with this many samples
    noise: float  # n images of uniform noise in [-1, 1]


def reference_baselines(extractor: FeatureExtractor, reference: ReferenceStats, n: int, seed: int, data_root: str | None) -> FdBaselines:
    """The FD of n real training images (a seeded sample) and of n images of uniform noise in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    train = load_fashion_mnist(train=True, root=data_root).images
    real = to_model_range(train[torch.randperm(len(train), generator=generator)[:n].sort().values.numpy()])
    floor = reference.frechet_distance_to(extractor, real)
    return FdBaselines(floor=floor, noise=uniform_noise_fd(reference, extractor, n, tuple(real.shape[1:]), generator))


def cell_models(sim: Simulation) -> dict[str, dict[str, torch.Tensor]]:
    """The models a cell is judged by: the global one, or each client's personalised one (udec, ulatdec)."""
    global_state = sim.federation.global_state
    if not private_parts(sim.config.federation.strategy):
        return {"global": global_state}
    return {cid: checkpoint.personalised_state(global_state, c.private_tensors) for cid, c in sim.clients.items()}


def _summary(fds: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof = 0) over the evaluated models."""
    return float(np.mean(fds)), float(np.std(fds))


@dataclass(frozen=True)
class RoundScores:
    """Every model of a cell scored after a round: on the full sample count, and on the curve point's share."""

    fds: dict[str, float]  # by model, on n samples
    point: CurvePoint  # on the first curve_n of them
    images: dict[str, torch.Tensor]  # by model: the n samples (n, C, H, W) in [-1, 1], on the CPU


def evaluate_round(sim: Simulation, evaluator: Evaluator, protocol: ReproductionProtocol, n: int, seed: int, curve_n: int) -> RoundScores:
    """FD of every model of the cell on n samples, and on the first curve_n of them (the curve point);
    every model draws the same noise (seed), so differences between cells are not sampling luck."""
    started = time.perf_counter()
    fds, curve_fds, images = {}, {}, {}
    for name, state in cell_models(sim).items():
        x = evaluator.generate(state, protocol, n, seed)
        images[name] = x
        fds[name] = evaluator.fd(x)
        curve_fds[name] = fds[name] if curve_n >= n else evaluator.fd(x[:curve_n])
    seconds = time.perf_counter() - started
    last = sim.records[-1] if sim.records else round_records(sim.out_dir / ROUNDS_LOG)[-1]
    curve_mean, curve_std = _summary(list(curve_fds.values()))
    point = CurvePoint(
        round_number=sim.federation.completed_rounds,
        cumulative_parameters=last.cumulative_parameters,
        samples=min(curve_n, n),
        fd_mean=curve_mean,
        fd_std=curve_std,
        seconds=round(seconds, 3),
        fd_per_model=curve_fds,
    )
    return RoundScores(fds, point, images)


# ---------------------------------------------------------------------------------------------------------
# One cell


def _cpu_model() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return model


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the cores torch uses, e.g. "cpu: AMD EPYC, 2 threads"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_cpu_model()}, {torch.get_num_threads()} threads"


def devices_label(evaluation: torch.device, pool: DevicePool | None) -> str:
    """Where a cell ran: `device_name` of the evaluation device when its clients trained in this process; else
    the devices of the pool's training processes ("cpu x2: AMD EPYC, 1 thread each", "NVIDIA H100 x2"), and the
    evaluation device when it is of another kind."""
    if pool is None:
        return device_name(evaluation)
    kind = torch.device(pool.devices[0]).type
    if kind == "cuda":
        names = Counter(torch.cuda.get_device_name(torch.device(d)) for d in pool.devices)
        label = ", ".join(name if n == 1 else f"{name} x{n}" for name, n in names.items())
    else:
        label = f"{kind} x{len(pool.devices)}: {_cpu_model()}, {pool.threads} thread{'s' if pool.threads > 1 else ''} each"
    return label if evaluation.type == kind else f"{label}; evaluation on {device_name(evaluation)}"


def simulation_config(cfg: ReproduceConfig, cell: Cell) -> SimulationConfig:
    p = cfg.protocol
    return SimulationConfig(
        federation=FederationConfig(
            strategy=cell.federation_strategy,
            model=p.model,
            rounds=p.rounds,
            seed=cfg.seed,
            train=TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr),
            compression=Codec.parse(cell.compression),
        ),
        data=replace(cfg.data, num_clients=cell.num_clients(cfg.data.num_clients), split=cell.data_split, max_images=p.max_images),
        speed=cfg.speed,
    )


def _check_cell_folder(folder: Path, sim_cfg: SimulationConfig) -> None:
    """A cell folder holds one training configuration; resuming it with another would mix two runs."""
    spec = {"federation": sim_cfg.federation.as_json(), "data": {k: v for k, v in asdict(sim_cfg.data).items() if k != "data_root"}}
    path = folder / CELL_SPEC
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != spec:
            raise ValueError(f"{str(folder)!r} was trained with {saved}, not {spec}; use another --out-dir or delete the folder")
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1) + "\n")


def cell_folder(cfg: ReproduceConfig, cell: Cell) -> Path:
    """A cell's run folder: `udec-iid`, `udec-iid-int8` with compressed updates, `udec-iid-seed1` for another seed than 0."""
    codec = "" if cell.compression == "none" else f"-{cell.compression}"
    return cfg.out / (f"{cell.strategy}-{cell.split}{codec}" + (f"-seed{cfg.seed}" if cfg.seed else ""))


def run_cell(cfg: ReproduceConfig, cell: Cell, evaluator: Evaluator, log: Callable[[str], None] = print, pool: DevicePool | None = None) -> CellResult:
    """Train (or resume) one cell, its clients on `pool`'s processes or in this process, score its models, and
    return its results line."""
    p = cfg.protocol
    with _open_cell(cfg, cell, log, pool) as sim:
        points = _train_with_curve(sim, p, cfg.seed, evaluator, lambda s: log(f"[{cell.key}] {s}"))
        final = evaluate_round(sim, evaluator, p, p.samples, cfg.seed, p.curve_samples)
        points[final.point.round_number] = final.point
        save_grid(next(iter(final.images.values()))[:64], sim.out_dir / "samples.png")
        if not all(math.isfinite(f) for f in final.fds.values()):
            log(f"[{cell.key}] warning: non-finite FD {final.fds}")
        return _cell_result(cfg, cell, sim, evaluator, final, points, devices_label(evaluator.device, pool))


def _open_cell(cfg: ReproduceConfig, cell: Cell, log: Callable[[str], None], pool: DevicePool | None) -> Simulation:
    """The cell's simulation in its folder: a new one, or the one a previous call left off."""
    folder = cell_folder(cfg, cell)
    sim_cfg = simulation_config(cfg, cell)
    _check_cell_folder(folder, sim_cfg)
    sim = Simulation.create(sim_cfg, folder, resume=True, log=lambda s: log(f"[{cell.key}] {s}"), pool=pool)
    if sim.federation.completed_rounds:
        log(f"[{cell.key}] resuming after round {sim.federation.completed_rounds}")
    return sim


def _train_with_curve(sim: Simulation, p: ReproductionProtocol, seed: int, evaluator: Evaluator, log: Callable[[str], None]) -> dict[int, CurvePoint]:
    """Train the cell's remaining rounds, scoring a curve point before each round that is due one; returns the
    cell's curve points so far, by round, those of earlier calls (its evaluations file) included."""
    points = {pt.round_number: pt for pt in load_curve(sim.out_dir / EVALUATIONS)}
    while True:
        r = sim.federation.completed_rounds
        if r < p.rounds and curve_point_due(r, p.eval_every) and r not in points:
            points[r] = _curve_point(sim, p, seed, evaluator, log)
        if sim.federation.finished:
            return points
        sim.run_round()


def _curve_point(sim: Simulation, p: ReproductionProtocol, seed: int, evaluator: Evaluator, log: Callable[[str], None]) -> CurvePoint:
    """Score the cell's models on the curve's sample count and append the point to its evaluations file."""
    point = evaluate_round(sim, evaluator, p, p.curve_samples, seed, p.curve_samples).point
    append_result(sim.out_dir / EVALUATIONS, point)
    log(f"round {point.round_number}: FD {point.fd_mean:.2f} +- {point.fd_std:.2f} on {point.samples} samples")
    return point


def _cell_result(
    cfg: ReproduceConfig, cell: Cell, sim: Simulation, evaluator: Evaluator, final: RoundScores, points: Mapping[int, CurvePoint], device: str
) -> CellResult:
    """The cell's results line, from its settings, its final scores, its round log, its curve points and where it
    ran (`devices_label`)."""
    p = cfg.protocol
    rounds = round_records(sim.out_dir / ROUNDS_LOG)
    last = rounds[-1]
    num_examples = {cid: c.num_examples for cid, c in sim.clients.items()}
    fd_mean, fd_std = _summary(list(final.fds.values()))
    train_seconds = sum(r.seconds for r in rounds)
    eval_seconds = final.point.seconds + sum(pt.seconds for r, pt in points.items() if r != p.rounds)
    steps = p.steps if p.sampler == "ddim" else evaluator.schedule.timesteps
    return CellResult(
        protocol=p.name, cell=cell.key, folder=sim.out_dir.name, strategy=cell.strategy, split=cell.split,
        clients=cell.num_clients(cfg.data.num_clients), model=p.model, rounds=p.rounds, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
        max_images=p.max_images, images=sum(num_examples.values()), beta=cfg.data.beta, split_seed=cfg.data.split_seed, seed=cfg.seed,
        fd_mean=fd_mean, fd_std=fd_std,  # population std over the models evaluated
        fd_per_model=tuple(ModelFd(name, num_examples.get(name, sum(num_examples.values())), fd) for name, fd in final.fds.items()),
        feature_extractor=evaluator.extractor.name, floor_fd=evaluator.baselines.floor, noise_fd=evaluator.baselines.noise,
        reference=ReferenceSet(evaluator.reference.dataset, evaluator.reference.count), samples=p.samples, sampler=f"{p.sampler}-{steps}",
        parameters_exchanged=last.cumulative_parameters, full_fedavg_parameters=last.cumulative_full_fedavg_parameters,
        reduction_vs_full=last.reduction_so_far, train_seconds=round(train_seconds, 1), eval_seconds=round(eval_seconds, 1),
        wall_seconds=round(train_seconds + eval_seconds, 1), device=device,
        date=datetime.now(UTC).strftime("%Y-%m-%d"), torch=torch.__version__, losses=tuple(r.mean_loss for r in rounds),
        cumulative_parameters=tuple(r.cumulative_parameters for r in rounds),
        curve=tuple(replace(pt, fd_per_model=None) for _, pt in sorted(points.items())),
        compression=cell.compression, payload_bytes=sim.federation.ledger.payload_bytes, full_fedavg_fp32_bytes=sim.federation.ledger.full_fedavg_fp32_bytes,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The runner


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reproduce(cfg: ReproduceConfig, log: Callable[[str], None] = print) -> list[CellResult]:
    """Run every selected cell that the results file lacks, appending its line and re-rendering the docs."""
    done = {r.key for r in load_results(cfg.results)}
    p = cfg.protocol
    todo = [c for c in cfg.cells if result_key(p.name, c.key, c.num_clients(cfg.data.num_clients), p.max_images, cfg.seed) not in done]
    skipped = len(cfg.cells) - len(todo)
    log(f"reproduce {cfg.protocol.name}: {len(todo)} cell{'' if len(todo) == 1 else 's'} to run, {skipped} already in {cfg.results}")
    if not todo:
        if cfg.docs is not None:
            _render_after_cells(cfg, log)
        return []
    with device_pool(cfg.devices, cfg.speed) as pool:
        if pool is not None:
            log(f"training on {pool}")
        return _run_cells(cfg, todo, Evaluator.create(cfg, log), pool, log)


def _run_cells(cfg: ReproduceConfig, todo: Sequence[Cell], evaluator: Evaluator, pool: DevicePool | None, log: Callable[[str], None]) -> list[CellResult]:
    """Run the cells one after the other, appending each one's line to the results (and re-rendering the docs)."""
    new = []
    for cell in todo:
        started = time.perf_counter()
        row = run_cell(cfg, cell, evaluator, log, pool)
        append_result(cfg.results, row)
        new.append(row)
        log(
            f"[{cell.key}] FD {row.fd_mean:.2f} +- {row.fd_std:.2f}, {row.parameters_exchanged:,} parameters "
            f"({row.reduction_vs_full:.1%} less than full), {time.perf_counter() - started:.0f}s"
        )
        _release_memory()
        if cfg.docs is not None:
            _render_after_cells(cfg, log)
    return new


def _render_after_cells(cfg: ReproduceConfig, log: Callable[[str], None]) -> None:
    """The docs rendered from the results file, or a warning that they were left as they are (their results
    copy holds measurements the results file lacks): the cells' results are in the results file either way."""
    try:
        render(cfg)
    except ResultsWouldBeLost as e:
        log(f"warning: the docs were not rendered: {e}; the results are in {cfg.results}")


def read_results_to_render(path: Path) -> list[CellResult]:
    """The rows of a results file that `render` draws, read strictly: OSError when it cannot be read (missing
    included), ValueError naming the line of one that is no results line. Only a last line that a crash cut
    short (no newline at its end) after a results line is skipped, as `load_results` skips it; a file of another
    kind is refused, so that rendering it never replaces the docs with an empty table."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a results file (not UTF-8 text: {e.reason} at byte {e.start})") from None
    lines = text.splitlines()
    rows: list[CellResult] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise TypeError(f"a JSON {type(obj).__name__}, not an object")
            rows.append(CellResult.from_json(obj))
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n") and rows:
                break  # the line being written when a run was stopped
            raise ValueError(f"{path}, line {number}: not a results line (not JSON: {e.msg})") from None
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}, line {number}: not a results line ({type(e).__name__}: {e})") from None
    return rows


def render(cfg: ReproduceConfig, rows: Sequence[CellResult] | None = None) -> list[Path]:
    """docs/results.md and the two plots from the whole results file (`load_results`: a line that a crash cut
    short is skipped), or from `rows` read from it (`read_results_to_render`, for a rendering on its own).
    ResultsWouldBeLost, writing nothing, when the docs' copy of the results holds measurements that `rows` lacks."""
    assert cfg.docs is not None
    rows = load_results(cfg.results) if rows is None else rows
    check_nothing_dropped(cfg.docs, cfg.results, rows)
    return report.render(rows, cfg.docs, results_path=str(cfg.results), run_dir=cfg.out)


class ResultsWouldBeLost(ValueError):
    """A rendering would replace the docs' copy of the results with rows that lack some of its measurements."""


def check_nothing_dropped(docs: Path, results: Path, rows: Sequence[CellResult]) -> None:
    """ResultsWouldBeLost, naming --docs, --results and a measurement of each kind, when DOCS/results.jsonl (the
    copy an earlier rendering left) holds a measurement (`CellResult.key`) that `rows`, read from `results`, lacks."""
    copy = docs / report.RESULTS_COPY
    if not copy.is_file() or copy.resolve() == Path(results).resolve():
        return
    have = {r.key for r in rows}
    lost = [r for r in load_results(copy) if r.key not in have]
    if lost:
        first = lost[0]
        raise ResultsWouldBeLost(
            f"--docs {str(docs)!r}: its {report.RESULTS_COPY} holds {len(lost)} measurement{'' if len(lost) == 1 else 's'} that --results "
            f"{str(results)!r} lacks (e.g. {first.protocol} {first.cell}, seed {first.seed}): rendering would drop them; add their lines "
            f"to {str(results)!r} (or render from {str(copy)!r} with --results), or give another --docs"
        )


def with_overrides(p: ReproductionProtocol, **changes: int | None) -> ReproductionProtocol:
    """The protocol with the CLI's overrides (max_images, samples, curve_samples, eval_every); None keeps it."""
    for name, value in changes.items():
        if value is not None and (value < 0 or (value == 0 and name != "max_images")):
            raise ValueError(f"--{name.replace('_', '-')} is {value}, expected {'>= 0' if name == 'max_images' else '>= 1'}")
    given: dict[str, Any] = {k: v for k, v in changes.items() if v is not None}  # names of ReproductionProtocol's int fields
    return replace(p, **given)
