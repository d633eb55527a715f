"""Round overhead with many workers: what a round costs beyond the slowest worker's own work.

The coordinator (bench.coordinator_proc, the real server) runs the tiny model; N light workers (default 200)
live as threads in a few client processes, each with its own channel and the worker's own gRPC client: wait
for a task, download the weights, "train" (sleep the local work time), upload a delta. A round's overhead
is the coordinator's round time (feddiff_round_duration_seconds, from opening the round to closing it) less
the longest local work of the round. Meanwhile two threads call the gRPC health service every 20 ms, one
on the worker-facing port and one on the health-only port that Kubernetes probes, and record how long each
answer took.

Then, in the same run, as many workers move the same bytes over bare gRPC (bench.bare_rounds: identity
serializers, nothing checked or aggregated, the whole tiny model both ways as with --strategy full, no
jitter): `bare_grpc_round_overhead_ms` with the same three calls per worker and round, what the calls alone
cost on this machine with the workers' CPU beside the server's (`round_overhead_over_bare_grpc`: what the
coordinator's work adds to them); `bare_grpc_stream_round_overhead_ms` with one long-lived stream per
worker and the payload alone each way, the least a protocol over gRPC could exchange.

    python -m bench.rounds_scale --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
import psutil
from grpc_health.v1 import health_pb2

from bench import bare_rounds
from bench.common import CoordinatorProcess, LightWorker, delta_payload, emit, log, machine, median, meta_layout, payload_bytes_of, random_delta
from fedcore.federation.client import TrainTask
from fedcore.model.parts import ALL_PARTS
from fedcore.payload.serialization import max_payload_bytes
from feddiff.local import metric_value
from service.health import health_check

MODEL = "tiny"


# --- the client processes -----------------------------------------------------------------------------------


def run_clients(address: str, first: int, count: int, rounds: int, work: float, jitter: float) -> None:
    """`count` light workers as threads of this process; prints one JSON line per (worker, round)."""
    layout = meta_layout(MODEL)
    max_bytes = max_payload_bytes(layout, ALL_PARTS)
    deltas: dict[tuple[int, frozenset], bytes] = {}
    lock = threading.Lock()
    out_lock = threading.Lock()

    def delta_for(task: TrainTask) -> bytes:
        key = (task.round_index, task.returns)
        with lock:
            if key not in deltas:
                deltas[key] = delta_payload(MODEL, task, random_delta(layout, task.returns, seed=task.round_index))
            return deltas[key]

    def worker(i: int) -> None:
        w = LightWorker(address, f"w{first + i:04d}")
        w.join()
        rng = __import__("random").Random(first + i)
        for _ in range(rounds):
            task = w.next_task(timeout=600)
            if task is None:
                break
            got = time.monotonic()
            w.download(task, max_bytes)
            downloaded = time.monotonic()
            local = work * (1 + jitter * rng.random())
            time.sleep(local)
            worked = time.monotonic()
            w.upload(task, delta_for(task))
            done = time.monotonic()
            record = {"round": task.round_index, "worker": first + i, "work": local, "task": got, "down": downloaded, "worked": worked, "up": done}
            with out_lock:
                print(json.dumps(record), flush=True)
        w.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --- health checks during the rounds ------------------------------------------------------------------------


class HealthProbe:
    """Calls grpc.health.v1.Health/Check every `interval` seconds; keeps each answer's latency."""

    def __init__(self, address: str, interval: float = 0.01):
        self.channel = grpc.insecure_channel(address)
        self.check = health_check(self.channel)
        self.interval = interval
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                resp = self.check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if resp.status != health_pb2.HealthCheckResponse.SERVING:
                    self.failures += 1
            except grpc.RpcError:
                self.failures += 1
            self.latencies.append(time.perf_counter() - start)
            self._stop.wait(self.interval)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.channel.close()


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


# --- main ---------------------------------------------------------------------------------------------------


