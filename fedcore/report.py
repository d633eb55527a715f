"""docs/results.md and its two plots (FD against parameters exchanged, loss per round) from reproduce results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure  # the object API renders with Agg and touches no pyplot global state
from matplotlib.ticker import MaxNLocator

from fedcore.atomic import atomic_write

RESULTS_MD = "results.md"
FD_PLOT = "results-fd-vs-parameters.png"
LOSS_PLOT = "results-loss.png"
GOAL_RATIO = 1.10  # every federated IID row's FD within 1.10x of our centralised FD
PAPER_RATIO = (47.9, 42.5)  # the paper's UDec IID FID against its centralised FID: 1.13

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
(about 5 min), then `--only ulatdec:iid,udec:iid` (about 5 min).
The paper protocol (`--protocol paper`: E = 5, 1,000 ancestral DDPM steps, 1,000 samples per model) costs
about 5x the training and 3.3x the sampling (13 M forwards for the IID row); run it one cell per call with
`--only`, e.g. `--protocol paper --only udec:iid --device cuda`."""

_STRATEGY_ORDER = ("centralised", "full", "usplit", "ulatdec", "udec")
_SPLIT_ORDER = ("all", "iid", "label", "quantity")
_COLOURS = {"centralised": "black", "full": "tab:blue", "usplit": "tab:green", "ulatdec": "tab:orange", "udec": "tab:red"}


def _order(row: Mapping) -> tuple[int, int]:
    split = _SPLIT_ORDER.index(row["split"]) if row["split"] in _SPLIT_ORDER else len(_SPLIT_ORDER)
    strategy = _STRATEGY_ORDER.index(row["strategy"]) if row["strategy"] in _STRATEGY_ORDER else len(_STRATEGY_ORDER)
    return split, strategy


