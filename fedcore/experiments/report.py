"""docs/results.md, its two plots (FD against parameters exchanged, loss per round) and one sample grid per
cell, from the results lines of `feddiff reproduce`.

A cell run with several seeds is one row: its FD is the mean over seeds, its spread the half range of the
per-seed FDs relative to that mean. Text between NOTES_BEGIN and NOTES_END in an existing results.md (the
discussion of the numbers, written by hand) is kept when the file is rendered again."""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure  # the object API renders with Agg and touches no pyplot global state
from matplotlib.ticker import MaxNLocator

from fedcore.atomic import atomic_write
from fedcore.experiments.results import CellResult

RESULTS_MD = "results.md"
RESULTS_COPY = "results.jsonl"  # the rendered rows beside results.md, so the table can be checked and re-rendered
FD_PLOT = "results-fd-vs-parameters.png"
LOSS_PLOT = "results-loss.png"
SAMPLES_DIR = "samples"  # beside results.md: one grid per cell, <protocol>-<cell folder>.png
NOTES_BEGIN = "<!-- notes: written by hand, kept when feddiff reproduce renders this file -->"
NOTES_END = "<!-- end of notes -->"
GOAL_RATIO = 1.10  # every federated IID row's FD within 1.10x of our centralised FD
PAPER_RATIO = (47.9, 42.5)  # the paper's UDec IID FID against its centralised FID: 1.13

CPU_COMMANDS = """\
feddiff reproduce --protocol cpu --splits iid                                              # the five IID rows
feddiff reproduce --protocol cpu --splits iid --only centralised,udec:iid --seed 1         # their second seed
feddiff reproduce --protocol cpu --splits label,quantity --strategies full,udec            # the skew table"""
GPU_COMMAND = "feddiff reproduce --protocol quick --splits iid --device cuda"
GPU_NOTE = """\
One process on one GPU; resumable: after an interruption run the same command again (finished cells are
skipped by their line in the results file, a half-trained cell continues from its last round checkpoint;
keep the run folder `runs/reproduce/quick/` between calls, or at least its `results.jsonl`).

Expected time on one H100, an estimate and not yet a measurement: training is 5 cells x 15 rounds x
60,000 images = 4.5 M images at the ~15,000 images/s the compiled bf16 loop reached on an H200 (5 min),
plus a torch.compile warm-up per cell (15-45 s each); sampling is 13 models (3 global, 2 x 5 personalised)
x (2,000 + 2 x 500) DDIM-100 samples = 3.9 M UNet forwards, each about a third of a training image
(2-3 min with the compiled bf16 sampler). About 8-11 min in all. Where one call is capped near 8 minutes,
split the row over two calls on the same results file: `--only centralised,full:iid,usplit:iid`
(about 5 min), then `--only ulatdec:iid,udec:iid` (about 5 min): `bench/gpu_checks.sh DIR repro-a repro-b`
runs these two halves, each bounded in time, beside the GPU tests and benchmarks (its header lists the steps).
The paper protocol (`--protocol paper`: E = 5, 1,000 ancestral DDPM steps, 1,000 samples per model) costs
about 5x the training and 3.3x the sampling (13 M forwards for the IID row); run it one cell per call with
`--only`, e.g. `--protocol paper --only udec:iid --device cuda`."""

RENDER_NOTE = f"""\
A rendering never drops a measurement: where this folder's {RESULTS_COPY} holds lines that the results file lacks
(a fresh checkout's run, rows measured on another machine), `feddiff reproduce` leaves these files as they are and
says so. To add rows, append their lines to a copy of [{RESULTS_COPY}]({RESULTS_COPY}) and render that copy:
`feddiff reproduce --render --results COPY`.
"""

_STRATEGY_ORDER = ("centralised", "full", "usplit", "ulatdec", "udec")
_FEDERATED = _STRATEGY_ORDER[1:]  # the rows the goal speaks of
_SPLIT_ORDER = ("all", "iid", "label", "quantity")
_COLOURS = {"centralised": "black", "full": "tab:blue", "usplit": "tab:green", "ulatdec": "tab:orange", "udec": "tab:red"}


