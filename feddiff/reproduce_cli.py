"""`feddiff reproduce`: flags of the experiment-grid runner, turned into a `ReproduceConfig` at the edge."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_reproduce_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from feddiff.cli import add_speed_args  # here, not at import time: feddiff.cli imports this module

    p = subparsers.add_parser(
        "reproduce",
        help="the paper's experiment grid in simulation, one cell at a time, resumable; renders docs/results.md",
    )
    p.add_argument(
        "--protocol",
        choices=["quick", "paper", "cpu", "mini"],
        default="quick",
        help="quick: R=15 E=1, FD on 2,000 DDIM-100 samples (one GPU); paper: R=15 E=5, 1,000-step DDPM; "
        "cpu: sized for 2 CPU cores (five IID rows in under 90 minutes); "
        "mini: the CI miniature (tiny model, 300 images, 2 rounds)",
    )
    p.add_argument(
        "--only", action="append", default=[], metavar="STRATEGY:SPLIT", help="run only these cells, e.g. udec:iid or centralised (repeatable, or a comma list)"
    )
    p.add_argument("--strategies", default="centralised,full,usplit,ulatdec,udec", help="comma list")
    p.add_argument("--splits", default="iid,label,quantity", help="comma list of iid, label, quantity")
    p.add_argument("--clients", type=int, default=5, help="K of the federated cells (the centralised one has 1)")
    p.add_argument("--beta", type=float, default=0.5, help="Dirichlet concentration of the skewed splits")
    p.add_argument("--split-seed", type=int, default=2023)
    p.add_argument("--seed", type=int, default=0, help="model init, plans, training and sampling noise; each seed is its own results line and run folder")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: Debian's package)")
    p.add_argument("--out", default=None, help="run folder (default runs/reproduce/PROTOCOL)")
    p.add_argument("--results", default=None, help="results JSONL (default OUT/results.jsonl)")
    p.add_argument("--docs", default="docs", help="folder for results.md and its plots")
    p.add_argument("--no-docs", action="store_true", help="do not render the docs after each cell")
    p.add_argument("--render", action="store_true", help="only render the docs from the results file; train nothing")
    p.add_argument("--inception-weights", default=None, help="pytorch-fid Inception weights: FD on its features")
    p.add_argument("--max-images", type=int, default=None, help="training images (0 = all; default: the protocol's)")
    p.add_argument("--samples", type=int, default=None, help="samples per model for the final FD (default: the protocol's)")
    p.add_argument("--curve-samples", type=int, default=None, help="samples per model at the curve points")
    p.add_argument("--eval-every", type=int, default=None, help="rounds between FD curve points (quick 5, paper 15)")
    add_speed_args(p)
    return p


def _list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run_reproduce(args: argparse.Namespace) -> int:
    from fedcore.experiments.reproduce import PROTOCOLS, ReproduceConfig, render, reproduce, select_cells, with_overrides
    from feddiff.cli import speed_config

    protocol = with_overrides(
        PROTOCOLS[args.protocol],
        max_images=args.max_images,
        samples=args.samples,
        curve_samples=args.curve_samples,
        eval_every=args.eval_every,
    )
    if args.clients < 1:
        raise ValueError(f"--clients is {args.clients}, expected >= 1")
    out = Path(args.out) if args.out else Path("runs/reproduce") / protocol.name
    cfg = ReproduceConfig(
        protocol=protocol,
        cells=tuple(select_cells(_list(args.strategies), _list(args.splits), args.only)),
        out=out,
        results=Path(args.results) if args.results else out / "results.jsonl",
        docs=None if args.no_docs else Path(args.docs),
        clients=args.clients,
        beta=args.beta,
        split_seed=args.split_seed,
        seed=args.seed,
        data_root=args.data_root,
        inception_weights=args.inception_weights,
        speed=speed_config(args),
    )
    if args.render:
        if cfg.docs is None:
            raise ValueError("--render with --no-docs renders nothing")
        for path in render(cfg):
            print(f"wrote {path}")
        return 0
    rows = reproduce(cfg)
    print(f"done: {len(rows)} cells run, results in {cfg.results}" + ("" if cfg.docs is None else f", docs in {cfg.docs}"))
    return 0
