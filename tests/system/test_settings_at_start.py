"""Settings that would pass a range check and fail at run time are refused at start: a number the wire cannot
carry or a wait Python cannot time, NaN and infinities, a boolean for a number, a device this machine does
not have. Each ends the start with exit status 2 and one line naming the flag or key, the value and what it
takes; every number a worker is sent fits its field of the wire contract at the top of its range."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import grpc
import pytest
from annotated_types import Interval

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore import settings
from fedcore.data.shards import SplitConfig
from fedcore.errors import FieldOutOfRange, SettingsError
from fedcore.model.training import SpeedConfig, TrainConfig
from fedcore.payload.codecs import compression_codec
from fedcore.wire import bounds
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from feddiff.cli import build_parser, main
from feddiff.local import metric_value, scrape
from service import flags
from tests.parsers import coordinator_config, subcommands
from tests.system.raw_client import RawWorker
from worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]
WORKER = ["worker", "--coordinator", "127.0.0.1:9", "--client-index", "0", "--insecure"]
U32 = 2**32 - 1

# Every numeric setting of both configs, and what it feeds: a field of the wire contract (with the units of
# the setting per unit of the field), or this process alone (a count, a local wait, a port, a local limit).
SENT = {
    (CoordinatorConfig, "rounds"): ("JoinResponse.rounds", 1),
    (CoordinatorConfig, "chunk_size"): ("JoinResponse.chunk_size", 1),
    (CoordinatorConfig, "epochs"): ("TrainSpec.epochs", 1),
    (CoordinatorConfig, "batch_size"): ("TrainSpec.batch_size", 1),
    (CoordinatorConfig, "seed"): ("EvalSpec.seed", 1),
    (CoordinatorConfig, "eval_samples"): ("EvalSpec.num_samples", 1),
    (CoordinatorConfig, "eval_steps"): ("EvalSpec.steps", 1),
}
# Durations sent in milliseconds: a week at most (a user's units), within their field's bound.
SENT_WITHIN = {
    (CoordinatorConfig, "heartbeat_interval"): ("JoinResponse.heartbeat_interval_ms", 1000),
    (WorkerConfig, "wait_timeout"): ("WaitTaskRequest.timeout_ms", 1000),
}
SENT_OPEN = {(CoordinatorConfig, "lr"): "TrainSpec.lr"}  # a range open at its top, as the wire's
SENT_IN_NAME = {(CoordinatorConfig, "compression_block"): "TrainSpec.compression"}  # travels inside the codec's name
LOCAL = {
    (CoordinatorConfig, name)
    for name in (
        "clients_per_round", "min_workers", "round_deadline", "quorum", "health_port", "metrics_port", "max_concurrent_uploads",
        "upload_idle_timeout", "heartbeat_timeout", "max_failed_attempts", "final_save_timeout", "max_delta_value", "max_weight_share", "clip_norm",
        "clip_multiplier", "departed_retention", "eval_every", "download_idle_timeout", "max_concurrent_rpcs",
        "max_streams_per_connection",
    )
} | {
    (WorkerConfig, name)
    for name in ("client_index", "image_size", "channels", "metrics_port", "backoff_initial", "backoff_max", "upload_rate_limit",
                 "download_rate_limit", "collective_timeout")
} | {(SplitConfig, name) for name in ("num_clients", "beta", "split_seed", "max_images")} | {(SpeedConfig, "threads")}  # fmt: skip
# Seconds waited here (threading and asyncio waits, gRPC deadlines): at most what Python's waits take.
WAITS = [
    (CoordinatorConfig, "round_deadline"), (CoordinatorConfig, "upload_idle_timeout"), (CoordinatorConfig, "heartbeat_timeout"),
    (CoordinatorConfig, "heartbeat_interval"), (CoordinatorConfig, "final_save_timeout"), (CoordinatorConfig, "download_idle_timeout"),
    (WorkerConfig, "wait_timeout"), (WorkerConfig, "backoff_initial"), (WorkerConfig, "backoff_max"), (WorkerConfig, "collective_timeout"),
]  # fmt: skip


def _numeric(cls: type) -> list[tuple[type, str]]:
    out = []
    for name, tp in get_type_hints(cls, include_extras=True).items():
        base = get_args(tp)[0] if get_origin(tp) is Annotated else tp
        if base in (int, float):
            out.append((cls, name))
    return out


def _upper(cls: type, name: str) -> float:
    tp = get_type_hints(cls, include_extras=True)[name]
    ends = [m.le if m.le is not None else m.lt for m in get_args(tp)[1:] if isinstance(m, Interval)]
    return min(end for end in ends if isinstance(end, (int, float)))


def test_every_numeric_setting_is_known_as_sent_or_local() -> None:
    """A new numeric setting fails here until someone has looked at what it feeds."""
    numeric = {*_numeric(CoordinatorConfig), *_numeric(WorkerConfig), *_numeric(SplitConfig), *_numeric(SpeedConfig)}
    assert numeric == set(SENT) | set(SENT_WITHIN) | set(SENT_OPEN) | set(SENT_IN_NAME) | LOCAL


def test_the_largest_block_gives_a_codec_name_the_wire_takes() -> None:
    ((setting, field),) = SENT_IN_NAME.items()
    bound = bounds.BOUNDS[field]
    longest = compression_codec("topk:0.000000000001+int8", int(_upper(*setting))).name
    assert isinstance(bound, bounds.Text) and len(longest) <= bound.most, longest


@pytest.mark.parametrize(("setting", "sent"), list(SENT.items()), ids=[f"{c.__name__}.{n}" for c, n in SENT])
def test_a_setting_sent_to_the_other_side_takes_its_fields_bound(setting: tuple[type, str], sent: tuple[str, int]) -> None:
    cls, name = setting
    field, per_unit = sent
    assert _upper(cls, name) == bounds.largest(field, per_unit=per_unit)


@pytest.mark.parametrize(("setting", "sent"), list(SENT_WITHIN.items()), ids=[f"{c.__name__}.{n}" for c, n in SENT_WITHIN])
def test_a_duration_sent_to_the_other_side_is_at_most_a_week_within_its_fields_bound(setting: tuple[type, str], sent: tuple[str, int]) -> None:
    cls, name = setting
    field, per_unit = sent
    assert _upper(cls, name) == settings.MAX_SECONDS <= bounds.largest(field, per_unit=per_unit)


def test_the_learning_rate_takes_the_wires_open_range() -> None:
    ((setting, field),) = SENT_OPEN.items()
    bound = bounds.BOUNDS[field]
    assert isinstance(bound, bounds.Number) and bound.open_high and _upper(*setting) == bound.most == _upper(TrainConfig, "lr")


@pytest.mark.parametrize("setting", WAITS, ids=[f"{c.__name__}.{n}" for c, n in WAITS])
def test_every_wait_is_one_python_can_time(setting: tuple[type, str]) -> None:
    assert _upper(*setting) <= settings.MAX_WAIT_SECONDS


def test_the_largest_values_fit_the_messages_they_are_sent_in() -> None:
    join = pb.JoinResponse(
        session_id="s",
        heartbeat_interval_ms=int(_upper(CoordinatorConfig, "heartbeat_interval") * 1000),
        rounds=int(_upper(CoordinatorConfig, "rounds")),
        chunk_size=int(_upper(CoordinatorConfig, "chunk_size")),
        strategy="udec",
    )
    wait = pb.WaitTaskRequest(timeout_ms=int(_upper(WorkerConfig, "wait_timeout") * 1000))
    spec = pb.EvalSpec(
        sampler="ddim",
        steps=int(_upper(CoordinatorConfig, "eval_steps")),
        num_samples=int(_upper(CoordinatorConfig, "eval_samples")),
        seed=int(_upper(CoordinatorConfig, "seed")),
    )

    for msg in (join, wait, spec):
        bounds.check(msg, FieldOutOfRange)
    week_ms = settings.MAX_SECONDS * 1000
    assert (join.heartbeat_interval_ms, join.rounds, wait.timeout_ms) == (week_ms, U32, week_ms)


@contextmanager
def _coordinator(tmp_path: Path, **overrides: Any) -> Iterator[Coordinator]:
    cfg = CoordinatorConfig(
        model="tiny", min_workers=2, listen="localhost:0", metrics_port=-1, insecure=True, progress="off",
        checkpoint_dir=str(tmp_path / "ckpt"), **overrides,
    )  # fmt: skip
    coord = Coordinator(cfg, Metrics()).start()
    try:
        yield coord
    finally:
        coord.stop(grace=0)


def test_a_start_refused_after_the_lock_leaves_no_run_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A new run's id is saved once its start can no longer be refused (here: no certificate, no --insecure)."""
    folder = tmp_path / "ckpt"

    assert main(["coordinator", "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--model", "tiny", "--checkpoint-dir", str(folder)]) != 0

    assert "no TLS certificate given" in capsys.readouterr().err
    assert not (folder / "run.json").exists()