@dataclass(frozen=True)
class CellSummary:
    """One table row: a cell's results lines (one per seed) of one protocol."""

    runs: tuple[CellResult, ...]  # by seed

    @property
    def first(self) -> CellResult:
        return self.runs[0]

    @property
    def strategy(self) -> str:
        return self.first.strategy

    @property
    def split(self) -> str:
        return self.first.split

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def fd_mean(self) -> float:
        """The mean over seeds of each seed's mean FD over its models."""
        return statistics.fmean(r.fd_mean for r in self.runs)

    @property
    def fd_std(self) -> float:
        """Population std of the FD over every evaluated model of every seed (0 for one global model)."""
        fds = [m.fd for r in self.runs for m in r.fd_per_model]
        return statistics.pstdev(fds) if len(fds) > 1 else 0.0

    @property
    def models(self) -> int:
        """Models scored over every seed: the spread `fd_std` is taken over."""
        return sum(len(r.fd_per_model) for r in self.runs)

    @property
    def seed_spread(self) -> float | None:
        """Half the range of the per-seed mean FDs, relative to their mean; None with one seed."""
        if len(self.runs) < 2:
            return None
        fds = [r.fd_mean for r in self.runs]
        return (max(fds) - min(fds)) / 2 / self.fd_mean

    @property
    def wall_seconds(self) -> float:
        """The first seed's (later seeds may have shared the machine with other work)."""
        return self.first.wall_seconds


def _order(row: CellResult) -> tuple[int, int, int]:
    split = _SPLIT_ORDER.index(row.split) if row.split in _SPLIT_ORDER else len(_SPLIT_ORDER)
    strategy = _STRATEGY_ORDER.index(row.strategy) if row.strategy in _STRATEGY_ORDER else len(_STRATEGY_ORDER)
    return split, strategy, row.seed


def _by_protocol(rows: Sequence[CellResult]) -> dict[str, list[CellResult]]:
    groups: dict[str, list[CellResult]] = {}
    for row in rows:
        groups.setdefault(row.protocol, []).append(row)
    return {name: sorted(group, key=_order) for name, group in groups.items()}


def summarise(rows: Sequence[CellResult]) -> list[CellSummary]:
    """One summary per cell of one protocol's rows, in the paper's order (rows of a cell are its seeds)."""
    cells: dict[str, list[CellResult]] = {}
    for row in sorted(rows, key=_order):
        cells.setdefault(row.cell, []).append(row)
    return [CellSummary(tuple(runs)) for runs in cells.values()]


def _centralised(cells: Sequence[CellSummary]) -> CellSummary | None:
    return next((c for c in cells if c.strategy == "centralised"), None)


def fd_ratio(cell: CellSummary, centralised: CellSummary | None) -> float | None:
    """The cell's FD against the centralised FD of the same protocol and features (the paper's comparison)."""
    if centralised is None or centralised.first.feature_extractor != cell.first.feature_extractor or centralised.fd_mean <= 0:
        return None
    return cell.fd_mean / centralised.fd_mean


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f} M"


def _seeds(cell: CellSummary) -> str:
    spread = cell.seed_spread
    if spread is None:
        return str(cell.seeds[0])
    return f"{', '.join(map(str, cell.seeds))} (+-{spread:.1%})"


_HEAD = (
    "| strategy | split | K | FD mean +- std | models | seeds (spread) | FD / centralised | parameters exchanged "
    "| reduction vs full | wall time | device | date |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
)


def table(cells: Sequence[CellSummary], central: CellSummary | None = None, baselines: bool = True) -> str:
    """The Markdown table of cells in the paper's order; with `baselines`, the floor and noise rows after them."""
    lines = []
    for c in cells:
        ratio = fd_ratio(c, central)
        r = c.first
        lines.append(
            f"| {c.strategy} | {c.split} | {r.clients} | {c.fd_mean:.2f} +- {c.fd_std:.2f} "
            f"| {c.models} | {_seeds(c)} | {'-' if ratio is None else f'{ratio:.2f}x'} "
            f"| {_millions(r.parameters_exchanged)} | {r.reduction_vs_full:.1%} | {_duration(c.wall_seconds)} "
            f"| {r.device} | {r.date} |"
        )
    if baselines and cells and cells[0].first.floor_fd is not None and cells[0].first.noise_fd is not None:
        r = cells[0].first
        n = f"{r.samples:,}"
        lines.append(f"| real training images ({n}): the floor | - | - | {r.floor_fd:.2f} | - | - | - | - | - | - | - | - |")
        lines.append(f"| uniform noise ({n} images) | - | - | {r.noise_fd:.2f} | - | - | - | - | - | - | - | - |")
    return _HEAD + "\n".join(lines) + ("\n" if lines else "")