def _by_protocol(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    groups: dict[str, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(row["protocol"], []).append(row)
    return {name: sorted(group, key=_order) for name, group in groups.items()}


def _centralised(rows: Sequence[Mapping]) -> Mapping | None:
    return next((r for r in rows if r["strategy"] == "centralised"), None)


def fd_ratio(row: Mapping, centralised: Mapping | None) -> float | None:
    """The row's FD against the centralised FD of the same protocol and features (the paper's comparison)."""
    if centralised is None or centralised["feature_extractor"] != row["feature_extractor"] or centralised["fd_mean"] <= 0:
        return None
    return row["fd_mean"] / centralised["fd_mean"]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f} M"


def _is_miniature(rows: Sequence[Mapping]) -> bool:
    return any(r["protocol"] == "mini" or r["device"] == "cpu" for r in rows)


def table(rows: Sequence[Mapping]) -> str:
    """The Markdown table of one protocol's rows, in the paper's order."""
    head = (
        "| strategy | split | K | FD mean +- std | models | FD / centralised | parameters exchanged "
        "| reduction vs full | wall time | device | date |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    central = _centralised(rows)
    lines = []
    for r in rows:
        ratio = fd_ratio(r, central)
        lines.append(
            f"| {r['strategy']} | {r['split']} | {r['clients']} | {r['fd_mean']:.2f} +- {r['fd_std']:.2f} "
            f"| {len(r['fd_per_model'])} | {'-' if ratio is None else f'{ratio:.2f}x'} | {_millions(r['parameters_exchanged'])} "
            f"| {r['reduction_vs_full']:.1%} | {_duration(r['wall_seconds'])} | {r['device']} | {r['date']} |"
        )
    return head + "\n".join(lines) + ("\n" if lines else "")


def goal_line(rows: Sequence[Mapping]) -> str:
    central = _centralised(rows)
    federated = [r for r in rows if r["split"] == "iid" and r["strategy"] != "centralised"]
    paper = f"the paper: UDec {PAPER_RATIO[0]} / {PAPER_RATIO[1]} = {PAPER_RATIO[0] / PAPER_RATIO[1]:.2f}x"
    if central is None or not federated:
        return f"Goal, every federated IID row within {GOAL_RATIO:.2f}x of the centralised FD: not measured yet ({paper})."
    ratios = {r["strategy"]: fd_ratio(r, central) for r in federated}
    missed = [f"{s} {x:.2f}x" for s, x in ratios.items() if x is None or x > GOAL_RATIO]
    verdict = "met" if not missed else f"not met ({', '.join(missed)})"
    return f"Goal, every federated IID row within {GOAL_RATIO:.2f}x of the centralised FD: {verdict} ({paper})."


def _protocol_heading(rows: Sequence[Mapping]) -> str:
    r = rows[0]
    k = max(x["clients"] for x in rows)
    return (
        f"## Protocol `{r['protocol']}`\n\n"
        f"Model `{r['model']}`, R = {r['rounds']} rounds, E = {r['epochs']} local epochs, batch {r['batch_size']}, "
        f"K = {k} clients (1 for the centralised reference), {r['images']:,} training images, Dirichlet beta "
        f"{r['beta']}, split seed {r['split_seed']}. FD (squared Frechet distance, Heusel et al. 2017) of "
        f"{r['samples']:,} {r['sampler']} samples per model against {r['reference']['dataset']} "
        f"({r['reference']['count']:,} images) on `{r['feature_extractor']}` features. Global model for "
        "centralised, full and usplit; each client's personalised model for ulatdec and udec (mean +- population "
        "std over the K models). Parameters exchanged are counted the paper's way (both directions, the initial "
        "broadcast once per client); the reduction is against plain FedAvg over the same transfers.\n"
    )


def markdown(rows: Sequence[Mapping], results_path: str = "", plots: bool = True) -> str:
    parts = ["# Results: the paper's experiment grid in simulation\n"]
    if not rows:
        parts.append(
            "**No GPU results yet.** No session has been lent a GPU to run the grid; the table below stays empty "
            "until the command under *Reproduce* has run.\n"
        )
    elif _is_miniature(rows):
        parts.append(
            "**CPU miniature, not the paper protocol.** These numbers show that the pipeline runs end to end "
            "(tiny model, a few hundred images, a couple of rounds); they say nothing about the method's quality.\n"
        )
    else:
        devices = sorted({r["device"] for r in rows})
        dates = sorted({r["date"] for r in rows})
        parts.append(f"Measured on {', '.join(devices)}, {dates[0]}{'' if len(dates) == 1 else ' to ' + dates[-1]}.\n")
    parts.append(f"## Reproduce\n\n```\n{GPU_COMMAND}\n```\n\n{GPU_NOTE}\n")
    if results_path:
        parts.append(f"Source: `{results_path}` (one JSON line per finished cell, with per-round losses and FD curve points).\n")
    if not rows:
        parts.append(table([]))
    for group in _by_protocol(rows).values():
        parts.append(_protocol_heading(group))
        parts.append(table(group))
        parts.append(goal_line(group) + "\n")
    if rows and plots:
        parts.append(
            f"## Plots\n\nFD against cumulative parameters exchanged (curve points use the same, smaller sample "
            f"count at every evaluated round):\n\n![FD against parameters exchanged]({FD_PLOT})\n\n"
            f"Mean local training loss per round:\n\n![Loss per round]({LOSS_PLOT})\n"
        )
    return "\n".join(parts)


def _label(row: Mapping, many_protocols: bool) -> str:
    return f"{row['strategy']} ({row['protocol']})" if many_protocols else row["strategy"]


def _panels(rows: Sequence[Mapping]) -> list[tuple[str, list[Mapping]]]:
    """One panel per split; the centralised reference is drawn in each of them."""
    central = [r for r in rows if r["split"] == "all"]
    splits = [s for s in _SPLIT_ORDER[1:] if any(r["split"] == s for r in rows)]
    if not splits:
        return [("centralised", central)]
    return [(s, central + [r for r in rows if r["split"] == s]) for s in splits]


def plot_fd_vs_parameters(rows: Sequence[Mapping], path: Path) -> Path:
    panels = _panels(sorted(rows, key=_order))
    many = len({r["protocol"] for r in rows}) > 1
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (split, group) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for r in group:
            xs = [p["cumulative_parameters"] / 1e6 for p in r["curve"]]
            ys = [p["fd_mean"] for p in r["curve"]]
            errs = [p["fd_std"] for p in r["curve"]]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, color=_COLOURS.get(r["strategy"]), label=_label(r, many))
        ax.set_title(f"split: {split}")
        ax.set_xlabel("cumulative parameters exchanged (millions)")
        ax.set_ylabel("FD (mean +- std over models)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def plot_loss(rows: Sequence[Mapping], path: Path) -> Path:
    panels = _panels(sorted(rows, key=_order))
    many = len({r["protocol"] for r in rows}) > 1
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (split, group) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for r in group:
            rounds = range(1, len(r["losses"]) + 1)
            ax.plot(rounds, r["losses"], marker=".", color=_COLOURS.get(r["strategy"]), label=_label(r, many))
        ax.set_title(f"split: {split}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("mean local loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def render(rows: Sequence[Mapping], docs: Path | str, results_path: str = "") -> list[Path]:
    """Write results.md (and, when there are rows, the two plots) into `docs`; returns the files written."""
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    written = []
    if rows:
        written += [plot_fd_vs_parameters(rows, docs / FD_PLOT), plot_loss(rows, docs / LOSS_PLOT)]
    md = docs / RESULTS_MD
    atomic_write(md, markdown(rows, results_path).encode())
    return [md, *written]
