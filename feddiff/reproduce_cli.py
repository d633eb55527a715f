"""`feddiff reproduce`: flags of the experiment-table runner, turned into a `ReproduceConfig` at the edge: every
value converted to its setting's type, or refused in one line before any cell runs."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

from fedcore import settings
from fedcore.data.shards import SplitConfig
from fedcore.data.splits import SplitKind
from fedcore.experiments.devices import DeviceList
from fedcore.experiments.reproduce import (
    PROTOCOLS,
    SPLITS,
    STRATEGIES,
    CellStrategy,
    ProtocolName,
    ReproduceConfig,
    ReproductionProtocol,
    select_cells,
    with_overrides,
)
from fedcore.model.training import SpeedConfig
from fedcore.payload.codecs import CompressionName, settle_compression
from fedcore.settings import ExistingFile, FdSamples, Positive, Seed
from feddiff.args import DEVICES_MEANING, OUT_DIR_OLD_SPELLINGS, RUN_MEANING, SPEED_MEANING, Command, add_speed_flags, check_folder_path
from service import flags
from service.split_flags import SPLIT_MEANING, SPLIT_OLD_SPELLINGS


@dataclass(frozen=True)
class ReproduceSettings:
    """Every setting of `feddiff reproduce`; the protocol's sizes that a flag overrides (None: the protocol's)
    take the ranges of the settings they are. The split's kind is each cell's (--splits), and its max_images,
    when --max-images is not given, the protocol's."""

    __pydantic_config__ = settings.CONFIG

    protocol: ProtocolName = "quick"
    only: tuple[str, ...] = ()  # cells to run, STRATEGY:SPLIT or centralised (each may be a comma list)
    strategies: Annotated[tuple[CellStrategy, ...], settings.CommaList] = STRATEGIES  # the strategies whose cells run
    splits: Annotated[tuple[SplitKind, ...], settings.CommaList] = SPLITS  # the splits whose federated cells run
    data: SplitConfig = SplitConfig()  # K of the federated cells (the centralised one has 1), beta, split seed, ...
    compression: CompressionName = "none"  # the federated cells' delta codec (each codec its own cells, lines and folders)
    seed: Seed = 0  # model init, plans, training and sampling noise; each seed is its own results line and folder
    out_dir: str | None = None  # run folder (None: runs/reproduce/PROTOCOL)
    results: str | None = None  # results JSONL (None: OUT_DIR/results.jsonl)
    docs: str = "docs"  # folder for results.md and its plots
    no_docs: bool = False
    render: bool = False  # only render the docs from the results file
    inception_weights: ExistingFile | None = None
    samples: FdSamples | None = None
    curve_samples: FdSamples | None = None
    eval_every: Positive | None = None
    devices: DeviceList | None = None  # train each round's clients in parallel, one process per device
    speed: SpeedConfig = SpeedConfig()

    def __post_init__(self) -> None:
        if self.render and self.no_docs:
            raise ValueError("--render with --no-docs renders nothing")
        settle_compression(self)

    @property
    def protocol_run(self) -> ReproductionProtocol:
        """The protocol with the sizes the flags override."""
        max_images = None if settings.is_default(self, "data.max_images") else self.data.max_images
        overrides = {"max_images": max_images, "samples": self.samples, "curve_samples": self.curve_samples, "eval_every": self.eval_every}
        return with_overrides(PROTOCOLS[self.protocol], **overrides)

    @property
    def reproduce(self) -> ReproduceConfig:
        """The cells of the table these settings select (ValueError for --only, --strategies or --splits that name no cell)."""
        protocol = self.protocol_run
        out = Path(self.out_dir) if self.out_dir else Path("runs/reproduce") / protocol.name
        return ReproduceConfig(
            protocol=protocol,
            cells=tuple(select_cells(self.strategies, self.splits, self.only, self.compression)),
            out=out,
            results=Path(self.results) if self.results else out / "results.jsonl",
            docs=None if self.no_docs else Path(self.docs),
            data=replace(self.data, max_images=protocol.max_images),
            seed=self.seed,
            inception_weights=self.inception_weights,
            speed=self.speed,
            devices=self.devices or (),
        )


MEANING = {
    **RUN_MEANING,
    **SPEED_MEANING,
    **SPLIT_MEANING,
    "protocol": "quick: R=15 E=1, FD on 2,000 DDIM-100 samples (one GPU); paper: R=15 E=5, 1,000-step DDPM; "
    "cpu: sized for 2 CPU cores (five IID rows in under 90 minutes); mini: the CI miniature (tiny model, 300 images, 2 rounds)",
    "strategies": "the strategies whose cells run (centralised: the reference trained on every image)",
    "splits": "the splits whose federated cells run",
    "num_clients": "K of the federated cells (the centralised one has 1)",
    "seed": "model init, plans, training and sampling noise; each seed is its own results line and run folder",
    "out_dir": "run folder (default runs/reproduce/PROTOCOL)",
    "results": "results JSONL (default OUT_DIR/results.jsonl)",
    "docs": "folder for results.md and its plots",
    "no_docs": "do not render the docs after each cell",
    "render": "only render the docs from the results file; train nothing",
    "max_images": "training images, drawn before splitting (0 = all)",
    "samples": "samples per model for the final FD (default: the protocol's)",
    "curve_samples": "samples per model at the curve points (default: the protocol's)",
    "eval_every": "rounds between FD curve points (default: the protocol's, quick 5, paper 15)",
    "devices": DEVICES_MEANING + "; --device places the evaluation",
}


NOT_FLAGS = ("only", "speed", "split")  # --only takes its own flag, speed the speed flags; the split's kind is each cell's (--splits)


def add_reproduce_flags(p: argparse.ArgumentParser) -> None:
    """reproduce's flags: one per setting of ReproduceSettings."""
    flags.add_flags(
        p,
        ReproduceSettings,
        MEANING,
        skip=NOT_FLAGS,
        old={**SPLIT_OLD_SPELLINGS, **OUT_DIR_OLD_SPELLINGS},
        metavars={"out_dir": "DIR"},
        shown_defaults={"max_images": "the protocol's"},
    )
    p.add_argument("--only", action="append", metavar="STRATEGY:SPLIT", help="run only these cells, e.g. udec:iid or centralised (repeatable, or a comma list)")
    add_speed_flags(p)


def run_reproduce(args: argparse.Namespace) -> int:
    """The selected cells that the results file lacks (or, --render, the docs alone)."""
    from fedcore.errors import TrainingProcessFailed
    from fedcore.experiments.reproduce import read_results_to_render, render, reproduce

    given = flags.build(ReproduceSettings, args)
    cfg = given.reproduce
    if cfg.docs is not None:
        check_folder_path(cfg.docs, "--docs")
    if not given.render:
        check_folder_path(cfg.out, "--out-dir")
    if given.render:
        try:
            rows = read_results_to_render(cfg.results)
        except OSError as e:
            raise ValueError(f"--results {str(cfg.results)!r}: cannot read it ({e.strerror or e}); nothing rendered") from None
        except ValueError as e:
            raise ValueError(f"--results {e}; nothing rendered") from None
        for path in render(cfg, rows):
            print(f"wrote {path}")
        return 0
    try:
        done = reproduce(cfg)
    except TrainingProcessFailed as e:
        print(f"feddiff reproduce: error: {e}", file=sys.stderr)
        return 1
    print(f"done: {len(done)} cell{'' if len(done) == 1 else 's'} run, results in {cfg.results}" + ("" if cfg.docs is None else f", docs in {cfg.docs}"))
    return 0


COMMANDS = {"reproduce": Command(add_reproduce_flags, run_reproduce)}