def goal_line(rows: Sequence[CellResult]) -> str:
    """Whether every federated IID cell of one protocol's rows is within GOAL_RATIO of the centralised FD."""
    cells = summarise(rows)
    central = _centralised(cells)
    federated = [c for c in cells if c.split == "iid" and c.strategy != "centralised"]
    paper = f"the paper: UDec {PAPER_RATIO[0]} / {PAPER_RATIO[1]} = {PAPER_RATIO[0] / PAPER_RATIO[1]:.2f}x"
    goal = f"Goal, every federated IID row within {GOAL_RATIO:.2f}x of the centralised FD"
    if central is None or not federated:
        return f"{goal}: not measured yet ({paper})."
    noise = central.first.noise_fd
    if noise is not None and central.fd_mean >= noise:
        return (
            f"{goal}: not measurable here: the centralised model scores {central.fd_mean:.2f}, no better than uniform noise "
            f"({noise:.2f}), so a ratio to it compares noise with noise ({paper})."
        )
    ratios = {c.strategy: fd_ratio(c, central) for c in federated}
    missed = [f"{s} {x:.2f}x" for s, x in ratios.items() if x is None or x > GOAL_RATIO]
    unmeasured = [s for s in _FEDERATED if s not in ratios]
    if missed:
        verdict = f"not met ({', '.join(missed)})"
    elif unmeasured:
        verdict = f"met by the {len(ratios)} row{'' if len(ratios) == 1 else 's'} measured"
    else:
        verdict = "met"
    if unmeasured:
        verdict += f"; not measured yet: {', '.join(unmeasured)}"
    spreads = [f"{c.strategy} +-{c.seed_spread:.1%}" for c in (central, *federated) if c.seed_spread is not None]
    spread = f"; run-to-run spread over seeds: {', '.join(spreads)}" if spreads else ""
    return f"{goal}: {verdict} ({paper}{spread})."


def per_model_lines(cells: Sequence[CellSummary]) -> str:
    """Each personalised model's FD beside its client's image count (seed 0), for the skewed splits."""
    out = []
    for c in cells:
        models = c.first.fd_per_model
        if len(models) > 1:
            each = "; ".join(f"{m.model} ({m.images:,} images) {m.fd:.2f}" for m in models)
            out.append(f"- {c.strategy}, {c.split}: {each}")
    return "\n".join(out) + ("\n" if out else "")


def _protocol_heading(rows: Sequence[CellResult]) -> str:
    r = rows[0]
    k = max(x.clients for x in rows)
    lr = "" if r.lr is None else f", lr {r.lr:g}"
    return (
        f"## Protocol `{r.protocol}`\n\n"
        f"Model `{r.model}`, R = {r.rounds} rounds, E = {r.epochs} local epochs, batch {r.batch_size}{lr}, "
        f"K = {k} client{'' if k == 1 else 's'} (1 for the centralised reference), {r.images:,} training images, Dirichlet beta "
        f"{r.beta}, split seed {r.split_seed}. FD (squared Frechet distance, Heusel et al. 2017) of "
        f"{r.samples:,} {r.sampler} samples per model against {r.reference.dataset} "
        f"({r.reference.count:,} images) on `{r.feature_extractor}` features. Global model for "
        "centralised, full and usplit; each client's personalised model for ulatdec and udec. FD mean +- std: the "
        "mean over seeds of each seed's mean FD, +- the population std over every model scored, of every seed (the "
        "models column counts them). The floor is the FD of as many real training images as samples, the best "
        "score this sample count allows; uniform noise scores where a model that learned nothing does. Parameters exchanged are counted the paper's way (both directions, the initial "
        "broadcast once per client); the reduction is against plain FedAvg over the same transfers. Wall time: "
        "training and evaluation of one cell (its first seed).\n"
    )


def _iid_total(cells: Sequence[CellSummary]) -> str:
    iid = [c for c in cells if c.split in ("all", "iid")]
    if len(iid) < 2:
        return ""
    runs = [c.first for c in iid]
    train, evaluate = sum(r.train_seconds for r in runs), sum(r.eval_seconds for r in runs)
    return (
        f"The IID rows (seed {iid[0].seeds[0]}) took {_duration(train + evaluate)} of wall time: "
        f"{_duration(train)} training and {_duration(evaluate)} sampling and scoring.\n"
    )