@dataclass
class Watched:
    """What the rounds cost, watched from outside the coordinator: one entry per round closed, in order."""

    durations: list[float] = field(default_factory=list)  # feddiff_round_duration_seconds of each round
    cpu_seconds: list[float] = field(default_factory=list)  # the coordinator's CPU time (all threads) between round closes
    client_cpu_seconds: list[float] = field(default_factory=list)  # the same for the client processes together (they share the cores)
    health: list[float] = field(default_factory=list)  # health check latencies on the worker-facing port
    health_port: list[float] = field(default_factory=list)  # and on the health-only port
    health_failures: int = 0
    records: list[dict] = field(default_factory=list)  # one per (worker, round), as the client processes print them


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds (CPU, under 3 minutes)")
    p.add_argument("--workers", type=int, default=200)
    p.add_argument("--processes", type=int, default=4, help="client processes the workers are spread over")
    p.add_argument("--rounds", type=int, default=None, help="default 5, quick 3")
    p.add_argument("--strategy", default="full", help="full (whole model both ways) is the heaviest")
    p.add_argument("--work", type=float, default=2.0, help="seconds of local work per worker and round")
    p.add_argument("--jitter", type=float, default=0.0, help="local work is work * (1 + jitter * U[0, 1))")
    p.add_argument("--client", nargs=3, type=int, metavar=("FIRST", "COUNT", "ROUNDS"), help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    return p.parse_args()


def start_clients(address: str, args: argparse.Namespace, rounds: int) -> list[subprocess.Popen]:
    """The client processes, `args.workers` light workers spread over `args.processes` of them."""
    per_process = -(-args.workers // args.processes)
    clients = []
    for first in range(0, args.workers, per_process):
        count = min(per_process, args.workers - first)
        cmd = [
            sys.executable,
            "-m",
            "bench.rounds_scale",
            "--address",
            address,
            "--client",
            str(first),
            str(count),
            str(rounds),
            "--work",
            str(args.work),
            "--jitter",
            str(args.jitter),
        ]
        clients.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    return clients


def cpu_seconds_of(processes: list[psutil.Process]) -> float:
    """User and system CPU time of `processes` together, all their threads."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def watch_rounds(coord: CoordinatorProcess, clients: list[subprocess.Popen], rounds: int, deadline: float, watched: Watched) -> None:
    """Scrapes the coordinator until `rounds` rounds closed or `deadline` (monotonic) passed; each round's
    duration, and the CPU the coordinator and the clients took since the round before."""
    coordinator = [psutil.Process(coord.pid)]
    client_procs = [psutil.Process(c.pid) for c in clients]
    seen, total = 0, 0.0
    last_cpu = cpu_seconds_of(coordinator)
    last_client_cpu = cpu_seconds_of(client_procs)
    while seen < rounds and time.monotonic() < deadline:
        m = coord.metrics()
        done = int(metric_value(m, "feddiff_round"))
        if done > seen:
            s = metric_value(m, "feddiff_round_duration_seconds_sum")
            if done == seen + 1:
                watched.durations.append(s - total)
                now_cpu = cpu_seconds_of(coordinator)
                watched.cpu_seconds.append(now_cpu - last_cpu)
                last_cpu = now_cpu
                now_client_cpu = cpu_seconds_of(client_procs)
                watched.client_cpu_seconds.append(now_client_cpu - last_client_cpu)
                last_client_cpu = now_client_cpu
                log(
                    f"round {done}: {watched.durations[-1] * 1000:.0f} ms, CPU: coordinator {watched.cpu_seconds[-1] * 1000:.0f} ms, clients {watched.client_cpu_seconds[-1] * 1000:.0f} ms"
                )
            seen, total = done, s
        time.sleep(0.1)  # a scrape costs the coordinator CPU: 10 a second, not 50


def run_rounds(args: argparse.Namespace, rounds: int) -> Watched:
    """The coordinator and the client processes, the rounds watched while both ports' health is probed."""
    settings = {
        "model": MODEL, "strategy": args.strategy, "rounds": rounds, "min_workers": args.workers, "epochs": 1,
        "health_port": 0,  # the plain-text health-only server that Kubernetes probes (deploy/k8s)
    }  # fmt: skip
    watched = Watched()
    with CoordinatorProcess(settings) as coord:
        clients = start_clients(coord.address, args, rounds)
        # two probes at 50 a second each: together the 100 checks a second of one probe every 10 ms
        probe_port = HealthProbe(f"127.0.0.1:{coord.ready['health_port']}", interval=0.02)
        with HealthProbe(coord.address, interval=0.02) as probe, probe_port:
            deadline = time.monotonic() + 60 + rounds * (args.work * (1 + args.jitter) + 60)
            watch_rounds(coord, clients, rounds, deadline, watched)
            watched.health = list(probe.latencies)
            watched.health_port = list(probe_port.latencies)
        watched.health_failures = probe.failures + probe_port.failures
        for c in clients:
            out, _ = c.communicate(timeout=120)
            watched.records.extend(json.loads(line) for line in out.splitlines() if line.startswith("{"))
    if len(watched.durations) < rounds:
        raise RuntimeError(f"only {len(watched.durations)} of {rounds} rounds completed:\n{coord.output()[-3000:]}")
    return watched


def bare_overheads(args: argparse.Namespace, rounds: int, full_payload: int) -> dict[str, float]:
    """The median round overhead of as many workers over bare gRPC: the feddiff calls, and one stream each."""
    bare = {}
    for calls in ("feddiff", "stream"):
        log(f"bare gRPC, {calls} calls: {args.workers} workers, {rounds} rounds")
        bare[calls] = median(bare_rounds.overheads(args.workers, args.processes, rounds, args.work, full_payload, calls))
    return bare


def worker_phases(records: list[dict], rounds: int) -> dict[str, list[float]]:
    """Seconds per round, as the workers saw them: tasks handed out, downloads done, uploads."""
    phases: dict[str, list[float]] = {"tasks_out": [], "downloads": [], "uploads": []}
    for i in range(rounds):
        rs = [r for r in records if r["round"] == i]
        phases["tasks_out"].append(max(r["task"] for r in rs) - min(r["task"] for r in rs))
        phases["downloads"].append(max(r["down"] for r in rs) - min(r["task"] for r in rs))
        phases["uploads"].append(max(r["up"] for r in rs) - min(r["worked"] for r in rs))
        log(
            f"round {i + 1}: tasks handed out over {phases['tasks_out'][-1] * 1000:.0f} ms, downloads done after "
            f"{phases['downloads'][-1] * 1000:.0f} ms, uploads took {phases['uploads'][-1] * 1000:.0f} ms"
        )
    return phases


def cpu_figures(watched: Watched, workers: int) -> dict[str, object]:
    """CPU per round, the first round left out when there are others (it includes the start)."""
    cpu_seconds = watched.cpu_seconds[1:] or watched.cpu_seconds
    client_cpu_seconds = watched.client_cpu_seconds[1:] or watched.client_cpu_seconds
    return {
        "coordinator_cpu_ms_per_round": median(cpu_seconds) * 1000,
        "clients_cpu_ms_per_round": median(client_cpu_seconds) * 1000,
        # all the CPU a round takes on this machine (coordinator and clients share its cores) spread over the
        # cores: a floor for the overhead when the local work is the same everywhere, as it is by default
        "round_cpu_ms_over_cores": median([(c + k) for c, k in zip(cpu_seconds, client_cpu_seconds, strict=True)]) / (os.cpu_count() or 1) * 1000,
        "coordinator_cpu_ms_per_worker_round": median(cpu_seconds) / workers * 1000,
    }


def health_figures(watched: Watched) -> dict[str, object]:
    """Health check latencies on both ports during the rounds, and the checks that failed."""
    health, health_port = watched.health, watched.health_port
    return {
        "health_checks": len(health),
        "health_p50_ms": percentile(health, 0.5) * 1000,
        "health_p99_ms": percentile(health, 0.99) * 1000,
        "health_max_ms": max(health) * 1000 if health else float("nan"),
        # the same service on the health-only port (a second gRPC server in the coordinator process)
        "health_port_p50_ms": percentile(health_port, 0.5) * 1000,
        "health_port_p99_ms": percentile(health_port, 0.99) * 1000,
        "health_port_max_ms": max(health_port) * 1000 if health_port else float("nan"),
        "health_failures": watched.health_failures,
    }


def main() -> int:
    args = parse_args()
    if args.client:
        first, count, rounds = args.client
        run_clients(args.address, first, count, rounds, args.work, args.jitter)
        return 0

    rounds = args.rounds or (3 if args.quick else 5)
    watched = run_rounds(args, rounds)
    full_payload = payload_bytes_of(meta_layout(MODEL))
    bare = bare_overheads(args, rounds, full_payload)
    slowest = [max(r["work"] for r in watched.records if r["round"] == i) for i in range(rounds)]
    overhead = [d - w for d, w in zip(watched.durations, slowest, strict=True)]
    phases = worker_phases(watched.records, rounds)
    figures: dict[str, object] = {
        **machine(),
        "model": MODEL,
        "strategy": args.strategy,
        "workers": args.workers,
        "rounds": rounds,
        "local_work_s": args.work,
        "work_jitter": args.jitter,
        "round_seconds_median": median(watched.durations),
        **cpu_figures(watched, args.workers),
        "download_phase_ms": median(phases["downloads"]) * 1000,
        "upload_phase_ms": median(phases["uploads"]) * 1000,
        "round_overhead_ms_max": max(overhead) * 1000,
        **health_figures(watched),
        "bare_grpc_payload_bytes": full_payload,
        "bare_grpc_round_overhead_ms": bare["feddiff"] * 1000,
        "bare_grpc_stream_round_overhead_ms": bare["stream"] * 1000,
        "round_overhead_over_bare_grpc": median(overhead) / bare["feddiff"],
        "round_overhead_ms": median(overhead) * 1000,
    }
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
