"""The `feddiff` command: one entry point, a subcommand per job; configs are built here, at the edge."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from feddiff import models_cli
from feddiff.reproduce_cli import add_reproduce_parser, run_reproduce

Handler = Callable[[argparse.Namespace], int]
# fedcore.model.unet.ModelName, written out so that the parser is built without importing torch (a test compares them)
MODEL_PRESETS = "paper-fmnist, paper-celeba64, tiny (feddiff's UNet); diffusers-tiny, diffusers-fmnist, ddpm-cifar10 (diffusers UNet2DModel)"
_COMMANDS: dict[str, Handler] = {"reproduce": run_reproduce, **models_cli.COMMANDS}


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = fn
        return fn

    return register


# --- fedcore commands ---------------------------------------------------------------------------------------


@_command("model-info")
def _model_info(args: argparse.Namespace) -> int:
    from fedcore.model.unet import build_model, layout_of

    layout = layout_of(build_model(args.model))
    parts = {p.value: n for p, n in layout.sizes.items()}
    if args.json:
        print(json.dumps({"model": args.model, "total": layout.total, "parts": parts}))
    else:
        print(f"{args.model}: {layout.total:,} parameters")
        for part, n in parts.items():
            print(f"  {part:<10} {n:>12,}  {n / layout.total:6.1%}")
    return 0


@_command("strategies")
def _strategies(args: argparse.Namespace) -> int:
    from fedcore.federation.strategies import Strategy, account
    from fedcore.model.unet import build_model, layout_of

    sizes = layout_of(build_model(args.model)).sizes
    rows = [account(s, sizes, args.clients, args.rounds, seed=args.seed).as_json() for s in Strategy]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{args.model}, K={args.clients}, R={args.rounds}")
        for r in rows:
            print(f"  {r['strategy']:<8} {r['parameters_total']:>14,} parameters  reduction {r['reduction_vs_full']:.1%}")
    return 0


@_command("split")
def _split(args: argparse.Namespace) -> int:
    from fedcore.data.datasets import load_fashion_mnist
    from fedcore.data.splits import describe_split, split_indices

    labels = load_fashion_mnist(train=True, root=args.data_root).class_labels()
    parts = split_indices(labels, args.clients, args.split, beta=args.beta, seed=args.seed)
    rows = describe_split(labels, parts)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"client {r['client']:>3}: {r['size']:>6} images  classes {r['classes']}")
    return 0


def _federation_config(args: argparse.Namespace):  # -> FederationConfig
    from fedcore.federation.server import FederationConfig

    names = ("strategy", "model", "rounds", "clients_per_round", "seed", "epochs", "batch_size", "lr", "loss")
    return FederationConfig.from_settings(**{n: getattr(args, n) for n in names})


def speed_values(args: argparse.Namespace) -> dict[str, object]:
    """The speed flags as given (strings), by SpeedConfig field."""
    return {
        "device": args.device,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "fused_adam": args.fused_adam,
        "compile": "off" if args.no_compile else args.compile,
        "threads": args.threads,
    }


def speed_config(args: argparse.Namespace):  # -> SpeedConfig
    """The speed flags as a SpeedConfig; SettingsError (one line) names a flag whose value does not convert."""
    from fedcore import settings
    from fedcore.model.training import SpeedConfig

    return settings.build(SpeedConfig, speed_values(args), name=settings.flag)


@_command("simulate")
def _simulate(args: argparse.Namespace) -> int:
    from fedcore.data.shards import DataConfig
    from fedcore.experiments.simulation import Simulation, SimulationConfig

    cfg = SimulationConfig(
        federation=_federation_config(args),
        data=DataConfig(
            num_clients=args.clients,
            split=args.split,
            beta=args.beta,
            split_seed=args.split_seed,
            max_images=args.max_images,
            root=args.data_root,
        ),
        speed=speed_config(args),
        init_from=args.init_from,
    )
    sim = Simulation.create(cfg, args.out, resume=args.resume)
    sim.run()
    print(f"done: {sim.federation.completed_rounds} rounds, checkpoints in {args.out}")
    return 0


# --- the federated system ----------------------------------------------------------------------------------


def _setup_logging(verbose: bool = False) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@_command("coordinator")
def _coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import from_args
    from coordinator.server import serve
    from service.allocator import tune_for_streaming

    tune_for_streaming()
    _setup_logging()
    return serve(from_args(args))


@_command("worker")
def _worker(args: argparse.Namespace) -> int:
    from service.allocator import tune_for_streaming
    from worker.config import from_args
    from worker.daemon import run_worker

    tune_for_streaming()
    _setup_logging()
    return run_worker(from_args(args, speed_values(args)))


def _tool_channel(args: argparse.Namespace):  # -> grpc.Channel
    from worker.client import channel_to

    return channel_to(args.address, args.tls_ca, args.tls_key, args.tls_cert, args.tls_server_name)


@_command("health")
def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2

    from service.health import health_check

    with _tool_channel(args) as channel:
        try:
            resp = health_check(channel)(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.address}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


@_command("status")
def _status(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
    from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc

    with _tool_channel(args) as channel:
        try:
            s = pb_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(MessageToDict(s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)))
        return 0
    print(f"{s.state}: round {s.completed_rounds}/{s.rounds} ({s.strategy}, {s.model})")
    if s.error:
        print(f"  error: {s.error}")
    if s.round_selected:
        print(f"  current round: {s.round_done}/{s.round_selected} updates in")
    connected = s.workers_connected or sum(w.connected for w in s.workers)  # 0 from a coordinator that predates the field
    print(f"  workers: {connected} connected of {len(s.workers) + s.workers_omitted} known")
    for w in s.workers:
        gpu = f" {w.gpu_name}" if w.gpu_name else ""
        print(f"    {w.worker_id:<20} {'up' if w.connected else 'down':<5} {w.device}{gpu}, {w.num_examples} images, seen {w.last_seen_seconds_ago:.0f}s ago")
    if s.workers_omitted:
        print(f"    ... and {s.workers_omitted} more not listed (the least recently heard)")
    print(f"  bytes: {s.payload_bytes_down / 1e6:.2f} MB down, {s.payload_bytes_up / 1e6:.2f} MB up")
    print(f"  parameters: {s.parameters_exchanged:,} exchanged, plain FedAvg {s.full_fedavg_parameters:,}: {s.reduction_vs_full:.1%} less")
    return 0


@_command("certs")
def _certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedcore.wire.convert import valid_worker_id
    from feddiff.certs import create_project

    bad = [w for w in args.worker if not valid_worker_id(w) or w in ("ca", "coordinator")]
    if bad:
        raise ValueError(f"worker ids {bad} must be letters, digits, '-', '_' or '.', and not 'ca' or 'coordinator'")
    for path in create_project(Path(args.out), args.coordinator_host, args.worker):
        print(path)
    return 0


# --- argument parsing ---------------------------------------------------------------------------------------


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The run's shape: shared by simulate and the coordinator (which sends it to the workers)."""
    p.add_argument("--strategy", choices=["full", "usplit", "udec", "ulatdec"], default="udec")
    p.add_argument("--model", default="paper-fmnist", help=f"model preset: {MODEL_PRESETS}")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--clients-per-round", type=int, default=0, help="0 = every client, else a seeded sample")
    p.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss", choices=["huber", "mse"], default="huber")
    p.add_argument("--seed", type=int, default=0)