def _status(rows: Sequence[CellResult]) -> str:
    if not rows:
        return "**No results yet.** The tables below stay empty until a command under *Reproduce* has run.\n"
    protocols = {r.protocol for r in rows}
    if protocols == {"mini"}:
        return (
            "**CPU miniature, not the paper protocol.** These numbers show that the pipeline runs end to end "
            "(tiny model, a few hundred images, a couple of rounds); they say nothing about the method's quality.\n"
        )
    devices = sorted({r.device for r in rows})
    dates = sorted({r.date for r in rows})
    line = f"Measured on {'; '.join(devices)}, {dates[0]}{'' if len(dates) == 1 else ' to ' + dates[-1]}."
    if all(r.device.startswith("cpu") for r in rows):
        line += " **No GPU results yet**: the `quick` and `paper` protocols wait for a GPU (command below)."
    return line + "\n"


def _grid_section(cells: Sequence[CellSummary], protocol: str, docs: Path | None) -> str:
    shown = []
    for c in cells:
        name = f"{SAMPLES_DIR}/{protocol}-{c.first.folder or ''}.png"
        if docs is not None and c.first.folder and (docs / name).is_file():
            models = c.first.fd_per_model
            model = "the global model" if len(models) == 1 else f"{models[0].model}'s own model"
            shown.append(f"**{c.strategy}, {c.split}** ({model}, seed {c.seeds[0]}):\n\n![{c.strategy} {c.split}]({name})\n")
    return ("### Samples\n\n" + "\n".join(shown)) if shown else ""


def kept_notes(path: Path) -> str:
    """The hand-written notes block of an existing results.md, markers included ('' when there is none)."""
    if not path.is_file():
        return ""
    text = path.read_text()
    begin, end = text.find(NOTES_BEGIN), text.find(NOTES_END)
    return text[begin : end + len(NOTES_END)] + "\n" if 0 <= begin < end else ""