def test_the_wait_for_workers_names_the_setting_it_waits_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """'1 of 2 connected' said nothing to a user who never set --min-workers."""
    caplog.set_level(logging.INFO, logger="feddiff.coordinator")
    with _coordinator(tmp_path):
        deadline = time.monotonic() + 30
        while "waiting for workers" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "waiting for workers: 0 connected, --min-workers 2 (the default)" in caplog.text


def test_a_coordinator_at_the_top_of_its_ranges_answers_a_join(tmp_path: Path) -> None:
    """The join that ended in UNKNOWN (heartbeat_interval_ms and rounds out of uint32) at the largest values
    the settings now take (the interval a second short of the timeout, which must be longer)."""
    timeout = _upper(CoordinatorConfig, "heartbeat_timeout")
    rounds, interval = int(_upper(CoordinatorConfig, "rounds")), min(_upper(CoordinatorConfig, "heartbeat_interval"), timeout - 1)
    cfg = coordinator_config(None, {"rounds": str(rounds), "heartbeat_interval": str(interval), "heartbeat_timeout": str(timeout)})

    with (
        _coordinator(tmp_path, rounds=cfg.rounds, heartbeat_interval=cfg.heartbeat_interval, heartbeat_timeout=cfg.heartbeat_timeout) as coord,
        grpc.insecure_channel(coord.address) as channel,
    ):
        joined = RawWorker(channel, "w").join()

    assert (joined.rounds, joined.heartbeat_interval_ms) == (U32, (settings.MAX_SECONDS - 1) * 1000)