SPEED_MEANING = {  # what each speed flag means; its type, range and default come from SpeedConfig's fields
    "device": "where to train",
    "bf16": "bf16 autocast (auto: on GPUs and CPUs that run bf16 natively)",
    "channels_last": "NHWC memory format",
    "fused_adam": "fused Adam kernel",
    "compile": "torch.compile with CUDA graphs (auto: on CUDA)",
    "threads": "CPU threads for torch (0 = torch's default)",
}


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """The speed flags, each with the type and range its SpeedConfig field declares. Values stay strings
    here: `speed_config` converts them."""
    from dataclasses import fields
    from typing import get_type_hints

    from fedcore import settings
    from fedcore.model.training import SpeedConfig

    types = get_type_hints(SpeedConfig, include_extras=True)
    for f in fields(SpeedConfig):
        p.add_argument(settings.flag((f.name,)), default=f.default, help=settings.flag_help(types[f.name], f.default, SPEED_MEANING[f.name]))
    p.add_argument("--no-compile", action="store_true", help="same as --compile off")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=["iid", "quantity", "label"], default="iid")
    p.add_argument("--beta", type=float, default=0.5, help="Dirichlet concentration of the skewed splits")
    p.add_argument("--split-seed", type=int, default=2023)
    p.add_argument("--max-images", type=int, default=0, help="use only this many training images (0 = all)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: Debian's package)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddiff", description="Federated training of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("model-info", help="parameter counts of a model preset, by part")
    p.add_argument("--model", default="paper-fmnist", help=f"model preset: {MODEL_PRESETS}")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("strategies", help="parameters each strategy exchanges, counted the paper's way")
    p.add_argument("--model", default="paper-fmnist", help=f"model preset: {MODEL_PRESETS}")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seed", type=int, default=0, help="seeds USplit's random pairing")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("split", help="each client's size and class histogram under a data split")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--split", choices=["iid", "quantity", "label"], default="iid")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=2023)
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("simulate", help="a whole federated run in one process (experiments on one GPU)")
    add_training_args(p)
    add_data_args(p)
    add_speed_args(p)
    p.add_argument("--clients", type=int, default=5, help="K; --clients 1 --strategy full is the centralised baseline")
    p.add_argument("--out", default="runs/simulate", help="output folder: rounds.jsonl and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--init-from", default="", metavar="DIR_OR_FILE", help="start the global model from a diffusers UNet or pipeline folder, or a feddiff .safetensors"
    )

    add_reproduce_parser(sub)

    from coordinator import config as coordinator_config
    from worker import config as worker_config

    p = sub.add_parser("coordinator", help="run the coordinator (gRPC server, round loop, checkpoints, metrics)")
    coordinator_config.add_arguments(p)

    p = sub.add_parser("worker", help="run a worker daemon that trains on this host's private images")
    worker_config.add_arguments(p)
    add_speed_args(p)

    p = sub.add_parser("certs", help="create a project CA, the coordinator's certificate and one per worker (mutual TLS)")
    p.add_argument("--out", required=True, help="folder for ca.crt/ca.key (reused when present) and the issued pairs")
    p.add_argument("--coordinator-host", action="append", default=[], help="DNS name or IP the workers dial (repeatable)")
    p.add_argument("--worker", action="append", default=[], help="a worker id: its certificate's common name (repeatable)")

    for name, text in (
        ("health", "exit 0 when the coordinator's gRPC health service says SERVING"),
        ("status", "round, workers, bytes and reduction of a coordinator"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--address", "--coordinator", dest="address", required=True, help="HOST:PORT")
        p.add_argument("--timeout", type=float, default=5.0)
        p.add_argument("--insecure", action="store_true", help="plain text (the default without --tls-ca)")
        p.add_argument("--tls-ca", default="")
        p.add_argument("--tls-cert", default="")
        p.add_argument("--tls-key", default="")
        p.add_argument("--tls-server-name", default="")
        if name == "health":
            p.add_argument("--service", default="", help="service name to check ('' = the server)")
        else:
            p.add_argument("--json", action="store_true")
    models_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command's exit status: 2 for a refused setting or a missing file, 1 when a port to listen on is
    taken (or the coordinator's run failed), one line on stderr saying why."""
    from fedcore.errors import CannotListen, ExistingRun, ModelUnavailable

    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except CannotListen as e:
        print(f"feddiff {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, ModelUnavailable, ExistingRun) as e:
        print(f"feddiff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