def compression_table(rows: Sequence[CellResult]) -> str:
    """The cells run with compressed updates (`--compression`), each beside the same cell without: the bytes
    exchanged both ways, how many times fewer than plain FedAvg in float32, and FD / uncompressed FD. Empty
    when there is none."""
    coded = [r for r in rows if r.compression != "none"]
    if not coded:
        return ""
    plain = {(r.protocol, r.strategy, r.split, r.seed, r.clients): r for r in rows if r.compression == "none"}
    lines = []
    for r in sorted(coded, key=lambda r: (r.protocol, _order(r), r.compression)):
        base = plain.get((r.protocol, r.strategy, r.split, r.seed, r.clients))
        ratio = "-" if base is None or base.fd_mean <= 0 else f"{r.fd_mean / base.fd_mean:.2f}x"
        fewer = "-" if not r.payload_bytes or not r.full_fedavg_fp32_bytes else f"{r.full_fedavg_fp32_bytes / r.payload_bytes:.1f}x"
        nbytes = "-" if r.payload_bytes is None else f"{r.payload_bytes / 1e6:,.1f} MB"
        lines.append(
            f"| {r.protocol} | {r.strategy} | {r.split} | `{r.compression}` | {nbytes} | {fewer} | {r.fd_mean:.2f} +- {r.fd_std:.2f} | {ratio} | {r.seed} | {r.date} |"
        )
    return (
        "## Compressed updates\n\nCells whose clients send their deltas coded (`feddiff reproduce --compression CODEC`, with "
        "error feedback, and with a lossy codec the downloads as coded changes), beside the same cell without compression. Bytes: the payloads "
        "exchanged both ways; the reduction is against plain FedAvg in float32 over the same transfers.\n\n"
        "| protocol | strategy | split | codec | bytes | fewer than plain FedAvg float32 | FD | FD / uncompressed FD | seed | date |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )


def markdown(rows: Sequence[CellResult], results_path: str = "", plots: bool = True, docs: Path | None = None, notes: str = "") -> str:
    compressed = compression_table(rows)
    rows = [r for r in rows if r.compression == "none"]  # the paper's table: float32 updates
    parts = ["# Results: the paper's experiment table in simulation\n", _status(rows)]
    parts.append(
        f"## Reproduce\n\nOn a CPU (2 cores: about 3.5 hours for all three):\n\n```\n{CPU_COMMANDS}\n```\n\n"
        f"On one GPU:\n\n```\n{GPU_COMMAND}\n```\n\n{GPU_NOTE}\n"
    )
    if results_path:
        parts.append(
            f"Source: `{results_path}`, copied to [{RESULTS_COPY}]({RESULTS_COPY}) beside this file (one JSON line per "
            "finished cell and seed, with per-round losses and FD curve points).\n"
        )
        parts.append(RENDER_NOTE)
    if not rows:
        parts.append(table([]))
    for protocol, group in _by_protocol(rows).items():
        cells = summarise(group)
        central = _centralised(cells)
        iid = [c for c in cells if c.split in ("all", "iid")]
        skewed = [c for c in cells if c.split not in ("all", "iid")]
        parts.append(_protocol_heading(group))
        if iid:
            parts.append("### IID\n\n" + table(iid, central))
            parts.append(goal_line(group) + "\n")
            parts.append(_iid_total(cells))
        if skewed:
            parts.append("### Skewed splits\n\n" + table(skewed, central, baselines=False))
            parts.append("Each personalised model's FD beside its client's share of the images:\n\n" + per_model_lines(skewed))
        parts.append(_grid_section(cells, protocol, docs))
    parts.append(compressed)
    if notes:
        parts.append("## Discussion\n\n" + notes)
    if rows and plots:
        parts.append(
            f"## Plots\n\nFD against cumulative parameters exchanged (curve points use the same, smaller sample "
            f"count at every evaluated round):\n\n![FD against parameters exchanged]({FD_PLOT})\n\n"
            f"Mean local training loss per round:\n\n![Loss per round]({LOSS_PLOT})\n"
        )
    return "\n".join(p for p in parts if p)


def _label(row: CellResult, many_protocols: bool) -> str:
    return f"{row.strategy} ({row.protocol})" if many_protocols else row.strategy


def _panels(rows: Sequence[CellResult]) -> list[tuple[str, list[CellResult]]]:
    """One panel per split, the first seed of each cell; the centralised reference is drawn in each of them."""
    first = [c.first for group in _by_protocol(rows).values() for c in summarise(group)]
    central = [r for r in first if r.split == "all"]
    splits = [s for s in _SPLIT_ORDER[1:] if any(r.split == s for r in first)]
    if not splits:
        return [("centralised", central)]
    return [(s, central + [r for r in first if r.split == s]) for s in splits]


def plot_fd_vs_parameters(rows: Sequence[CellResult], path: Path) -> Path:
    panels = _panels(rows)
    many = len({r.protocol for r in rows}) > 1
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (split, group) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for r in group:
            xs = [p.cumulative_parameters / 1e6 for p in r.curve]
            ys = [p.fd_mean for p in r.curve]
            errs = [p.fd_std for p in r.curve]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color=_COLOURS.get(r.strategy), label=_label(r, many))
        ax.set_title(f"split: {split}")
        ax.set_xlabel("cumulative parameters exchanged (millions)")
        ax.set_ylabel("FD (mean +- std over models)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def plot_loss(rows: Sequence[CellResult], path: Path) -> Path:
    panels = _panels(rows)
    many = len({r.protocol for r in rows}) > 1
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (split, group) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for r in group:
            rounds = range(1, len(r.losses) + 1)
            ax.plot(rounds, r.losses, marker=".", color=_COLOURS.get(r.strategy), label=_label(r, many))
        ax.set_title(f"split: {split}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("mean local loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def copy_grids(rows: Sequence[CellResult], run_dir: Path, docs: Path) -> list[Path]:
    """Each cell's sample grid from its run folder into docs/samples/ (cells whose folder is gone are skipped)."""
    copied = []
    for row in rows:
        if not row.folder:
            continue
        src = run_dir / row.folder / "samples.png"
        if src.is_file():
            dst = docs / SAMPLES_DIR / f"{row.protocol}-{row.folder}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.append(dst)
    return copied


def render(rows: Sequence[CellResult], docs: Path | str, results_path: str = "", run_dir: Path | None = None) -> list[Path]:
    """Write results.md (and, when there are rows, the two plots and the cells' sample grids) into `docs`,
    keeping the notes block of the results.md already there; returns the files written."""
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if rows:
        atomic_write(docs / RESULTS_COPY, "".join(json.dumps(r.as_json()) + "\n" for r in rows).encode())
        plain = [r for r in rows if r.compression == "none"]  # the plots are the paper's table's
        written += [docs / RESULTS_COPY, plot_fd_vs_parameters(plain, docs / FD_PLOT), plot_loss(plain, docs / LOSS_PLOT)]
        if run_dir is not None:
            written += copy_grids(rows, run_dir, docs)
    md = docs / RESULTS_MD
    atomic_write(md, markdown(rows, results_path, docs=docs, notes=kept_notes(md)).encode())
    return [md, *written]