def test_upload_slots_take_memory_only_as_uploads_run(tmp_path: Path) -> None:
    """--max-concurrent-uploads 1000000000 made that many receive buffers at start; now a slot's memory is made
    when an upload first takes it."""
    with _coordinator(tmp_path, max_concurrent_uploads=10**9) as coord, grpc.insecure_channel(coord.address) as channel:
        RawWorker(channel, "w").join()
        assert coord._servicer is not None and coord._servicer.handlers.receiver.receive_buffers == []


# --- refused at start, in one line --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["coordinator", "--heartbeat-interval", "5000000"], "--heartbeat-interval = '5000000': expected more than 0 s, up to 604800 s (a week)"),
        (["coordinator", "--rounds", str(2**32)], f"--rounds = '{2**32}': expected an integer in 1..{U32}"),
        (["coordinator", "--round-deadline", "inf"], "--round-deadline = 'inf': expected more than 0 s, up to 604800 s (a week)"),
        (["coordinator", "--upload-idle-timeout", "nan"], "--upload-idle-timeout = 'nan': expected more than 0 s, up to 604800 s (a week)"),
        (["coordinator", "--clip-norm", "1e400"], "--clip-norm = '1e400': expected a finite number >= 0"),
        (["coordinator", "--heartbeat-interval", "30"], "--heartbeat-timeout 30 s (the default) must be longer than --heartbeat-interval 30 s: "),
        (["coordinator", "--heartbeat-timeout", "2"], "--heartbeat-timeout 2 s must be longer than --heartbeat-interval 5 s (the default): "),
        (
            ["coordinator", "--eval-device", "tpu"],
            "--eval-device = 'tpu': expected auto, cpu, cuda, cuda:N or mps; not a device name; this machine offers auto, cpu",
        ),
        ([*WORKER, "--wait-timeout", "5000000"], "--wait-timeout = '5000000': expected more than 0 s, up to 604800 s (a week)"),
        ([*WORKER, "--wait-timeout", "1e400"], "--wait-timeout = '1e400': expected more than 0 s, up to 604800 s (a week)"),
        ([*WORKER, "--wait-timeout", "inf"], "--wait-timeout = 'inf': expected more than 0 s, up to 604800 s (a week)"),
        ([*WORKER, "--beta", "nan"], "--beta = 'nan': expected a finite number > 0"),
        ([*WORKER, "--threads", "1000000"], f"--threads = '1000000': expected an integer in 0..{os.cpu_count()} (this machine's CPUs)"),
        ([*WORKER, "--device", "tpu"], "--device = 'tpu': expected auto, cpu, cuda, cuda:N or mps; not a device name; this machine offers auto, cpu"),
        ([*WORKER, "--device", "cuda:7"], "--device = 'cuda:7': expected auto, cpu, cuda, cuda:N or mps; no such device here; this machine offers auto, cpu"),
        ([*WORKER, "--device", "mps"], "--device = 'mps': expected auto, cpu, cuda, cuda:N or mps; no such device here; this machine offers auto, cpu"),
        ([*WORKER, "--device", "cuda:x"], "--device = 'cuda:x': expected auto, cpu, cuda, cuda:N or mps; not a device name; this machine offers auto, cpu"),
        # addresses, identities and the files a process reads: named with the flag, before anything starts
        (["coordinator", "--listen", "127.0.0.1:99999"], "--listen = '127.0.0.1:99999': expected HOST:PORT with a port in 0..65535 (0: a free one)"),
        ([*WORKER, "--coordinator", "127.0.0.1:99999"], "--coordinator = '127.0.0.1:99999': expected HOST:PORT with a port in 1..65535"),
        ([*WORKER, "--coordinator", "127.0.0.1:0"], "--coordinator = '127.0.0.1:0': expected HOST:PORT with a port in 1..65535"),
        ([*WORKER, "--coordinator", "coordinator.example"], "--coordinator = 'coordinator.example': expected HOST:PORT with a port in 1..65535"),
        ([*WORKER, "--worker-id", "a/b"], "--worker-id = 'a/b': expected a worker id of 1..128 characters of [A-Za-z0-9._-]; is 'a/b'"),
        ([*WORKER, "--worker-id", "../.."], "--worker-id = '../..': expected a worker id of 1..128 characters of [A-Za-z0-9._-]; is '../..'"),
        ([*WORKER, "--worker-id", "w" * 200], f"--worker-id = '{'w' * 200}': expected a worker id of 1..128 characters of [A-Za-z0-9._-]; has 200 characters"),
        (
            ["coordinator", "--worker-sizes", "a=5,a=7,b=3"],
            "--worker-sizes = 'a=5,a=7,b=3': expected a mapping of worker id to images in 1..4294967295 (a flag: ID=N,ID=N); worker 'a' is given twice",
        ),
        (
            ["coordinator", "--worker-sizes", "{a: 5, a: 7}"],
            "--worker-sizes = '{a: 5, a: 7}': expected a mapping of worker id to images in 1..4294967295 (a flag: ID=N,ID=N); key 'a' is given twice",
        ),
        (["coordinator", "--tls-key", "{missing}"], "--tls-key = '{missing}': expected a readable file; no such file or folder"),
        (["coordinator", "--tls-cert", "{tmp}", "--tls-key", "{file}"], "--tls-cert = '{tmp}': expected a readable file; not a file"),
        (
            ["coordinator", "--tls-cert", "{file}", "--tls-key", "{file}", "--tls-ca", "{missing}"],
            "--tls-ca = '{missing}': expected a readable file; no such file or folder",
        ),
        (["coordinator", "--tokens-file", "{missing}"], "--tokens-file = '{missing}': expected a readable file; no such file or folder"),
        (["coordinator", "--init-from", "{missing}"], "--init-from = '{missing}': expected a readable file or folder; no such file or folder"),
        (["coordinator", "--inception-weights", "{missing}"], "--inception-weights = '{missing}': expected a readable file; no such file or folder"),
        (["coordinator", "--eval-data-root", "{file}"], "--eval-data-root = '{file}': expected a readable folder; not a folder"),
        (["coordinator", "--tls-key", "{file}"], "--tls-cert and --tls-key go together"),
        (["coordinator", "--tls-ca", "{file}"], "--tls-ca (mutual TLS) needs the coordinator's own --tls-cert and --tls-key"),
        (
            ["coordinator", "--strategy", "full", "--eval-samples", "10", "--eval-data-root", "{tmp}"],
            "--eval-samples 10: the global model is scored against the Fashion-MNIST test set (--eval-data-root): Fashion-MNIST: "
            "t10k-images-idx3-ubyte.gz not found in '{tmp}' (the data root: --eval-data-root or FEDDIFF_FASHION_MNIST_DIR)",
        ),
        (["coordinator", "--model", "tiny", "--init-from", "{junk_st}"], "--init-from {junk_st}: not a safetensors file (Error while deserializing header"),
        (
            ["coordinator", "--strategy", "full", "--eval-samples", "8", "--inception-weights", "{junk_pth}"],
            "--inception-weights: '{junk_pth}' is not a torch state dict of tensors (UnpicklingError)",
        ),
        (["coordinator", "--checkpoint-dir", ""], "--checkpoint-dir = '': expected a folder path"),
        (
            ["coordinator", "--ready-file", "{file}"],
            "--ready-file = '{file}': expected a new file in an existing folder, or an earlier ready file; an existing file that is not a ready file",
        ),
        (
            ["coordinator", "--ready-file", "{missing}/r.json"],
            "--ready-file = '{missing}/r.json': expected a new file in an existing folder, or an earlier ready file; no folder '{missing}'",
        ),
        ([*WORKER, "--ready-file", "{tmp}"], "--ready-file = '{tmp}': expected a new file in an existing folder, or an earlier ready file; a folder"),
        ([*WORKER, "--tls-ca", "{missing}"], "--tls-ca = '{missing}': expected a readable file; no such file or folder"),
        ([*WORKER, "--tls-ca", "{file}", "--tls-key", "{file}"], "--tls-cert and --tls-key go together"),
        ([*WORKER, "--token-file", "{missing}"], "--token-file = '{missing}': expected a readable file; no such file or folder"),
        ([*WORKER, "--data-dir", "{missing}"], "--data-dir = '{missing}': expected a readable folder; no such file or folder"),
        (
            ["worker", "--coordinator", "127.0.0.1:9", "--insecure"],  # the README's first try: no data flag at all
            "no images to train on: pass --data-dir FOLDER (a folder of your images) or --client-index N (shard N of Fashion-MNIST, "
            "N in 0..0 for --num-clients 1 (the default))",
        ),
        ([*WORKER[:-3], "--client-index", "1", "--insecure"], "--client-index 1 is not a shard of --num-clients 1 (the default): give 0..0"),
        ([*WORKER[:-3], "--client-index", "3", "--num-clients", "2", "--insecure"], "--client-index 3 is not a shard of --num-clients 2: give 0..1, or"),
        ([*WORKER, "--data-dir", "{tmp}"], "--client-index 0 and --data-dir {tmp}: give one source of images"),
        ([*WORKER, "--data-root", "{file}"], "--data-root = '{file}': expected a readable folder; not a folder"),
        ([*WORKER, "--inception-weights", "{tmp}"], "--inception-weights = '{tmp}': expected a readable file; not a file"),
        ([*WORKER, "--inception-weights", "{junk_pth}"], "--inception-weights: '{junk_pth}' is not a torch state dict of tensors (UnpicklingError)"),
    ],
)
def test_a_setting_that_would_fail_at_run_time_is_refused_at_start(argv: list[str], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if "this machine offers" in line:
        import torch

        if torch.cuda.is_available() or torch.backends.mps.is_available():
            line = line.split("this machine offers", maxsplit=1)[0]  # it offers more than the CPU
            if ("cuda:7" in argv and torch.cuda.device_count() > 7) or ("mps" in argv and torch.backends.mps.is_available()):
                pytest.skip("this machine has the device")
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "file").write_text("not a certificate")
    (folder / "junk.safetensors").write_bytes(b"\x03\x00")
    (folder / "junk.pth").write_bytes(bytes(range(256)) * 4)
    paths = {"tmp": str(folder), "file": str(folder / "file"), "missing": str(folder / "missing")}
    paths |= {"junk_st": str(folder / "junk.safetensors"), "junk_pth": str(folder / "junk.pth")}

    def fill(text: str) -> str:
        for name, path in paths.items():
            text = text.replace(f"{{{name}}}", path)
        return text

    argv, line = [fill(a) for a in argv], fill(line)
    if argv[0] == "coordinator":
        argv = [*argv, "--insecure", "--metrics-port", "-1"]
        argv += [] if "--checkpoint-dir" in argv else ["--checkpoint-dir", str(tmp_path / "ckpt")]
        argv += [] if "--listen" in argv else ["--listen", "127.0.0.1:0"]
    else:
        argv = [*argv, "--state-dir", str(tmp_path / "state")]

    assert main(argv) == 2

    err = capsys.readouterr().err
    assert err.startswith(f"feddiff {argv[0]}: error: {line}") and err.count("\n") == 1, err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("rounds: 100000000000000000000000\n", f"rounds (in {{path}}) = 100000000000000000000000: expected an integer in 1..{U32}"),
        ("rounds: 1e23\n", f"rounds (in {{path}}) = '1e23': expected an integer in 1..{U32}"),
        ("round_deadline: .inf\n", "round_deadline (in {path}) = inf: expected more than 0 s, up to 604800 s (a week)"),
        ("quorum: .nan\n", "quorum (in {path}) = nan: expected a number in (0, 1]"),
        ("epochs: true\n", "epochs (in {path}) = True: expected an integer in 1..10000"),
        ("lr: false\n", "lr (in {path}) = False: expected a number in (0, 1)"),
        ("resume: 1\n", "resume (in {path}) = 1: expected true or false"),
        ("rounds: 2\nepochs: 1\nrounds: 3\n", "--config {path}: not valid YAML at line 3, column 1: key 'rounds' is given twice"),
        ("min_workers: 3\nmin-workers: 1\n", "--config {path}: 'min_workers' and 'min-workers' are one setting, given twice"),
    ],
)
def test_a_yaml_value_that_would_fail_at_run_time_is_refused_at_start(text: str, line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "coordinator.yaml"
    path.write_text(text)

    assert main(["coordinator", "--config", str(path), "--insecure", "--listen", "127.0.0.1:0", "--checkpoint-dir", str(tmp_path / "ckpt")]) == 2

    assert capsys.readouterr().err == f"feddiff coordinator: error: {line.format(path=path)}\n"


@pytest.mark.parametrize("cls", [CoordinatorConfig, WorkerConfig, SpeedConfig])
def test_no_number_takes_a_boolean_nor_a_boolean_a_number_nor_any_number_nan_or_infinity(cls: type) -> None:
    base = {"coordinator": "h:1", "client_index": 0} if cls is WorkerConfig else {}
    types = get_type_hints(cls, include_extras=True)
    for f in fields(cls):
        tp = types[f.name]
        bad: list[Any] = [1] if tp is bool else [True] if (cls, f.name) in set(SENT) | set(SENT_OPEN) | LOCAL else []
        if get_type_hints(cls)[f.name] is float:
            bad += [float("nan"), float("inf"), "-inf"]
        for value in bad:
            with pytest.raises(SettingsError, match=f"^{f.name} = {value!r}: expected "):
                settings.build(cls, {**base, f.name: value})


def test_help_shows_each_flags_type_and_range_from_its_setting() -> None:
    parser = build_parser()
    commands = subcommands(parser)
    for command, classes in (("coordinator", [CoordinatorConfig]), ("worker", [WorkerConfig, SpeedConfig])):
        helps = {o: a.help or "" for a in commands[command]._actions for o in a.option_strings}
        for cls in classes:
            for _, name in _numeric(cls):
                flag = flags.flag((name,))
                if flag in helps:  # backoff_*: not flags
                    tp = get_type_hints(cls, include_extras=True)[name]
                    assert settings.expected(tp) in helps[flag], (flag, helps[flag])
    worker_help = " ".join(commands["worker"].format_help().split())
    assert "--wait-timeout WAIT_TIMEOUT seconds one WaitTask long poll lasts: more than 0 s, up to 604800 s (a week), default 30.0" in worker_help


def test_a_worker_with_a_device_this_machine_lacks_exits_2_before_it_joins(tmp_path: Path) -> None:
    """The real process: one line on stderr, no traceback, and the coordinator never hears of it."""
    with _coordinator(tmp_path) as coord:
        result = subprocess.run(
            [sys.executable, "-m", "feddiff", "worker", "--coordinator", coord.address, "--insecure", "--client-index", "0",
             "--device", "tpu", "--state-dir", str(tmp_path / "state")],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
        )  # fmt: skip
        known = coord.registry.all()

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("feddiff worker: error: --device = 'tpu': expected auto, cpu, cuda, cuda:N or mps; not a device name")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert known == []


# --- a new run never starts over another ---------------------------------------------------------------------
def _finished_run(folder: Path) -> dict[str, bytes]:
    """A real one-round run of the tiny model in `folder`, with a final model as the coordinator leaves it;
    every file's bytes."""
    from fedcore.data.shards import SplitConfig
    from fedcore.experiments.simulation import Simulation, SimulationConfig
    from fedcore.federation.checkpoint import FINAL_MODEL, load_run
    from fedcore.federation.engine import FederationConfig
    from fedcore.payload.serialization import save_file

    federation = FederationConfig.from_settings(
        strategy="udec", model="tiny", rounds=1, clients_per_round=0, seed=0, epochs=1, batch_size=32, lr=1e-3, loss="huber"
    )
    cfg = SimulationConfig(federation=federation, data=SplitConfig(num_clients=2, max_images=64), speed=SpeedConfig(device="cpu", threads=1))
    with Simulation.create(cfg, folder, log=lambda _: None) as sim:
        sim.run()
    loaded = load_run(folder)
    assert loaded is not None
    save_file(folder / FINAL_MODEL, loaded[0], {"completed_rounds": "1"})
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_coordinator_without_resume_leaves_a_finished_run_as_it_was(tmp_path: Path, fashion_mnist_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Started over a finished run without --resume, a coordinator overwrote its state.json and final model,
    appended to its round log and pruned its own first checkpoint: the run could not be resumed any more. Now it
    exits 2 naming the folder and the way on; every file stays byte for byte; with --resume it goes on."""
    folder = tmp_path / "ckpt"
    before = _finished_run(folder)
    assert {"state.json", "global-r0001.safetensors", "rounds.jsonl", "final.safetensors"} <= set(before)

    argv = ["coordinator", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--model", "tiny", "--rounds", "3"]
    assert main([*argv, "--checkpoint-dir", str(folder)]) == 2

    assert capsys.readouterr().err == (
        f"feddiff coordinator: error: --checkpoint-dir {folder} holds a run (1 round completed (state.json)): pass --resume to continue it, "
        "or give another --checkpoint-dir for a new run; nothing in it was changed\n"
    )
    assert {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()} == before
    with _coordinator(tmp_path, strategy="udec", rounds=1, epochs=1, batch_size=32, lr=1e-3, resume=True) as coord:
        assert coord.federation.completed_rounds == 1


@pytest.mark.parametrize("left", ["rounds.jsonl", "global-r0002.safetensors", "final.safetensors"])
def test_a_run_without_committed_state_is_still_a_run(tmp_path: Path, left: str) -> None:
    """Files of a run whose state.json is gone (a crash before the first commit, a hand that deleted it) are not
    written over either; an empty round log, as a fresh run begins it, is nothing."""
    from fedcore.federation.checkpoint import run_in

    (tmp_path / "rounds.jsonl").write_text("")
    assert run_in(tmp_path) is None and run_in(tmp_path / "absent") is None
    (tmp_path / left).write_bytes(b"{}\n")
    assert run_in(tmp_path) == left


def test_a_default_folder_that_holds_a_run_is_named_as_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A user who never typed --checkpoint-dir is told the folder is the default one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "coordinator").mkdir(parents=True)
    (tmp_path / "runs" / "coordinator" / "final.safetensors").write_bytes(b"{}\n")

    assert main(["coordinator", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--model", "tiny"]) == 2

    assert capsys.readouterr().err.startswith(
        "feddiff coordinator: error: --checkpoint-dir runs/coordinator (the default) holds a run (final.safetensors): pass --resume to continue it, "
        "or give another --checkpoint-dir for a new run"
    )


@pytest.mark.timeout(60)  # a start that is not refused serves until stopped
@pytest.mark.parametrize("folder", ["missing", "empty", "the default"])
def test_a_resume_with_nothing_to_resume_is_refused_and_creates_nothing(
    folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume` on a folder that holds no run started a new run there, as if --resume were not given: a typo
    in --checkpoint-dir (or a volume not mounted) began the run again from round 1. Now it exits 2 naming the
    folder and the way to a new run, and the folder is left as it was (still missing, still empty)."""
    monkeypatch.chdir(tmp_path)
    argv = ["coordinator", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--model", "tiny", "--resume"]
    given = {"missing": tmp_path / "ckpt", "empty": tmp_path / "ckpt", "the default": Path("runs/coordinator")}[folder]
    if folder == "empty":
        given.mkdir()
    shown, where = {
        "missing": (given, "does not exist"),
        "empty": (given, "holds no checkpoint (no state.json)"),
        "the default": ("runs/coordinator (the default)", "does not exist"),
    }[folder]
    unchanged = "; nothing in it was changed" if folder == "empty" else ""

    assert main([*argv, *(["--checkpoint-dir", str(given)] if folder != "the default" else [])]) == 2

    assert capsys.readouterr().err == (
        f"feddiff coordinator: error: --resume: --checkpoint-dir {shown} {where}: there is nothing to resume; drop --resume to start a new run there{unchanged}\n"
    )
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == ([Path("ckpt")] if folder == "empty" else [])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["--resume", "--resume-or-start"])
def test_files_of_a_run_that_no_checkpoint_commits_are_not_resumed_over(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A round log and a global model without state.json (nor the run id a coordinator saves at its start): a
    resume found no checkpoint and started a new run over them."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "rounds.jsonl").write_text('{"round": 1}\n')
    (folder / "global-r0001.safetensors").write_bytes(b"{}")
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    argv = ["coordinator", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--model", "tiny", flag, "--checkpoint-dir", str(folder)]

    assert main(argv) == 2

    assert capsys.readouterr().err == (
        f"feddiff coordinator: error: {flag}: --checkpoint-dir {folder} holds no checkpoint to resume (no state.json), only files of a run "
        "(global-r0001.safetensors, rounds.jsonl): move them away, or give another --checkpoint-dir for a new run; nothing in it was changed\n"
    )
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


def test_resume_or_start_starts_a_new_run_where_there_is_none_and_goes_on_with_one_that_is_there(
    tmp_path: Path, fashion_mnist_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """For a process manager that runs one command at every start: a new run in a missing folder; the same run,
    its id kept, after a stop before its first round (--resume then goes on with it too); a checkpointed run
    from its last round, with the run's gauges (rounds completed, bytes) restored from the first scrape."""
    caplog.set_level(logging.INFO, "feddiff.coordinator")
    with _coordinator(tmp_path, resume_or_start=True) as first:
        run_id = first.run_id
    assert "--resume-or-start: no run in" in caplog.text
    with _coordinator(tmp_path, resume=True) as again:
        assert again.run_id == run_id and again.federation.completed_rounds == 0
    assert f"--resume: run {run_id} in {tmp_path / 'ckpt'} committed no round before it stopped: it starts again from round 1" in caplog.text

    folder = tmp_path / "finished"
    _finished_run(folder)
    cfg = CoordinatorConfig(
        model="tiny", strategy="udec", rounds=1, epochs=1, batch_size=32, lr=1e-3, min_workers=2, listen="localhost:0", metrics_port=0,
        insecure=True, progress="off", checkpoint_dir=str(folder), resume_or_start=True,
    )  # fmt: skip
    coord = Coordinator(cfg, Metrics()).start()
    try:
        assert coord.metrics_port is not None
        scraped = scrape(coord.metrics_port)
    finally:
        coord.stop(grace=0)
    assert coord.federation.completed_rounds == 1
    assert metric_value(scraped, "feddiff_round") == 1
    assert metric_value(scraped, "feddiff_run_parameters", direction="down", part="decoder") > 0
    assert sum(v for (name, _), v in scraped.items() if name == "feddiff_round_attempts_total") == 0, "this process's counters start at zero"


def test_a_second_coordinator_on_a_checkpoint_dir_in_use_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two coordinators resumed on one checkpoint dir both ran, each writing the run's state, final model and
    round log (rounds 3 and 4 logged twice). The folder is now locked by the coordinator that holds it."""
    argv = ["coordinator", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--model", "tiny", "--resume"]
    with _coordinator(tmp_path) as first:
        assert main([*argv, "--checkpoint-dir", str(tmp_path / "ckpt")]) == 2
        assert first.driver.state != "failed"

    assert capsys.readouterr().err == (
        f"feddiff coordinator: error: --checkpoint-dir '{tmp_path / 'ckpt'}' is in use by another coordinator (pid {os.getpid()}): each run needs its own\n"
    )
    with _coordinator(tmp_path):  # released when the first stopped
        pass


def test_a_state_json_that_is_not_a_run_state_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "state.json").write_text('{"completed_rounds": 2, "conf')

    argv = ["coordinator", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--model", "tiny", "--resume", "--checkpoint-dir", str(folder)]
    assert main(argv) == 2

    assert capsys.readouterr().err.startswith(f"feddiff coordinator: error: {folder / 'state.json'}: not a run's state (JSON): Unterminated string")


@pytest.mark.parametrize(
    ("argv", "flag", "target"),
    [
        (["export", "--out", "{ckpt}/state.safetensors"], "--out", "state.json"),  # the export's config beside it
        (["export", "--out", "{ckpt}/global-r0001.safetensors"], "--out", "global-r0001.safetensors"),
        (["sample", "--samples", "1", "--out", "{ckpt}/state.json"], "--out", "state.json"),
        (["evaluate", "--samples", "2", "--grid", "{ckpt}/rounds.jsonl"], "--grid", "rounds.jsonl"),
    ],
)
def test_an_output_that_would_replace_a_file_of_a_run_is_refused(argv: list[str], flag: str, target: str, tmp_path: Path, fashion_mnist_dir: Path) -> None:
    """`export --out ck/state.safetensors` wrote its JSON config over the run's state.json; `sample --out
    ck/state.json` a PNG: the run could not be resumed nor exported any more."""
    folder = tmp_path / "ckpt"
    before = _finished_run(folder)
    flagged = [a.replace("{ckpt}", str(folder)) for a in argv]
    source = "--checkpoint"

    result = subprocess.run(
        [sys.executable, "-m", "feddiff", flagged[0], source, str(folder), *flagged[1:]],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert f"would replace a file of the run in '{folder}'" in result.stderr and flag in result.stderr and target in result.stderr
    assert {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()} == before


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("w0: same\nw1: same\n", "workers 'w0' and 'w1' have the same token; each needs its own"),
        ("'bad id/..': tok\n", "'bad id/..' is no worker id (1..128 characters of [A-Za-z0-9._-]): no worker could join with it"),
        ('{"w0": "a", "w0": "b"}', "not valid YAML or JSON: key 'w0' is given twice"),
    ],
)
def test_a_tokens_file_that_would_let_one_token_join_as_two_workers_is_refused(
    text: str, line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`w0: same` and `w1: same` let the holder of one token join as either worker."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(text)
    argv = ["coordinator", "--insecure", "--tokens-file", str(tokens), "--listen", "127.0.0.1:0", "--metrics-port", "-1"]

    assert main([*argv, "--checkpoint-dir", str(tmp_path / "ckpt")]) == 2

    assert capsys.readouterr().err == f"feddiff coordinator: error: --tokens-file {tokens}: {line}\n"
